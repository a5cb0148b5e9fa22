#!/usr/bin/env bash
# Single-device dev run: train a preset on packed shards.
#   launch/dev.sh [PRESET] [extra `harness train` options...]
# PRESET defaults to the environment's PRESET, else lenet (also when the first argument is an option). Environment:
# SHARDS (default shards), RUN_DIR (default: the harness's runs/PRESET-<timestamp>).
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/env.sh
PRESET=${PRESET:-lenet}  # the environment's, as for slurm/train.sbatch; the first argument wins
if [ $# -gt 0 ] && [[ $1 != -* ]]; then PRESET=$1; shift; fi
RUN_DIR_OPTION=()
if [ -n "${RUN_DIR:-}" ]; then RUN_DIR_OPTION=(--run-dir "$RUN_DIR"); fi
exec python3 -m harness train --preset "$PRESET" --shards "${SHARDS:-shards}" "${RUN_DIR_OPTION[@]}" "$@"
