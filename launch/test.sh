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
# Two workers (pytest-xdist), CI's two cores: many tests run one single-threaded process or
# wait out a timeout, so the other core would idle. Each test file runs on one worker
# (--dist loadfile): a module's shared training runs are built once, and the Slurm tests'
# cluster is not stopped under another worker's job. TEST_WORKERS=auto: one per core;
# `-n 0` among the options: the suite in this one process.
exec python3 -m pytest -q -n "${TEST_WORKERS:-2}" --dist loadfile "$@"
