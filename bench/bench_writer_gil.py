#!/usr/bin/env python
"""How long rank 0's background writer keeps the training thread from the GIL.

On a GPU the training thread launches a step and moves on, and waits for the device only
at sync points, with the GIL released. While the writer thread (harness/background.py)
writes a checkpoint or TensorBoard's weight images, every moment it holds the GIL is a
moment the training thread cannot launch, and once the device has run through what is
queued, a moment the GPU idles. This measures those stretches: the main thread sleeps
0.1 ms at a time (releasing the GIL, as a sync point's wait does) and records how late
each wake-up is while one writer job runs on a thread: the job's longest stretch, and
its stretches over 1 ms summed. Jobs: `save_checkpoint` of a LeNet state (weights and
SGD momentum, 6.7 MB; serialise, SHA-256, write, fsync), and `weight_images` (tile and
encode the first layers' filters). The first round is a process's first (cold) call,
reported apart.

Usage: python bench/bench_writer_gil.py [--rounds 6] > writer_gil.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import hardware, make_log, median, versions

log = make_log("writer-gil")
TICK_S = 1e-4


def stalls_during(job) -> dict:
    """Run `job` on a thread; the longest stretch the main thread could not run, and the
    stretches over 1 ms summed (ms)."""
    late, done = [], threading.Event()
    worker = threading.Thread(target=lambda: (job(), done.set()))
    last = time.perf_counter()
    worker.start()
    while not done.is_set():
        time.sleep(TICK_S)
        now = time.perf_counter()
        late.append(now - last - TICK_S)
        last = now
    worker.join()
    return {"longest_ms": round(1e3 * max(late), 2), "over_1ms_sum_ms": round(1e3 * sum(x for x in late if x > 1e-3), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6, help="at least 2: the first round, which warms up, is reported apart (default 6)")
    parser.add_argument("--switch-interval-ms", type=float, help="sys.setswitchinterval for the run (Python's default: 5 ms)")
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error(f"--rounds {args.rounds}: at least 2 (the first is reported apart from the later ones)")
    if args.switch_interval_ms:
        sys.setswitchinterval(args.switch_interval_ms / 1e3)

    import torch

    from harness.atomic import tensor_snapshot
    from harness.checkpoint import save_checkpoint
    from harness.models import lenet
    from harness.tensorboard import TensorBoardLog, weight_snapshot

    torch.manual_seed(0)
    model = lenet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.zeros(2, 1, 28, 28)).sum().backward()
    optimizer.step()  # creates the momentum buffers
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    found = {"save_checkpoint": [], "weight_images": []}
    with tempfile.TemporaryDirectory() as run_dir:
        tensorboard = TensorBoardLog(Path(run_dir), purge_step=0)
        for r in range(args.rounds):
            snapshot, weights = tensor_snapshot(state), weight_snapshot(model)
            found["save_checkpoint"].append(stalls_during(lambda: save_checkpoint(Path(run_dir), snapshot, r + 1, 0, 2)))
            found["weight_images"].append(stalls_during(lambda: tensorboard.weight_images(weights, r + 1)))
            log(f"round {r + 1}: {found['save_checkpoint'][-1]} {found['weight_images'][-1]}")
        tensorboard.close()
    figures = {
        job: {"first": rounds[0], "later_longest_ms_median": median([x["longest_ms"] for x in rounds[1:]]),
              "later_longest_ms_max": max(x["longest_ms"] for x in rounds[1:]), "later": rounds[1:]}
        for job, rounds in found.items()
    }
    print(json.dumps({"benchmark": "bench_writer_gil", "hardware": hardware(), "versions": versions(),
                      "settings": {"rounds": args.rounds, "tick_ms": TICK_S * 1e3, "switch_interval_ms": sys.getswitchinterval() * 1e3},
                      "figures": figures}, indent=1))


if __name__ == "__main__":
    main()
