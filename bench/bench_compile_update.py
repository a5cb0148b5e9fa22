#!/usr/bin/env python
"""What compiling GraphedStep's SGD update with inductor adds to the step's compile: the
seconds of a preset's first uncaptured training step (forward, backward and update,
compiled by `compile_with_inductor`) with the update compiled (as the harness does) and
with the fused kernel instead, each in a fresh process with an empty inductor cache,
alternated. One JSON record. On a GPU the same comparison takes a CUDA build; on the
CPU inductor writes C++ kernels, so the figures say how much more there is to compile,
not what a GPU's compile takes.

    python bench/bench_compile_update.py [--preset lenet] [--rounds 2] > compile.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from common import hardware, positive_int, run_main, versions

# Runs in each fresh process: a GraphedStep as the Trainer builds one, on random data.
WORKER = """
import json, sys, time, types, torch
from harness.config import TrainConfig, load_preset
from harness.cuda_graph import GraphedStep, compile_with_inductor
from harness.models import build_model
from harness.normalize import Normalizer, make_loss

preset, update = sys.argv[1], sys.argv[2]
config = TrainConfig(**load_preset(preset))
torch.manual_seed(0)
model = build_model(config)
rows = 4 * config.batch_size
stream = types.SimpleNamespace(global_batch=config.batch_size, resident=True, data=range(rows), macro_size=rows, most_steps_per_macro=4)
optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum, nesterov=config.nesterov,
                            weight_decay=config.weight_decay)
stats = {"mean": 0.13, "std": 0.31, "pixel_mean": [0.13] * 784}
step = GraphedStep(model, optimizer, Normalizer(config.normalize, stats, torch.device("cpu")),
                   make_loss(config.loss, label_smoothing=config.label_smoothing), config.precision, stream, torch.device("cpu"),
                   compile_with_inductor)
if update == "fused":
    step.update = step.fused_update
step.images.copy_(torch.randint(0, 256, (rows, 28, 28), dtype=torch.uint8))
step.labels.copy_(torch.randint(0, 10, (rows,)))
step.order.copy_(torch.randperm(rows))
step.create_momentum_buffers()
started = time.perf_counter()
step.training_step()
print(json.dumps({"first_step_s": round(time.perf_counter() - started, 2)}))
"""


def first_step_seconds(preset: str, update: str) -> float:
    with tempfile.TemporaryDirectory(prefix="inductor-cache-") as cache:
        result = subprocess.run([sys.executable, "-c", WORKER, preset, update], capture_output=True, text=True, check=True,
                                env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache})
    return json.loads(result.stdout.strip().splitlines()[-1])["first_step_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="lenet")
    parser.add_argument("--rounds", type=positive_int, default=2)
    args = parser.parse_args()
    seconds = {"compiled_update": [], "fused_update": []}
    for _ in range(args.rounds):
        for update in ("compiled", "fused"):
            seconds[f"{update}_update"].append(first_step_seconds(args.preset, update))
    print(json.dumps({"benchmark": "bench_compile_update", "hardware": hardware(), "versions": versions(), "preset": args.preset,
                      "first_step_seconds_with_an_empty_cache": seconds}, indent=1))


if __name__ == "__main__":
    run_main(main)
