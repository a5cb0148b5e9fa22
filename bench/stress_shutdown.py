#!/usr/bin/env python
"""Stress: the end of two-rank runs, elastic restarts included, many times; count aborts.

A rank that finished training used to die now and then at interpreter exit with
"terminate called without an active exception" (SIGABRT), and torchrun then reported
the finished job as failed. This runs, alternately,

  plain     torchrun --nproc-per-node=2: a short LeNet run to its end;
  restart   the same under --max-restarts=1, with rank 1 SIGKILLing itself mid-run on the
            first attempt (HARNESS_TEST_FAULT=kill@STEP:1), so that torchrun restarts the
            group, which resumes from the last checkpoint and runs to the end,

and counts, over all runs: non-zero exits, and aborts (a rank's output with "terminate
called", or a rank that ended with SIGABRT, exit code -6 in torchrun's report).

Prints ONE JSON record on stdout; progress goes to stderr.

Usage:
    MNIST_DIR=../shared/mnist python bench/stress_shutdown.py [--runs 100] > stress.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import hardware, harness_code, make_log, mnist_dir, positive_int, run_main, versions

log = make_log("stress")
ABORT = re.compile(r"terminate called|exitcode\s*:\s*-6")


KINDS = ("plain", "restart")


def run_kinds(text: str) -> list[str]:
    """argparse type of --kinds: comma-separated run kinds, each plain or restart."""
    kinds = text.split(",")
    unknown = [kind for kind in kinds if kind not in KINDS]
    if unknown:
        raise argparse.ArgumentTypeError(f"{', '.join(map(repr, unknown))}: the run kinds are {' and '.join(KINDS)}")
    return kinds


def at_least_4(text: str) -> int:
    """argparse type of --steps: a checkpoint and a sync point every steps // 4."""
    steps = positive_int(text)
    if steps < 4:
        raise argparse.ArgumentTypeError(f"{text!r}: at least 4 (a checkpoint every steps // 4)")
    return steps


def run_once(kind: str, shards: Path, work: Path, steps: int, env: dict) -> dict:
    run_dir, logs = work / "run", work / "logs"
    subprocess.run(["rm", "-rf", str(run_dir), str(logs)], check=True)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", f"--log-dir={logs}", "--redirects=3"]
    run_env = {**env, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}  # as launch/torchrun.sh sets it
    if kind == "restart":
        launcher.append("--max-restarts=1")
        run_env["HARNESS_TEST_FAULT"] = f"kill@{steps // 2}:1"
    command = [*launcher, "-m", "harness.train", "--shards", str(shards), "--run-dir", str(run_dir), "--preset", "lenet",
               "--max-steps", str(steps), "--checkpoint-every", str(steps // 4), "--log-every", str(steps // 4), "--threads", "1"]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=run_env, timeout=600)
    # Where an abort shows: a rank's own output (LOGS/<run>/attempt_N/RANK/stderr.log), or torchrun's report.
    outputs = {str(p.relative_to(logs)): p.read_text(errors="replace") for p in sorted(logs.rglob("*.log"))}
    outputs["torchrun"] = done.stdout + done.stderr
    aborts = [f"{where}: {line.strip()}" for where, text in outputs.items() for line in text.splitlines() if ABORT.search(line)]
    attempts = len({p.name for p in logs.rglob("attempt_*")})
    finished = (run_dir / "summary.json").exists()
    return {"kind": kind, "returncode": done.returncode, "aborted": bool(aborts), "abort_lines": aborts[:6], "attempts": attempts, "finished": finished,
            "seconds": round(time.perf_counter() - started, 1),
            "tail": "" if done.returncode == 0 else (done.stdout + done.stderr)[-1500:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=positive_int, default=100, help="runs in all, alternating plain and restart (default 100)")
    parser.add_argument("--steps", type=at_least_4, default=40, help="training steps per run (default 40)")
    parser.add_argument("--kinds", type=run_kinds, default="plain,restart", help="run kinds to alternate (default plain,restart)")
    parser.add_argument("--keep-failed", type=Path, help="copy the rank logs of runs that aborted or failed here")
    parser.add_argument("--live-package", action="store_true", help="use the checkout's harness, not a snapshot")
    args = parser.parse_args()

    from harness.data.pack import pack
    from harness.data.sources import load_source

    source = mnist_dir()
    with tempfile.TemporaryDirectory(prefix="stress-shutdown-") as tmp:
        work = Path(tmp)
        code, snapshot = harness_code(work, args.live_package)
        env = {**os.environ, **({"PYTHONPATH": os.pathsep.join(filter(None, [snapshot, os.environ.get("PYTHONPATH")]))} if snapshot else {})}
        shards = work / "shards"
        pack(load_source(source), shards)
        results = []
        for i in range(args.runs):
            kind = args.kinds[i % len(args.kinds)]
            results.append(run_once(kind, shards, work, args.steps, env))
            r = results[-1]
            if args.keep_failed and (r["returncode"] or r["aborted"]):
                shutil.copytree(work / "logs", args.keep_failed / f"run-{i + 1}-{kind}")
            log(f"{i + 1}/{args.runs} {kind}: exit {r['returncode']}, attempts {r['attempts']}, "
                f"{'ABORT, ' if r['aborted'] else ''}{r['seconds']} s")
            if r["returncode"] or r["aborted"]:
                log("\n".join(r["abort_lines"]) or r["tail"])

    by_kind = {
        kind: {
            "runs": sum(r["kind"] == kind for r in results),
            "failed": sum(r["kind"] == kind and r["returncode"] != 0 for r in results),
            "aborts": sum(r["kind"] == kind and r["aborted"] for r in results),
            "unfinished": sum(r["kind"] == kind and not r["finished"] for r in results),
            "restarted": sum(r["kind"] == kind and r["attempts"] > 1 for r in results),
        }
        for kind in KINDS
    }
    record = {
        "benchmark": "stress_shutdown",
        "hardware": hardware(),
        "versions": versions(),
        "harness_code": code,
        "settings": {"runs": args.runs, "steps": args.steps, "ranks": 2, "preset": "lenet"},
        "figures": {
            "runs": len(results),
            "aborts": sum(r["aborted"] for r in results),
            "failed": sum(r["returncode"] != 0 for r in results),
            "by_kind": by_kind,
            "median_seconds": sorted(r["seconds"] for r in results)[len(results) // 2] if results else None,
        },
        "failures": [r for r in results if r["returncode"] != 0 or r["aborted"]][:10],
    }
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    run_main(main)
