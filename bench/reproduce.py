#!/usr/bin/env python
"""Reproduce every preset: 3 seeds each on real MNIST, one JSON record per run, and the
results table docs/results.md generated from the records.

    MNIST_DIR=../shared/mnist python bench/reproduce.py                 # every preset, seeds 0,1,2 (hours on 2 CPU cores)
    MNIST_DIR=../shared/mnist python bench/reproduce.py --presets lenet --seeds 0
    python bench/reproduce.py --table-only                              # docs/results.md from the records
    MNIST_DIR=../shared/mnist python bench/reproduce.py --smoke --records /tmp/r --table /tmp/r.md   # CI: seconds

Each run is `python -m harness train --preset P --seed S --device cpu` in a fresh process,
with a snapshot of the harness package copied at start (so that edits to the checkout
during a campaign of hours do not mix two versions of the code; `--live-package` turns
that off). A run whose record exists is skipped, so an interrupted campaign continues
where it stopped (`--force` reruns). Records go to docs/results/PRESET-seedS.json: the
test accuracy before and after training, epochs, training time and images/s from the
run's metrics.jsonl, the CPU model, load, versions and the harness commit. `--smoke`
cuts every run to a few steps and one seed: it checks the pipeline, not the figures.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import OthersGauge, hardware, harness_code, loadavg, make_log, mnist_dir, versions

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ("lenet", "lenet-plus", "fast", "neupy-mlp", "theanets-mlp", "mathspp-mlp")
# Test accuracy each preset's source published (a fraction), and where it comes from.
PUBLISHED = {
    "lenet": (0.9924, "the seed tutorial's LeNet-like CNN, 15 epochs"),
    "neupy-mlp": (0.9837, "NeuPy's MNIST MLP example"),
    "theanets-mlp": (None, "theanets' MNIST classifier example publishes no test accuracy"),
    "mathspp-mlp": (0.9194, "mathspp/nnfwp v1.1, examples/mnist.py (10.10% before training)"),
    "lenet-plus": (None, "no source: the issue's target is a mean of at least 99.40% in at most 15 epochs"),
    "fast": (None, "no source: the lenet network with BatchNorm in as few steps as reach 99.0% (bench/gpu_check.sh times it on a GPU)"),
}
TARGETS = {"lenet-plus": 0.9940, "fast": 0.9900}  # a bar to clear where there is no published figure
SMOKE_STEPS = 20
# --pooled-split: NeuPy's evaluation (sklearn's train_test_split(test_size=1/7) of all 70,000
# images) instead of the official test set, whose writers the training set does not share.
POOLED = "pooled-split"
POOLED_SPLIT_SEED = 0

log = make_log("reproduce")


def cpu_family_model() -> str | None:
    """x86 family and model numbers: /proc/cpuinfo's model name is all some VMs show."""
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/cpuinfo").read_text().splitlines() if ":" in line)
    except OSError:
        return None
    found = {k.strip(): v.strip() for k, v in info.items() if k.strip() in ("cpu family", "model")}
    return f"family {found['cpu family']}, model {found['model']}" if len(found) == 2 else None


def run_name(preset: str, seed: int, variant: str) -> str:
    return f"{preset}{'-' + variant if variant else ''}-seed{seed}"


def run_one(preset: str, seed: int, shards: Path, run_dir: Path, extra: list[str], env: dict) -> dict:
    """Train one preset with one seed in a fresh process; the record of the run."""
    # --resume auto: a run interrupted with the campaign continues from its last checkpoint.
    command = [sys.executable, "-m", "harness", "train", "--preset", preset, "--seed", str(seed), "--shards", str(shards),
               "--run-dir", str(run_dir), "--device", "cpu", *extra]
    load_before, started = loadavg(), time.perf_counter()
    with OthersGauge() as others:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"error: {preset} seed {seed} failed (exit {done.returncode}):\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    training_seconds = sum(m["epoch_seconds"] for m in metrics)
    images = summary["steps"] * summary["config"]["batch_size"]
    return {
        "preset": preset,
        "seed": seed,
        "test_accuracy": summary["test_accuracy"],
        "test_accuracy_before_training": summary["before_training"]["test_accuracy"],
        "best_val_accuracy": max(m["val_accuracy"] for m in metrics),
        "epochs_run": summary["epochs_run"],
        "steps": summary["steps"],
        "training_seconds": round(training_seconds, 2),
        "images_per_s": round(images / training_seconds, 1),
        "process_wall_seconds": round(wall, 2),
        "threads_per_rank": summary["threads_per_rank"],
        "others_cores_during_run": others.cores,
        "loadavg_before_after": [load_before, loadavg()],
        # Whole arguments only: a relative --shards path such as "shards" is also inside "--shards".
        "command": " ".join({str(shards): "SHARDS", str(run_dir): "RUN_DIR"}.get(str(arg), str(arg)) for arg in command[1:]),
        "config": summary["config"],
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def pack_pooled_split(work: Path) -> Path:
    """MNIST's 70,000 images pooled and split at random into 60,000 for training and 10,000
    for testing, packed (NeuPy's evaluation)."""
    import numpy as np

    from harness.data.pack import pack
    from harness.data.sources import Dataset, Split, load_source

    mnist = load_source(mnist_dir())
    images = np.concatenate([mnist.splits["train"].images, mnist.splits["test"].images])
    labels = np.concatenate([mnist.splits["train"].labels, mnist.splits["test"].labels])
    order = np.random.default_rng(POOLED_SPLIT_SEED).permutation(len(labels))
    test, train = np.sort(order[:10000]), np.sort(order[10000:])
    splits = {"train": Split(images[train], labels[train]), "test": Split(images[test], labels[test])}
    pack(Dataset(f"mnist-{POOLED}-{POOLED_SPLIT_SEED}", mnist.kind, splits, mnist.files), work / "pooled-shards")
    return work / "pooled-shards"


def pack_shards(work: Path, env: dict) -> Path:
    shards = work / "shards"
    done = subprocess.run([sys.executable, "-m", "harness", "pack", "--source", str(mnist_dir()), "--out", str(shards)],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"error: packing MNIST failed:\n{done.stderr}")
    return shards


def campaign(args, work: Path) -> None:
    code, snapshot = harness_code(work, args.live_package)
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}  # see bench/README.md, noise
    if snapshot:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [snapshot, env.get("PYTHONPATH")]))
    variant = POOLED if args.pooled_split else ""
    shards = pack_pooled_split(work) if args.pooled_split else (args.shards or pack_shards(work, env))
    extra = ["--epochs", "1", "--max-steps", str(SMOKE_STEPS)] if args.smoke else []
    extra += ["--threads", str(args.threads)] if args.threads else []
    args.records.mkdir(parents=True, exist_ok=True)
    common = {"hardware": hardware(cpu_family_model=cpu_family_model()), "versions": versions("webdataset"), "harness_code": code,
              "smoke": args.smoke, "variant": variant,
              "test_set": f"a random 1/7 of the pooled 70,000 images (seed {POOLED_SPLIT_SEED})" if variant else "MNIST's 10,000 test images"}
    for preset in args.presets:
        for seed in args.seeds:
            path = args.records / f"{run_name(preset, seed, variant)}.json"
            if path.exists() and not args.force:
                log(f"{preset} seed {seed}: record exists, skipped")
                continue
            run_dir = args.runs / run_name(preset, seed, variant)
            if args.force or args.smoke:
                shutil.rmtree(run_dir, ignore_errors=True)
            log(f"{preset} seed {seed}: training")
            record = {**run_one(preset, seed, shards, run_dir, extra, env), **common}
            path.write_text(json.dumps(record, indent=1) + "\n")
            log(f"{preset} seed {seed}: {100 * record['test_accuracy']:.2f}% in {record['training_seconds']:.0f} s -> {path}")


# --- the table --------------------------------------------------------------------------------------


def load_records(records: Path) -> dict[tuple[str, str], list[dict]]:
    """Records by (preset, variant), in PRESETS order, each variant after its preset's plain runs."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for path in sorted(records.glob("*-seed*.json")):
        record = json.loads(path.read_text())
        groups.setdefault((record["preset"], record.get("variant", "")), []).append(record)
    rank = lambda key: (PRESETS.index(key[0]) if key[0] in PRESETS else len(PRESETS), key)  # noqa: E731
    return {key: sorted(groups[key], key=lambda r: r["seed"]) for key in sorted(groups, key=rank)}


def percent(value: float) -> str:
    return f"{100 * value:.2f}%"


def preset_row(key: tuple[str, str], runs: list[dict]) -> str:
    preset, variant = key
    accuracies = [r["test_accuracy"] for r in runs]
    mean = statistics.fmean(accuracies)
    spread = f"{percent(min(accuracies))}-{percent(max(accuracies))}" + (f", sd {100 * statistics.stdev(accuracies):.2f}" if len(runs) > 1 else "")
    published, _ = PUBLISHED.get(preset, (None, ""))
    bar = published or TARGETS.get(preset)
    verdict = "" if bar is None else (" (at or above)" if mean >= bar - 5e-5 else f" ({100 * (mean - bar):+.2f} points)")
    reference = percent(published) if published else (f"target {percent(bar)}" if bar else "none")
    epochs = sorted({r["epochs_run"] for r in runs})
    return "| " + " | ".join([
        f"`{preset}`" + (" on NeuPy's split (pooled 70,000, random 1/7 for testing)" if variant == POOLED else ""), reference, f"**{percent(mean)}**{verdict}", spread, ", ".join(percent(a) for a in accuracies),
        f"{len(runs)} ({', '.join(str(r['seed']) for r in runs)})",
        percent(statistics.fmean(r["test_accuracy_before_training"] for r in runs)),
        "-".join(map(str, (epochs[0], epochs[-1]) if len(epochs) > 1 else epochs)),
        f"{statistics.fmean(r['training_seconds'] for r in runs):,.0f} s",
        f"{statistics.fmean(r['images_per_s'] for r in runs):,.0f}",
    ]) + " |"


def missing_runs(by_preset: dict[tuple[str, str], list[dict]], seeds=(0, 1, 2)) -> list[str]:
    """The presets' plain runs (seeds 0, 1, 2) that have no record yet, as "PRESET seeds S, ..."."""
    missing = []
    for preset in PRESETS:
        done = {r["seed"] for r in by_preset.get((preset, ""), [])}
        if todo := [str(s) for s in seeds if s not in done]:
            missing.append(f"`{preset}` seed{'s' if len(todo) > 1 else ''} {', '.join(todo)}")
    return missing


def shown(path: Path) -> str:
    """A path as the table names it: relative to the checkout where it lies inside it."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def render_table(by_preset: dict[tuple[str, str], list[dict]], records: Path) -> str:
    runs = [r for rs in by_preset.values() for r in rs]
    smoke = any(r.get("smoke") for r in runs)
    missing = [] if smoke else missing_runs(by_preset)
    cpus = sorted({f"{r['hardware']['cpu_model']} ({r['hardware']['usable_cores']} cores)" for r in runs})
    commits = sorted({(r["harness_code"].get("git_commit") or "unknown")[:7] for r in runs})
    lines = [
        "# Results",
        "",
        f"Generated by `bench/reproduce.py` from the run records in `{shown(records)}/` (one JSON per run);",
        "do not edit by hand. Test accuracy on the 10,000 MNIST test images after training, per",
        "preset over its seeds; every figure here was measured.",
        "",
        f"Hardware: {'; '.join(cpus)}, no GPU (`--device cpu`). Harness commit(s): {', '.join(commits)}."
        + (" **Smoke run: a few steps per preset, not the figures.**" if smoke else ""),
        "",
        *([
            f"**Incomplete: still to be run: {'; '.join(missing)}.** A preset's mean is over the seeds",
            "listed in its row; `bench/reproduce.py` runs only what has no record and regenerates this file.",
            "",
        ] if missing else []),
        "| preset | published | mean | spread | per seed | seeds | before training | epochs | training time per run | images/s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *[preset_row(key, rs) for key, rs in by_preset.items()],
        "",
        *([
            "The row \"on NeuPy's split\" trains and tests as NeuPy's example does: MNIST's 70,000 images",
            f"pooled and split at random (seed {POOLED_SPLIT_SEED}) into 60,000 for training and 10,000 for testing",
            "(`--pooled-split`). The official split's test digits come from writers the training set does",
            "not share; a random split mixes them.",
            "",
        ] if any(variant == POOLED for _, variant in by_preset) else []),
        "Training time is the sum of the epochs' `epoch_seconds` (reading the shards included,",
        "validation excluded) and images/s the images trained per second of it. The machines are",
        "shared: `others_cores_during_run` in each record says how many cores other processes used",
        "meanwhile, so the times are upper bounds for a quiet machine.",
        "",
        "Sources of the published figures:",
        "",
        *[f"- `{p}`: {PUBLISHED[p][1]}" for p in dict.fromkeys(p for p, _ in by_preset) if p in PUBLISHED],
        "",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", type=lambda s: [p for p in s.split(",") if p], default=list(PRESETS))
    parser.add_argument("--seeds", type=lambda s: [int(v) for v in s.split(",")], default=[0, 1, 2])
    parser.add_argument("--records", type=Path, default=ROOT / "docs" / "results", help="one JSON per run (default docs/results/)")
    parser.add_argument("--table", type=Path, default=ROOT / "docs" / "results.md", help="the generated table (default docs/results.md)")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "reproduce", help="run directories (default runs/reproduce/)")
    parser.add_argument("--shards", type=Path, help="packed MNIST to use (default: pack MNIST_DIR into a temporary directory)")
    parser.add_argument("--threads", type=int, default=0, help="--threads of every run (default: the harness's choice)")
    parser.add_argument("--pooled-split", action="store_true",
                        help="train and test on a random 60,000/10,000 split of all 70,000 images, as NeuPy's example evaluates")
    parser.add_argument("--smoke", action="store_true", help=f"{SMOKE_STEPS} steps per run, seed 0 only: the pipeline, not the figures")
    parser.add_argument("--force", action="store_true", help="rerun runs that have a record")
    parser.add_argument("--table-only", action="store_true", help="only regenerate the table from the records")
    parser.add_argument("--live-package", action="store_true", help="run the checkout's harness, not a snapshot")
    return parser


def main() -> int:
    args = build_parser().parse_args()
    unknown = set(args.presets) - set(PRESETS)
    if unknown:
        raise SystemExit(f"error: unknown preset(s) {', '.join(sorted(unknown))} (choose from {', '.join(PRESETS)})")
    if args.smoke:
        args.seeds = args.seeds[:1]
    if not args.table_only:
        with tempfile.TemporaryDirectory(prefix="reproduce-") as work:
            campaign(args, Path(work))
    by_preset = load_records(args.records)
    if not by_preset:
        raise SystemExit(f"error: no records in {args.records}")
    args.table.parent.mkdir(parents=True, exist_ok=True)
    args.table.write_text(render_table(by_preset, args.records))
    log(f"wrote {args.table} ({sum(map(len, by_preset.values()))} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
