"""What harness/allocator.py's malloc setting buys: `harness train` with and without it.

    MNIST_DIR=../shared/mnist python bench/bench_malloc.py [--pairs 5] [--steps 400] [--preset lenet] > malloc.json

Runs pairs of fresh `python -m harness train` processes, alternating which goes first.
"off" sets GLIBC_TUNABLES to the empty string: glibc keeps its defaults and the
harness leaves malloc alone (a user's malloc environment wins). Rates are
`train_samples_per_s` from metrics.jsonl; page faults are the whole process's.
Prints one JSON record: medians, the ratio off/on of the medians, and every pair.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from statistics import median

from common import hardware, make_log, mnist_dir, positive_int, run_main, versions

log = make_log("bench_malloc")


def run(mode: str, shard_dir: Path, run_dir: Path, args) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")}
    if mode == "off":
        env["GLIBC_TUNABLES"] = ""
    command = [sys.executable, "-m", "harness", "train", "--preset", args.preset, "--shards", str(shard_dir),
               "--run-dir", str(run_dir), "--epochs", "1", "--max-steps", str(args.steps), "--threads", str(args.threads), "--device", "cpu"]
    faults = resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode:
        raise RuntimeError(f"harness train ({mode}) failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    metrics = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    return {"samples_per_s": metrics["train_samples_per_s"], "minor_page_faults": resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt - faults}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=positive_int, default=5)
    parser.add_argument("--steps", type=positive_int, default=400)
    parser.add_argument("--preset", default="lenet")
    parser.add_argument("--threads", type=positive_int, default=2)
    args = parser.parse_args()
    from harness.data.pack import pack
    from harness.data.sources import load_source

    with tempfile.TemporaryDirectory(prefix="bench-malloc-") as tmp:
        shard_dir = Path(tmp) / "shards"
        pack(load_source(mnist_dir()), shard_dir)
        pairs = []
        for i in range(args.pairs):
            order = ("on", "off") if i % 2 == 0 else ("off", "on")
            pair = {mode: run(mode, shard_dir, Path(tmp) / f"{mode}-{i}", args) for mode in order}
            pair["ratio_off_over_on"] = pair["off"]["samples_per_s"] / pair["on"]["samples_per_s"]
            log(f"pair {i + 1}/{args.pairs}: on {pair['on']['samples_per_s']:,.0f} img/s, off {pair['off']['samples_per_s']:,.0f} img/s")
            pairs.append(pair)
    on, off = ([p[m]["samples_per_s"] for p in pairs] for m in ("on", "off"))
    record = {
        "benchmark": "malloc",
        "hardware": hardware(gpu="none used (device cpu)"),
        "versions": versions(),
        "settings": vars(args),
        "on_samples_per_s_median": median(on),
        "off_samples_per_s_median": median(off),
        "ratio_off_over_on": median(off) / median(on),
        "minor_page_faults_median": {m: median(p[m]["minor_page_faults"] for p in pairs) for m in ("on", "off")},
        "pairs": pairs,
    }
    json.dump(record, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    run_main(main)
