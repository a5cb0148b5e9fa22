#!/usr/bin/env bash
# The test suite, as CI runs it: install (or check) the virtual environment, then pytest.
#   launch/test.sh [pytest options]
# MNIST comes from $MNIST_DIR when set; otherwise the tests download it once from the
# public mirrors (checked against the published checksums) into $HARNESS_CACHE
# (default ~/.cache/mnist-harness) and reuse it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
source launch/env.sh
exec python3 -m pytest -q "$@"
