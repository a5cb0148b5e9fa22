#!/usr/bin/env bash
# Install the harness and its dependencies into the current Python environment.
# torch is pinned first: a bare `torch` requirement with nothing installed pulls a
# multi-GB CUDA build, and the package itself asks only for a range.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
python -m pip install --quiet --disable-pip-version-check "torch==${TORCH_VERSION}"
python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
