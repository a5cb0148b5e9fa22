#!/usr/bin/env bash
# Gather what bench/gpu_check.sh needs on a GPU machine without network, into .gpu/
# (which this adds to .git/info/exclude, so it is never committed):
#   bench/gpu_prepare.sh MNIST_DIR
# .gpu/mnist: the four MNIST IDX files; .gpu/wheels: what the GPU machine's Python lacks
# (its torch, a CUDA build, stays): webdataset and braceexpand, and jsonschema with the
# parts of it that are not there (jsonschema-specifications, referencing, and rpds-py,
# compiled, so its wheel is for that machine's Python: GPU_PYTHON_VERSION, default 3.12).
# It has matplotlib and attrs. Then, on the GPU machine, with .gpu carried along:
#   bash bench/gpu_check.sh .gpu/mnist "$OUT" .gpu/wheels
set -euo pipefail
cd "$(dirname "$0")/.."
MNIST=${1:?usage: bench/gpu_prepare.sh MNIST_DIR}
grep -qxF '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >>.git/info/exclude
mkdir -p .gpu/mnist .gpu/wheels
cp "$MNIST"/*-ubyte.gz .gpu/mnist/
python3 -m pip download --quiet --no-deps --disable-pip-version-check -d .gpu/wheels webdataset braceexpand \
  jsonschema jsonschema-specifications referencing
python3 -m pip download --quiet --no-deps --disable-pip-version-check -d .gpu/wheels --only-binary=:all: \
  --python-version "${GPU_PYTHON_VERSION:-3.12}" --platform manylinux_2_17_x86_64 rpds-py
ls -l .gpu/mnist .gpu/wheels
du -sh .gpu
