#!/usr/bin/env bash
# Data-parallel run on one node: N processes (one per GPU, or gloo workers on the CPU).
#   launch/torchrun.sh N [PRESET] [extra `harness train` options...]
# Environment: SHARDS (default shards), RUN_DIR (default runs/PRESET-wN-<timestamp>).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:?usage: launch/torchrun.sh N [PRESET] [options...]}
PRESET=${2:-lenet}
shift; shift || true
RUN_DIR=${RUN_DIR:-runs/${PRESET}-w${N}-$(date +%Y%m%d-%H%M%S)}
exec torchrun --standalone --nproc_per_node="$N" -m harness.train \
  --preset "$PRESET" --shards "${SHARDS:-shards}" --run-dir "$RUN_DIR" "$@"
