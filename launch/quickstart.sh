#!/usr/bin/env bash
# The main job end to end on one device: install, pack MNIST into shards/, train LeNet.
#   launch/quickstart.sh [extra `harness train` options, e.g. --epochs 1]
# MNIST comes from $MNIST_DIR (IDX files) when set, else from ../shared/mnist beside
# the checkout when present, else it is downloaded from the public mirrors (size, SHA-256 and MD5 checked).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
source launch/env.sh
if [ ! -f shards/manifest.json ]; then
  if [ -z "${MNIST_DIR:-}" ] && [ -d ../shared/mnist ]; then MNIST_DIR=../shared/mnist; fi
  python3 -m harness pack --source "${MNIST_DIR:-download}" --out shards
fi
exec bash launch/dev.sh lenet "$@"
