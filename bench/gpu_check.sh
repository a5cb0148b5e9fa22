#!/usr/bin/env bash
# Every GPU check and benchmark, in one run on a GPU machine with no network.
#   bench/gpu_check.sh MNIST_DIR OUT_DIR [WHEELS_DIR]
# MNIST_DIR: the four MNIST IDX files. OUT_DIR: where JSON records and logs go (it ends
# with a one-screen table, also in OUT_DIR/table.txt). WHEELS_DIR: wheels of what the
# machine's Python lacks (webdataset, braceexpand), installed with --no-index; the
# harness itself is installed with --no-deps, so the machine's own torch (a CUDA build)
# is used. Runs from the repository root; about 6 minutes on one H100.
set -uo pipefail
cd "$(dirname "$0")/.."
MNIST=$(cd "${1:?usage: bench/gpu_check.sh MNIST_DIR OUT_DIR [WHEELS_DIR]}" && pwd)
OUT=${2:?usage: bench/gpu_check.sh MNIST_DIR OUT_DIR [WHEELS_DIR]}
WHEELS=${3:-}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
started=$(date +%s)
step() { echo "[gpu_check $(( $(date +%s) - started )) s] $*" | tee -a "$OUT/gpu_check.log"; }

step "install"
if [ -n "$WHEELS" ]; then "$PY" -m pip install --quiet --no-index --no-deps "$WHEELS"/*.whl >>"$OUT/gpu_check.log" 2>&1; fi
"$PY" -m pip install --quiet --no-deps -e . >>"$OUT/gpu_check.log" 2>&1 || { step "pip install -e . failed"; exit 1; }
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
"$PY" - >"$OUT/versions.json" <<'PY'
import json, platform, torch
print(json.dumps({"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                  "torch": torch.__version__, "cuda": torch.version.cuda,
                  "nccl": ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None,
                  "python": platform.python_version()}, indent=1))
PY
cat "$OUT/versions.json"

step "GPU tests"
MNIST_DIR="$MNIST" timeout 300 "$PY" -m pytest -q -m gpu -p no:cacheprovider -s tests/test_gpu.py \
  --junitxml="$OUT/gpu-tests.xml" >"$OUT/gpu-tests.log" 2>&1
echo "pytest exit $?" >>"$OUT/gpu-tests.log"
tail -n 3 "$OUT/gpu-tests.log"

step "benchmarks"
MNIST_DIR="$MNIST" timeout 330 "$PY" bench/bench_gpu.py --device cuda >"$OUT/bench_gpu.json" 2>"$OUT/bench_gpu.log"
echo "bench exit $?" >>"$OUT/bench_gpu.log"

step "done"
"$PY" bench/gpu_table.py "$OUT" | tee "$OUT/table.txt"
