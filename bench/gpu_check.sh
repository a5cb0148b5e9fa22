#!/usr/bin/env bash
# Every GPU check and benchmark, in one run on a GPU machine with no network.
#   bench/gpu_check.sh MNIST_DIR OUT_DIR [WHEELS_DIR]
# MNIST_DIR: the four MNIST IDX files. OUT_DIR: where JSON records and logs go (it ends
# with a one-screen table, also in OUT_DIR/table.txt; the logs end up in
# OUT_DIR/logs.tar.gz). WHEELS_DIR: wheels of what the machine's Python lacks
# (webdataset, braceexpand), installed with --no-index; the harness itself is installed
# with --no-deps, so the machine's own torch (a CUDA build) is used. Runs from the
# repository root. It keeps to GPU_CHECK_SECONDS (default 540) in all: the tests, in four
# processes at once, get at most 330 s (400 s for the group that compiles with inductor;
# the groups took 109-149 s on an H200 on 2026-11-27), the benchmarks skip their later
# parts to fit what is left (bench_gpu.json lists what they skipped), and the step probe
# (bench/gpu_step_probe.py, about 30 s) runs last. GPU_TESTS (a pytest -k expression)
# and BENCH_VARIANT (bench_gpu.py --variant) narrow a rerun.
set -uo pipefail
cd "$(dirname "$0")/.."
MNIST=$(cd "${1:?usage: bench/gpu_check.sh MNIST_DIR OUT_DIR [WHEELS_DIR]}" && pwd)
OUT=${2:?usage: bench/gpu_check.sh MNIST_DIR OUT_DIR [WHEELS_DIR]}
WHEELS=${3:-}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
started=$(date +%s)
total=${GPU_CHECK_SECONDS:-540}  # 480 left no time for the harness-vs-bare rounds once fast compiled with inductor
step() { echo "[gpu_check $(( $(date +%s) - started )) s] $*" | tee -a "$OUT/gpu_check.log"; }

step "install"
if [ -n "$WHEELS" ]; then "$PY" -m pip install --quiet --no-index --no-deps "$WHEELS"/*.whl >>"$OUT/gpu_check.log" 2>&1; fi
# Without network pip cannot fetch setuptools for an isolated build: build with the
# machine's own, or else run the harness from this checkout through PYTHONPATH.
"$PY" -m pip install --quiet --no-deps --no-build-isolation -e . >>"$OUT/gpu_check.log" 2>&1 ||
  { step "pip install -e . failed: using PYTHONPATH=$PWD"; export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"; }
"$PY" -c "import harness, webdataset" || { step "harness or webdataset not importable"; exit 1; }
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
"$PY" - >"$OUT/versions.json" <<'PY'
import json, platform, torch
print(json.dumps({"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                  "torch": torch.__version__, "cuda": torch.version.cuda,
                  "nccl": ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None,
                  "python": platform.python_version()}, indent=1))
PY
cat "$OUT/versions.json"
# The disk the runs write checkpoints to: a checkpoint's size written and fsynced, 5 times.
"$PY" - >"$OUT/disk.json" <<'PY'
import json, os, statistics, tempfile, time
payload, times = os.urandom(6_700_000), []
with tempfile.TemporaryDirectory() as d:
    for i in range(5):
        started = time.perf_counter()
        with open(os.path.join(d, f"c{i}"), "wb") as f:
            f.write(payload); f.flush(); os.fsync(f.fileno())
        times.append(time.perf_counter() - started)
print(json.dumps({"dir": tempfile.gettempdir(), "write_fsync_6.7MB_ms": [round(1e3 * t, 2) for t in times],
                  "median_ms": round(1e3 * statistics.median(times), 2)}))
PY
cat "$OUT/disk.json"
# How long rank 0's checkpoint writer keeps the training thread from the GIL (a few seconds).
timeout 60 "$PY" bench/bench_writer_gil.py >"$OUT/writer_gil.json" 2>>"$OUT/gpu_check.log"

step "GPU tests"
# Four pytest processes share the GPU at once: the tests check results, not speed, and
# one at a time they took about 30 s each (most of it process start-up and CUDA
# initialisation). GPU_TESTS (a pytest -k expression) reruns some of them in one process.
rm -f "$OUT"/gpu-tests*  # a rerun into the same OUT must not mix in the last run's logs
run_tests() {  # NAME [PYTEST ARGS]: its log and JUnit XML in OUT as gpu-tests-NAME.*; TESTS_TIMEOUT: the whole process's
  MNIST_DIR="$MNIST" timeout "${TESTS_TIMEOUT:-330}" "$PY" -m pytest -q -rfEp -m gpu -p no:cacheprovider -s --timeout 120 --durations 0 \
    --basetemp "/tmp/gpu-tests-$1" tests/test_gpu.py "${@:2}" --junitxml="$OUT/gpu-tests-$1.xml" >"$OUT/gpu-tests-$1.log" 2>&1
  echo "pytest exit $?" >>"$OUT/gpu-tests-$1.log"
}
if [ -n "${GPU_TESTS:-}" ]; then
  run_tests some -k "$GPU_TESTS"
else
  inductor="inductor"  # --compile cuda-graph-inductor: each of its runs compiles first
  resume="(sigkill or sigterm) and not inductor"  # these share the module's uninterrupted reference run
  runs="two_ranks or torchrun or one_lenet_epoch or moves_between_the_gpu_and_the_cpu or second_ctrl_c"  # whole runs, ranks, devices, an interrupt
  # Each of its runs compiles first, two of them cold in the resume test: 240 s a test,
  # 400 s in all (past that the process is killed and the group leaves no summary).
  TESTS_TIMEOUT=400 run_tests inductor -k "$inductor" --timeout 240 &
  run_tests resume -k "$resume" &
  run_tests runs -k "$runs" &
  run_tests graph -k "not ($inductor or ($resume) or $runs)" &  # the CUDA-graph step against eager
  wait
fi
cat "$OUT"/gpu-tests-*.log >"$OUT/gpu-tests.log"
grep -hE "^pytest exit|^=* ?[0-9]+ (passed|failed|skipped|error)" "$OUT"/gpu-tests-*.log
# A test cut off by the timeout leaves its runs behind: they must not share the GPU with
# the benchmarks.
# (This machine runs nothing else: the pattern matches any harness run on it.)
pkill -9 -f "[-]m harness[ .]train" ; pkill -9 -f "[t]orch.distributed.run" ; sleep 1

step "benchmarks"
left=$(( total - ($(date +%s) - started) - 50 ))  # 50 s: the step probe after them
# The budget decides which parts start; the timeout also bounds the last one to start.
MNIST_DIR="$MNIST" timeout $(( left > 30 ? left : 30 )) "$PY" bench/bench_gpu.py --device cuda --budget $(( left > 90 ? left - 40 : 50 )) \
  ${BENCH_VARIANT:+--variant "$BENCH_VARIANT"} --record "$OUT/bench_gpu.json" >/dev/null 2>"$OUT/bench_gpu.log"
echo "bench exit $?" >>"$OUT/bench_gpu.log"

left=$(( total - ($(date +%s) - started) - 5 ))
if [ "$left" -ge 45 ]; then  # 16 combinations took 33 s on the H200; it has 20 now
  step "step probe"
  timeout "$left" "$PY" bench/gpu_step_probe.py >"$OUT/probe.json" 2>"$OUT/probe.log"
  echo "probe exit $?" >>"$OUT/probe.log"
else
  step "step probe skipped: $left s left"
fi

step "done"
"$PY" bench/gpu_table.py "$OUT" | tee "$OUT/table.txt"
# The device tool brings back at most 8 files from OUT (2026-11-27 lost the step probe's
# record and a test log to that): the table, the records it reads, and the logs in one archive.
kept=(table.txt versions.json disk.json writer_gil.json gpu-tests.log bench_gpu.json probe.json logs.tar.gz)
logs=()
for f in "$OUT"/* "$OUT"/.[!.]*; do
  [ -e "$f" ] || continue  # an unmatched pattern
  name=${f##*/}
  [[ " ${kept[*]} " == *" $name "* ]] || logs+=("$name")
done
if [ ${#logs[@]} -gt 0 ] && tar -C "$OUT" -czf "$OUT/logs.tar.gz" -- "${logs[@]}"; then
  (cd "$OUT" && rm -rf -- "${logs[@]}")
fi
