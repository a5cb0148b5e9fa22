#!/usr/bin/env python
"""The CPU sweep behind the `fast` preset: how many epochs each recipe needs for 99.0%.

On a GPU the `fast` preset's time to 99% is (epochs needed) x (an epoch's device time);
the first factor does not depend on the hardware, so it is searched here, on the CPU.
Each recipe is the `fast` preset with some options overridden, run for every seed in a
fresh process; the record has each epoch's test accuracy per seed, and for each recipe
the first epoch at which every seed is at or above --target, and the mean at the end.

    python bench/fast_recipe.py --seeds 0,1,2 --recipe "--epochs 2" --recipe "--epochs 2 --lr 0.15"

Prints one JSON record on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import hardware, make_log, versions

from harness.config import load_preset

ROOT = Path(__file__).resolve().parents[1]
log = make_log("fast_recipe")


def run(recipe: str, seed: int, shards: str, work: Path) -> list[float]:
    """Test accuracy after each epoch of one run of the fast preset with `recipe`'s options."""
    run_dir = work / f"{abs(hash(recipe))}-seed{seed}"
    command = [
        sys.executable, "-m", "harness", "train", "--preset", "fast", "--device", "cpu", "--seed", str(seed),
        "--shards", shards, "--run-dir", str(run_dir), "--resume", "never", *shlex.split(recipe),
    ]
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["val_accuracy"] for line in lines]


def summarise(per_seed: dict[int, list[float]], target: float) -> dict:
    epochs = min(len(a) for a in per_seed.values())
    all_reach = [e + 1 for e in range(epochs) if all(a[e] >= target for a in per_seed.values())]
    return {
        "epochs_until_every_seed_reaches_target": all_reach[0] if all_reach else None,
        "final_mean": statistics.mean(a[-1] for a in per_seed.values()),
        "final_min": min(a[-1] for a in per_seed.values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", action="append", required=True, help="harness train options on top of --preset fast")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--target", type=float, default=0.99)
    parser.add_argument("--shards", default="shards", help="a shard set (default: shards, which the quickstart packs)")
    args = parser.parse_args()
    if "://" not in args.shards and not (Path(args.shards) / "manifest.json").is_file():
        parser.error(f"--shards {args.shards}: no manifest.json there; pack MNIST first (harness pack --source DIR --out {args.shards})")
    seeds = [int(s) for s in args.seeds.split(",")]
    results = []
    with tempfile.TemporaryDirectory(prefix="fast-recipe-") as work:
        for recipe in args.recipe:
            per_seed = {}
            for seed in seeds:
                per_seed[seed] = run(recipe, seed, args.shards, Path(work))
                log(f"{recipe!r} seed {seed}: " + " ".join(f"{100 * a:.2f}" for a in per_seed[seed]))
            results.append({"recipe": recipe, "val_accuracy_by_seed": per_seed, **summarise(per_seed, args.target)})
    print(json.dumps({"benchmark": "fast_recipe", "hardware": hardware(), "versions": versions("torch"), "target": args.target,
                      "base_preset": load_preset("fast"), "results": results}, indent=1))


if __name__ == "__main__":
    main()
