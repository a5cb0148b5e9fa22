#!/usr/bin/env bash
# Gather what bench/gpu_check.sh needs on a GPU machine without network, into .gpu/
# (which this adds to .git/info/exclude, so it is never committed):
#   bench/gpu_prepare.sh MNIST_DIR
# .gpu/mnist: the four MNIST IDX files; .gpu/wheels: webdataset and braceexpand, which
# the GPU machine's Python lacks (its torch, a CUDA build, stays). Then, on the GPU machine,
# with .gpu carried along:  bash bench/gpu_check.sh .gpu/mnist "$OUT" .gpu/wheels
set -euo pipefail
cd "$(dirname "$0")/.."
MNIST=${1:?usage: bench/gpu_prepare.sh MNIST_DIR}
grep -qxF '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >>.git/info/exclude
mkdir -p .gpu/mnist .gpu/wheels
cp "$MNIST"/*-ubyte.gz .gpu/mnist/
python3 -m pip download --quiet --no-deps --disable-pip-version-check -d .gpu/wheels webdataset braceexpand
ls -l .gpu/mnist .gpu/wheels
du -sh .gpu
