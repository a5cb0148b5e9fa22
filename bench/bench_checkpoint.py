"""Checkpoint size and write/load time for each preset's training state.

    python bench/bench_checkpoint.py [--repeats 10] [--dir DIR] > checkpoint.json

Builds the state exactly as the training loop does (model, SGD with momentum buffers
after one step, LR schedule, loop position, RNG state, config, world size), then times
`save_checkpoint` (serialise, write, fsync, rename, marker, directory fsync, pruning)
and `load_verified` (read, SHA-256 check, torch.load) in DIR (default: a temporary
directory; pass a directory on the filesystem your runs use, since fsync cost depends
on it). Prints one JSON record; the medians are over --repeats writes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

import torch

from common import positive_int, run_main

from harness.checkpoint import load_verified, save_checkpoint
from harness.config import TrainConfig, load_preset, preset_names
from harness.models import build_model
from harness.optimizer import build_optimizer, make_schedule


def training_state(preset: str) -> dict:
    config = TrainConfig(**load_preset(preset))
    torch.manual_seed(0)
    model = build_model(config)
    optimizer = build_optimizer(model, config, torch.device("cpu"))
    scheduler = make_schedule(optimizer, config, steps_per_epoch=600)
    # One step, so the optimizer holds its momentum buffers as it does mid-run.
    model(torch.rand(2, 1, 28, 28)).sum().backward()
    optimizer.step()
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "loop": {"epoch": 0, "macro": 0, "step_in_macro": 1, "step": 1},
        "rng": {"torch": torch.get_rng_state(), "cuda": []},
        "config": dataclasses.asdict(config),
        "world_size": 1,
        "_parameters": sum(p.numel() for p in model.parameters()),
    }


def bench(preset: str, directory: Path, repeats: int) -> dict:
    state = training_state(preset)
    parameters = state.pop("_parameters")
    run_dir = Path(tempfile.mkdtemp(prefix=f"ckpt-{preset}-", dir=directory))
    saves, loads = [], []
    try:
        for step in range(1, repeats + 1):
            state["loop"]["step"] = step  # load_verified checks the state's step against its marker's
            started = time.perf_counter()
            path = save_checkpoint(run_dir, state, step, 0, keep=3)
            saves.append(time.perf_counter() - started)
            started = time.perf_counter()
            load_verified(path)
            loads.append(time.perf_counter() - started)
        size = path.stat().st_size
    finally:
        shutil.rmtree(run_dir)
    return {
        "parameters": parameters,
        "checkpoint_bytes": size,
        "save_seconds_median": median(saves),
        "save_seconds_max": max(saves),
        "load_seconds_median": median(loads),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=positive_int, default=10)
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temporary directory)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.dir:
        args.dir.mkdir(parents=True, exist_ok=True)  # `--dir runs` in a fresh clone, which has no runs/ yet
    with tempfile.TemporaryDirectory() as tmp:
        directory = args.dir or Path(tmp)
        figures = {preset: bench(preset, directory, args.repeats) for preset in preset_names()}
    record = {
        "benchmark": "checkpoint",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "directory": str(args.dir) if args.dir else "a temporary directory (/tmp)",
        "repeats": args.repeats,
        "figures": figures,
    }
    json.dump(record, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    run_main(main)
