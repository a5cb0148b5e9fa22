#!/usr/bin/env bash
# Data-parallel run on one node: N processes (one per GPU, or gloo workers on the CPU).
#   launch/torchrun.sh N [PRESET] [extra `harness train` options...]
# PRESET defaults to the environment's PRESET, else lenet (also when the argument after N is an option). Environment:
# SHARDS (default shards), RUN_DIR (default: the harness's runs/PRESET-<rank 0's timestamp>).
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/env.sh
if [[ ${1:-} == -h || ${1:-} == --help ]]; then
  echo "usage: launch/torchrun.sh N [PRESET] [options...]; the options are harness train's:"
  exec python3 -m harness train --help
fi
N=${1:-}
[[ $N =~ ^[1-9][0-9]*$ ]] || { echo "launch/torchrun.sh: N is the number of processes, got '$N' (usage: launch/torchrun.sh N [PRESET] [options...])" >&2; exit 2; }
shift
PRESET=${PRESET:-lenet}  # the environment's, as for slurm/train.sbatch; the first argument wins
if [ $# -gt 0 ] && [[ $1 != -* ]]; then PRESET=$1; shift; fi
RUN_DIR_OPTION=()
if [ -n "${RUN_DIR:-}" ]; then RUN_DIR_OPTION=(--run-dir "$RUN_DIR"); fi
# torchrun shares its rendezvous store with init_process_group by default, and after an
# elastic restart workers can then read the previous attempt's addresses and fail to
# connect (pytorch/pytorch#135712); a separate store per attempt avoids that.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
# harness.torchrun: torchrun, passing the ranks' exit status on (75 for a stop, 2 for bad
# input) and honouring a SIGTERM that comes before it has started them.
exec python3 -m harness.torchrun --standalone --nproc_per_node="$N" -m harness train \
  --preset "$PRESET" --shards "${SHARDS:-shards}" "${RUN_DIR_OPTION[@]}" "$@"
