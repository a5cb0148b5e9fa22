#!/usr/bin/env bash
# Single-device dev run: train a preset on packed shards.
#   launch/dev.sh [PRESET] [extra `harness train` options...]
# Environment: SHARDS (default shards), RUN_DIR (default runs/PRESET-<timestamp>).
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/env.sh
PRESET=${1:-lenet}
shift || true
RUN_DIR=${RUN_DIR:-runs/${PRESET}-$(date +%Y%m%d-%H%M%S)}
exec python3 -m harness train --preset "$PRESET" --shards "${SHARDS:-shards}" --run-dir "$RUN_DIR" "$@"
