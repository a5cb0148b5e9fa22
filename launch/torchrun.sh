#!/usr/bin/env bash
# Data-parallel run on one node: N processes (one per GPU, or gloo workers on the CPU).
#   launch/torchrun.sh N [PRESET] [extra `harness train` options...]
# Environment: SHARDS (default shards), RUN_DIR (default runs/PRESET-wN-<timestamp>).
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/env.sh
N=${1:-}
[[ $N =~ ^[1-9][0-9]*$ ]] || { echo "launch/torchrun.sh: N is the number of processes, got '$N' (usage: launch/torchrun.sh N [PRESET] [options...])" >&2; exit 2; }
PRESET=${2:-lenet}
shift; shift || true
RUN_DIR=${RUN_DIR:-runs/${PRESET}-w${N}-$(date +%Y%m%d-%H%M%S)}
# torchrun shares its rendezvous store with init_process_group by default, and after an
# elastic restart workers can then read the previous attempt's addresses and fail to
# connect (pytorch/pytorch#135712); a separate store per attempt avoids that.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
exec torchrun --standalone --nproc_per_node="$N" -m harness.train \
  --preset "$PRESET" --shards "${SHARDS:-shards}" --run-dir "$RUN_DIR" "$@"
