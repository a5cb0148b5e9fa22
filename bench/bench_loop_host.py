#!/usr/bin/env python
"""The host's time per step of the training loop around a graphed step, with the step's
device work replaced by nothing: what the Trainer's own per-step code costs (the fault
hooks, the loss window, the progress counters, the sync points every --log-every steps,
the macro-batch handling and TensorBoard scalars).

    MNIST_DIR=... python bench/bench_loop_host.py [--device cpu|cuda] [--epochs 3] > loop_host.json

On a GPU the graphed step replays in one launch, so the loop keeps the GPU fed as long as
this time stays well under the device's step (0.2 ms for lenet on an H200): the harness's
gap to a bare loop is then on the device, not in this Python. One JSON record: the
microseconds per step of each epoch (the first includes first calls' costs).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from common import hardware, mnist_dir, positive_int, run_main, versions

from harness import distributed
from harness.config import TrainConfig, load_preset
from harness.data.pack import pack
from harness.data.sources import load_source
from harness.stopping import StopRequest
from harness.train import LossWindow, Trainer, open_shards


class NoDeviceWork:
    """GraphedStep's interface to the loop (load, call, losses), doing nothing."""

    def __init__(self, slots: int, device: torch.device):
        self.losses = torch.zeros(slots, device=device)
        self.loss = torch.zeros((), device=device)

    def load(self, macro, first_step: int) -> None:
        pass

    def __call__(self) -> torch.Tensor:
        return self.loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--epochs", type=positive_int, default=3)
    parser.add_argument("--preset", default="lenet")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-loop-host-") as tmp:
        shards = Path(tmp) / "shards"
        pack(load_source(mnist_dir()), shards)
        config = TrainConfig(**{**load_preset(args.preset), "device": args.device, "epochs": args.epochs})
        ctx = distributed.init_distributed(args.device, 300, None, None)
        stop = StopRequest()
        run_dir = Path(tmp) / "run"
        trainer = Trainer(config, open_shards(ctx, shards, None, None, stop, run_dir), run_dir, ctx, "never", stop)
        try:
            trainer.graphed = NoDeviceWork(trainer.stream.most_steps_per_macro, ctx.device)
            trainer.window = LossWindow(trainer.graphed.losses)
            trainer.stream.prepare(0, 0)
            per_step = []
            for _ in range(args.epochs):
                started = time.perf_counter()
                trainer.train_epoch()
                per_step.append(round(1e6 * (time.perf_counter() - started) / trainer.stream.steps_per_epoch, 2))
                trainer.progress.next_epoch()
        finally:
            trainer.outputs.close()
            trainer.stream.close()
    print(json.dumps({"benchmark": "bench_loop_host", "hardware": hardware(), "versions": versions(),
                      "preset": args.preset, "device": args.device, "steps_per_epoch": trainer.stream.steps_per_epoch,
                      "log_every": config.log_every, "host_us_per_step_by_epoch": per_step}, indent=1))


if __name__ == "__main__":
    run_main(main)
