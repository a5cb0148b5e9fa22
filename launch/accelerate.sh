#!/usr/bin/env bash
# Data-parallel run under `accelerate launch`, with the config in launch/accelerate.yaml.
#   launch/accelerate.sh N [PRESET] [extra `harness train` options...]
# Environment: PRESET, SHARDS, RUN_DIR as in torchrun.sh; MAIN_PROCESS_PORT (default the config's
# 29500; when it is taken, accelerate warns and picks a free port itself).
# The same config works on a CPU-only machine: accelerate starts N processes through
# torchrun and the harness picks gloo when there is no CUDA. (accelerate's own --cpu /
# MULTI_CPU mode needs mpirun and otherwise quietly runs a single process.)
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/env.sh
if [[ ${1:-} == -h || ${1:-} == --help ]]; then
  echo "usage: launch/accelerate.sh N [PRESET] [options...]; the options are harness train's:"
  exec python3 -m harness train --help
fi
N=${1:-}
[[ $N =~ ^[1-9][0-9]*$ ]] || { echo "launch/accelerate.sh: N is the number of processes, got '$N' (usage: launch/accelerate.sh N [PRESET] [options...])" >&2; exit 2; }
shift
if [ -n "${MAIN_PROCESS_PORT:-}" ] && ! { [[ $MAIN_PROCESS_PORT =~ ^[0-9]+$ ]] && [ "$MAIN_PROCESS_PORT" -ge 1 ] && [ "$MAIN_PROCESS_PORT" -le 65535 ]; }; then
  echo "launch/accelerate.sh: MAIN_PROCESS_PORT is a port from 1 to 65535, got '$MAIN_PROCESS_PORT'" >&2
  exit 2
fi
PRESET=${PRESET:-lenet}  # the environment's, as for slurm/train.sbatch; the first argument wins
if [ $# -gt 0 ] && [[ $1 != -* ]]; then PRESET=$1; shift; fi
RUN_DIR_OPTION=()
if [ -n "${RUN_DIR:-}" ]; then RUN_DIR_OPTION=(--run-dir "$RUN_DIR"); fi
# accelerate starts torchrun: as in launch/torchrun.sh, a store per attempt keeps an
# elastically restarted group from reading the last attempt's addresses (pytorch/pytorch#135712).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
# harness.accelerate_launch: accelerate launch, passing the ranks' exit status on (75 for a
# stop, 2 for bad input) and honouring a SIGTERM that comes before the ranks start.
exec python3 -m harness.accelerate_launch --config_file launch/accelerate.yaml --num_processes "$N" \
  ${MAIN_PROCESS_PORT:+--main_process_port "$MAIN_PROCESS_PORT"} \
  -m harness train --preset "$PRESET" --shards "${SHARDS:-shards}" "${RUN_DIR_OPTION[@]}" "$@"
