#!/usr/bin/env python
"""How long the training thread waits for the stream at each macro-batch, with and without
loading across epoch ends (`MacroBatchStream.epoch(..., next_epoch_follows=True)`).

On a GPU, the host only launches work and then waits, so every moment the training thread
spends reading or assembling a macro-batch is a moment the GPU has nothing queued. This
measures that wait with the device's time stood in for by a sleep (which, like the wait
at a GPU sync point, releases the GIL): for each macro-batch, `--step-ms` x its steps,
0.2 ms a step by default, about LeNet's graphed step on an H200 (0.20 ms,
docs/gpu-h200-2026-11-27). The stream runs with its prefetch thread on (as on a GPU), on
the CPU, over the real MNIST shards, in two layouts:

- `resident`: the default macro-batch of 60,000, the whole split on the device; each
  epoch's order (a seeded permutation, ~1.5 ms on a 2-core Xeon) is what is loaded;
- `streamed`: `--macro-batch 10000`, six macro-batches an epoch read from the shards.

Each round runs `--epochs` epochs with next_epoch_follows off ("before": each epoch's
first macro-batch is loaded when it is asked for, as the stream did until this change)
and on ("after"), in alternating order. The figures are the summed waits at the epochs'
first macro-batches and at the others, from the second epoch on (the first epoch's first
macro-batch is `prepare()`d before the clock in the harness, here too), medians over
the rounds.

Usage: MNIST_DIR=../shared/mnist python bench/bench_prefetch.py [--rounds 3] > prefetch.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from common import hardware, make_log, median, mnist_dir, positive_float, positive_int, run_main, versions

log = make_log("prefetch")


def waits(shards: Path, macro_batch: int, epochs: int, step_ms: float, across_epochs: bool) -> dict:
    """Seconds the caller waited for each macro-batch, summed separately over the epochs'
    first macro-batches and the others (epochs 2 on)."""
    import torch

    from harness.data.shard_set import ShardSource, ShardSplit
    from harness.data.stream import MacroBatchStream

    split = ShardSplit(ShardSource(shards, None, None), "train", verify=False)
    stream = MacroBatchStream(split, 100, macro_batch, seed=0, device=torch.device("cpu"), prefetch=True)
    stream.preload()
    stream.prepare(0)
    first = rest = 0.0
    try:
        for epoch in range(epochs):
            batches = stream.epoch(epoch, next_epoch_follows=across_epochs and epoch + 1 < epochs)
            index = 0
            while True:
                asked = time.perf_counter()
                macro = next(batches, None)
                waited = time.perf_counter() - asked
                if macro is None:
                    break
                if epoch > 0:
                    first, rest = (first + waited, rest) if index == 0 else (first, rest + waited)
                time.sleep(step_ms / 1e3 * macro.steps)  # the device training the macro-batch
                index += 1
    finally:
        stream.close()
    return {"epoch_start_wait_s": first, "other_wait_s": rest, "macro_batches_per_epoch": stream.macro_batches_per_epoch}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=positive_int, default=3)
    parser.add_argument("--epochs", type=positive_int, default=6)
    parser.add_argument("--step-ms", type=positive_float, default=0.2, help="device time per step of 100 images, stood in for by a sleep")
    parser.add_argument("--shards", type=Path, help="packed MNIST shards (default: packed from MNIST_DIR into a temporary directory)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        shards = args.shards
        if shards is None:
            from harness.data.pack import pack
            from harness.data.sources import load_source

            shards = Path(tmp) / "shards"
            log(f"packing {mnist_dir()} into {shards}")
            pack(load_source(mnist_dir()), shards)
        figures = {}
        for layout, macro_batch in (("resident", 60000), ("streamed", 10000)):
            rounds = []
            for r in range(args.rounds):
                order = (False, True) if r % 2 == 0 else (True, False)
                measured = {across: waits(shards, macro_batch, args.epochs, args.step_ms, across) for across in order}
                rounds.append({"before": measured[False], "after": measured[True]})
                log(f"{layout} round {r + 1}: epoch-start waits {measured[False]['epoch_start_wait_s'] * 1e3:.1f} ms before, "
                    f"{measured[True]['epoch_start_wait_s'] * 1e3:.1f} ms after")
            summary = {
                f"{when}_{what}_ms": round(1e3 * median([r[when][f"{what}_wait_s"] for r in rounds]), 2)
                for when in ("before", "after") for what in ("epoch_start", "other")
            }
            figures[layout] = {"macro_batch": macro_batch, "macro_batches_per_epoch": rounds[0]["before"]["macro_batches_per_epoch"],
                               "epochs_counted": args.epochs - 1, **summary, "rounds": rounds}
    print(json.dumps({
        "benchmark": "bench_prefetch", "hardware": hardware(), "versions": versions(),
        "settings": {"rounds": args.rounds, "epochs": args.epochs, "step_ms": args.step_ms, "batch": 100, "device": "cpu, prefetch thread on"},
        "figures": figures,
    }, indent=1))


if __name__ == "__main__":
    run_main(main)
