#!/usr/bin/env python
"""Benchmark: the harness's block-shard loader and training loop against simple baselines.

Prints ONE JSON record on stdout (progress goes to stderr):

1. loader     images/s of `MacroBatchStream` reading the train split from block
              shards (full epochs of macro-batches on the CPU, permutation included),
              against images/s of a one-image-per-member webdataset read with
              `webdataset.WebDataset(url, shardshuffle=False).decode()` and stacked
              into arrays. Ratio target: >= 100.
2. train      `harness train` (the real CLI, in a fresh subprocess) against a bare
              in-memory PyTorch loop (also a fresh subprocess) with the same model,
              batch, normalisation, optimizer and torch thread count, alternated
              over several rounds; medians and the ratio harness/bare.
              Ratio target: >= 0.95. Presets: lenet (batch 100) and neupy-mlp (batch 128).

Timings on a shared 2-core machine are noisy, so every figure is a median over
interleaved A/B repetitions and the headline numbers are ratios from one run.

Usage:
    MNIST_DIR=/path/to/mnist python bench/bench_loader_and_train.py [--quick] > result.json

The script also runs itself as the bare-loop worker (`--bare-worker`); that
mode is internal.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import (CLEAN_CORES, OthersGauge, cpu_jiffies, hardware, harness_code, loadavg, make_log, median,
                    mnist_dir, versions)

TRAIN_PRESETS = ("lenet", "neupy-mlp")
SEED = 0

log = make_log("bench")


# ----------------------------------------------------------------------------- contention


def others_busy_cores(seconds: float = 1.0) -> float | None:
    """CPU cores kept busy by other processes while this one sleeps (a contention gauge)."""
    try:
        total0, idle0 = cpu_jiffies()
        time.sleep(seconds)
        total1, idle1 = cpu_jiffies()
    except (OSError, IndexError, ValueError):
        return None
    total = total1 - total0
    return round((total - (idle1 - idle0)) / total * (os.cpu_count() or 1), 2) if total else None


QUIET = {"wait_s": 0.0, "threshold_cores": 0.3}


def contention() -> dict:
    """Measure (and, with --quiet-wait-s, wait up to that long for) other processes' CPU use."""
    started = time.perf_counter()
    busy = others_busy_cores()
    while busy is not None and busy > QUIET["threshold_cores"] and time.perf_counter() - started < QUIET["wait_s"]:
        busy = others_busy_cores()
    return {"others_busy_cores_before": busy, "waited_s": round(time.perf_counter() - started, 1), "loadavg_1m": loadavg()[0]}


# ----------------------------------------------------------------------------- 1. loader


def write_per_image_shards(images, labels, out_dir: Path, per_shard: int) -> list[str]:
    """One webdataset sample per image: `{key}.npy` (uint8 [28, 28]) + `{key}.cls`."""
    import webdataset as wds

    out_dir.mkdir(parents=True)
    urls = []
    for shard_no, first in enumerate(range(0, len(labels), per_shard)):
        path = out_dir / f"train-{shard_no:06d}.tar"
        with wds.TarWriter(str(path)) as writer:
            for i in range(first, min(first + per_shard, len(labels))):
                writer.write({"__key__": f"train-{i:08d}", "npy": images[i], "cls": int(labels[i])})
        urls.append(str(path))
    return urls


def read_per_image(urls: list[str]) -> tuple[int, float]:
    """Read every sample with plain webdataset decoding and stack into arrays."""
    import numpy as np
    import webdataset as wds

    started = time.perf_counter()
    images, labels = [], []
    for sample in wds.WebDataset(urls, shardshuffle=False).decode():
        images.append(sample["npy"])
        labels.append(sample["cls"])
    images, labels = np.stack(images), np.asarray(labels, dtype=np.uint8)
    seconds = time.perf_counter() - started
    assert images.shape[1:] == (28, 28) and len(labels) == len(images)
    return len(labels), seconds


def loader_epoch(make_stream, epoch: int) -> tuple[int, float]:
    """One full epoch of macro-batches: shard reads, block assembly, permutation.

    A fresh stream every epoch: a stream whose split fits one macro-batch keeps the
    decoded blocks after its first epoch, and this measures reading the shards.
    """
    started = time.perf_counter()
    images = 0
    for macro in make_stream().epoch(epoch):
        # A resident split (one macro-batch holds it all) keeps every image on the device and
        # orders whole global batches of it: the order may be shorter than the split.
        assert macro.images.dtype.itemsize == 1 and len(macro.order) <= len(macro.labels)
        images += len(macro.order)  # one rank: its order covers whole global batches
    return images, time.perf_counter() - started


def bench_loader(dataset, shard_dir: Path, work: Path, quick: bool) -> dict:
    import torch

    from harness.data.shard_set import ShardSplit
    from harness.data.stream import MacroBatchStream

    torch.set_num_threads(2)
    rounds = 2 if quick else 3
    epochs_per_round = 3 if quick else 5
    subset = 5000 if quick else 20000
    per_shard = 10000
    global_batch, macro_batch = 64, 60000

    started = time.perf_counter()
    split = ShardSplit(shard_dir, "train")  # verifies every shard's size and SHA-256 (one-off per run)
    open_seconds = time.perf_counter() - started
    make_stream = lambda: MacroBatchStream(split, global_batch, macro_batch, SEED, torch.device("cpu"))  # noqa: E731

    train = dataset.splits["train"]
    started = time.perf_counter()
    urls = write_per_image_shards(train.images[:subset], train.labels[:subset], work / "per_image", per_shard)
    write_seconds = time.perf_counter() - started
    per_image_bytes = sum(Path(u).stat().st_size for u in urls)

    loader_epoch(make_stream, 10_000)  # warm-up: page cache, imports, allocator (not recorded)
    read_per_image(urls[:1])

    rows, epoch = [], 0
    for r in range(rounds):
        row = {"round": r + 1, "loader_epochs": [], **contention()}
        # Alternate which side goes first, so slow drift of the machine hits both.
        order = ("loader", "per_image") if r % 2 == 0 else ("per_image", "loader")
        for side in order:
            if side == "loader":
                with OthersGauge() as others:
                    for _ in range(epochs_per_round):
                        n, s = loader_epoch(make_stream, epoch)
                        epoch += 1
                        row["loader_epochs"].append({"images": n, "seconds": s, "images_per_s": n / s})
                row["loader_others_cores_during"] = others.cores
            else:
                with OthersGauge() as others:
                    n, s = read_per_image(urls)
                row["per_image"] = {"images": n, "seconds": s, "images_per_s": n / s, "others_cores_during": others.cores}
        row["loader_images_per_s_median"] = median([e["images_per_s"] for e in row["loader_epochs"]])
        row["ratio"] = row["loader_images_per_s_median"] / row["per_image"]["images_per_s"]
        rows.append(row)
        log(f"loader round {r + 1}/{rounds}: blocks {row['loader_images_per_s_median']:,.0f} img/s, "
            f"per-image {row['per_image']['images_per_s']:,.0f} img/s, ratio {row['ratio']:.0f}")

    loader_rate = median([e["images_per_s"] for row in rows for e in row["loader_epochs"]])
    per_image_rate = median([row["per_image"]["images_per_s"] for row in rows])
    ratio = loader_rate / per_image_rate
    return {
        "block_loader": {
            "images_per_s_median": loader_rate,
            "epoch_seconds_median": median([e["seconds"] for row in rows for e in row["loader_epochs"]]),
            "images_per_epoch": rows[0]["loader_epochs"][0]["images"],
            "timed": "MacroBatchStream.epoch(e) of a fresh stream on device cpu over a full epoch: read the 6 train shards "
                     "(harness.data.blocks: plain tar, strict .npy decoding), permute shards and blocks, assemble the "
                     "macro-batch (here the resident split), torch.from_numpy, seeded order; images counted = steps*batch",
            "one_off_shard_split_open_seconds": open_seconds,
            "one_off_note": "ShardSplit() verifies sizes and SHA-256 of every train shard once per run; not in the epoch time",
            "global_batch": global_batch,
            "macro_batch": macro_batch,
            "block_size": dataset_block_size(shard_dir),
        },
        "per_image_webdataset": {
            "images_per_s_median": per_image_rate,
            "images_read_per_round": subset,
            "member_format": "npy (uint8 28x28 via np.save) + cls; no image codec",
            "images_per_shard": per_shard,
            "bytes_on_disk": per_image_bytes,
            "write_seconds": write_seconds,
            "timed": "webdataset.WebDataset(urls, shardshuffle=False).decode() over every sample, "
                     "then np.stack of images and np.asarray of labels",
        },
        "ratio_loader_over_per_image": ratio,
        "ratio_median_of_rounds": median([row["ratio"] for row in rows]),
        "target": ">= 100",
        "meets_target": ratio >= 100,
        "rounds": rows,
    }


def dataset_block_size(shard_dir: Path) -> int:
    return json.loads((shard_dir / "manifest.json").read_text())["splits"]["train"]["block_size"]


# ----------------------------------------------------------------------------- 2. training


OMP_WAIT_POLICY = {"value": "PASSIVE"}
SNAPSHOT = {"root": None}


def child_env(threads: int) -> dict:
    env = dict(os.environ)
    # Same OpenMP settings for both children; torch.set_num_threads(threads) in both.
    env["OMP_NUM_THREADS"] = str(threads)
    env["MKL_NUM_THREADS"] = str(threads)
    if OMP_WAIT_POLICY["value"] != "inherit":
        env["OMP_WAIT_POLICY"] = OMP_WAIT_POLICY["value"]
    if SNAPSHOT["root"]:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [SNAPSHOT["root"], env.get("PYTHONPATH")]))
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    env.pop("LOCAL_RANK", None)
    env.pop("LOCAL_WORLD_SIZE", None)
    return env


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def children_faults() -> int:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt


def timed_child(command: list[str], threads: int, what: str) -> tuple[subprocess.CompletedProcess, float, float, dict]:
    """Run one timed child process: its result, wall and CPU seconds, and the contention
    and page faults around it. A failed child stops the benchmark."""
    gauge = contention()
    cpu0, faults0 = children_cpu(), children_faults()
    started = time.perf_counter()
    with OthersGauge() as others:
        done = subprocess.run(command, env=child_env(threads), capture_output=True, text=True, cwd=SNAPSHOT["root"] or None)
    wall = time.perf_counter() - started
    cpu = children_cpu() - cpu0
    gauge["others_cores_during_run"] = others.cores
    gauge["process_minor_page_faults"] = children_faults() - faults0
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done, wall, cpu, gauge


def run_harness(preset: str, shard_dir: Path, run_dir: Path, steps: int, threads: int, epochs: int = 1) -> dict:
    """`harness train` for `epochs` epochs of `steps` steps (steps < an epoch only with epochs == 1)."""
    command = [
        sys.executable, "-m", "harness", "train",
        "--preset", preset, "--shards", str(shard_dir), "--run-dir", str(run_dir),
        "--epochs", str(epochs), "--max-steps", str(steps * epochs), "--threads", str(threads), "--device", "cpu",
        "--seed", str(SEED),
    ]
    done, wall, cpu, gauge = timed_child(command, threads, "harness train")
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    summary = json.loads((run_dir / "summary.json").read_text())
    last = metrics[-1]
    if last["step"] != steps * epochs or len(metrics) != epochs:
        raise RuntimeError(f"harness ran {last['step']} steps in {len(metrics)} epochs, expected {steps * epochs} in {epochs}")
    seconds = sum(m["epoch_seconds"] for m in metrics)
    batch = train_settings(preset)["batch_size"]
    return {
        "steps": last["step"],
        "epochs": epochs,
        "seconds": seconds,
        "samples_per_s": last["step"] * batch / seconds,
        "epoch_seconds": [m["epoch_seconds"] for m in metrics],
        "epoch_samples_per_s": [m["train_samples_per_s"] for m in metrics],
        "train_loss": last["train_loss"],
        "threads_per_rank": summary.get("threads_per_rank"),
        "process_wall_seconds": wall,
        "process_cpu_seconds": cpu,
        "process_total_seconds_reported": summary.get("total_seconds"),
        **gauge,
    }


def run_bare(preset: str, steps: int, threads: int, epochs: int = 1) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--bare-worker", preset, "--steps", str(steps),
               "--epochs", str(epochs), "--threads", str(threads)]
    done, wall, cpu, gauge = timed_child(command, threads, "bare loop")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result.update({"process_wall_seconds": wall, "process_cpu_seconds": cpu, **gauge})
    return result


def bare_worker(preset: str, steps: int, threads: int, epochs: int = 1) -> None:
    """A bare in-memory loop: randperm, slice, forward/backward/step, nothing else."""
    import torch
    import torch.nn.functional as F

    from harness.config import TrainConfig, load_preset
    from harness.data.pack import pixel_statistics
    from harness.data.sources import load_source
    from harness.models import lenet, mlp
    from harness.normalize import Normalizer

    torch.set_num_threads(threads)
    config = TrainConfig(**load_preset(preset))
    if config.loss != "cross_entropy":
        raise SystemExit(f"bare loop supports cross_entropy presets only ({preset} uses {config.loss})")

    prep_started = time.perf_counter()
    train = load_source(mnist_dir()).splits["train"]
    # Whole training set normalised once, in memory, exactly as the harness's
    # Normalizer does it per batch (same statistics as the manifest's train_stats).
    stats = pixel_statistics(train.images)
    x_all = Normalizer(config.normalize, stats, torch.device("cpu"))(torch.tensor(train.images)).contiguous()
    y_all = torch.tensor(train.labels).long()
    prep_seconds = time.perf_counter() - prep_started

    torch.manual_seed(config.seed)
    model = lenet() if config.model == "lenet" else mlp(config.hidden, config.activation, config.output_activation)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                nesterov=config.nesterov, weight_decay=config.weight_decay)
    batch = config.batch_size
    if steps * batch > len(y_all):
        raise SystemExit(f"{steps} steps of {batch} exceed one epoch of {len(y_all)} images")

    started, cpu_started = time.perf_counter(), time.process_time()
    epoch_seconds = []
    for _ in range(epochs):
        epoch_started = time.perf_counter()
        perm = torch.randperm(len(y_all))
        for i in range(steps):
            index = perm[i * batch : (i + 1) * batch]
            loss = F.cross_entropy(model(x_all[index]), y_all[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        epoch_seconds.append(time.perf_counter() - epoch_started)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    print(json.dumps({
        "epochs": epochs,
        "epoch_seconds": epoch_seconds,
        "epoch_samples_per_s": [steps * batch / e for e in epoch_seconds],
        "timed_cpu_seconds": cpu_seconds,
        "harness_imported_from": str(Path(sys.modules["harness"].__file__).parent),
        "steps": steps * epochs,
        "seconds": seconds,
        "samples_per_s": steps * epochs * batch / seconds,
        "last_loss": loss.item(),
        "threads": torch.get_num_threads(),
        "prep_seconds_untimed": prep_seconds,
    }))


def train_settings(preset: str) -> dict:
    from harness.config import TrainConfig, load_preset

    config = TrainConfig(**load_preset(preset))
    return {k: getattr(config, k) for k in ("model", "hidden", "normalize", "loss", "batch_size", "lr", "momentum", "nesterov", "weight_decay", "macro_batch")}


def bench_train(preset: str, shard_dir: Path, work: Path, quick: bool, rounds: int, budget_s: float, threads: int, epochs: int) -> dict:
    settings = train_settings(preset)
    batch = settings["batch_size"]
    epoch_steps = 60000 // batch
    steps = min(100, epoch_steps) if quick else epoch_steps
    epochs = 1 if quick else epochs

    # Warm-up (not recorded): file cache, .pyc, and an estimate of the step rate for the budget.
    log(f"{preset}: warm-up runs")
    warm_h = run_harness(preset, shard_dir, work / f"{preset}-warm", 30, threads)
    warm_b = run_bare(preset, 30, threads)
    per_step = max(batch / warm_b["samples_per_s"], batch / warm_h["samples_per_s"])
    overhead = (warm_h["process_wall_seconds"] - warm_h["seconds"]) + (warm_b["process_wall_seconds"] - warm_b["seconds"])
    capped = False
    if not quick:
        estimate = rounds * (overhead + 2 * epochs * steps * per_step)
        fit = int((budget_s / rounds - overhead) / (2 * per_step))  # steps per run that fit the budget
        if estimate > budget_s:
            planned = f"{epochs} epoch(s) of {steps} steps"
            epochs = max(1, min(epochs, fit // steps))
            if epochs == 1:
                steps = max(100, min(steps, fit))
            capped = True
            log(f"{preset}: {planned} x {rounds} rounds would take ~{estimate:.0f} s (> budget {budget_s:.0f} s); "
                f"using {epochs} epoch(s) of {steps} steps")

    rows = []
    for r in range(rounds):
        order = ("harness", "bare") if r % 2 == 0 else ("bare", "harness")
        row = {"round": r + 1, "order": list(order)}
        for side in order:
            if side == "harness":
                row["harness"] = run_harness(preset, shard_dir, work / f"{preset}-run{r}", steps, threads, epochs)
            else:
                row["bare"] = run_bare(preset, steps, threads, epochs)
        row["ratio"] = row["harness"]["samples_per_s"] / row["bare"]["samples_per_s"]
        rows.append(row)
        log(f"{preset} round {r + 1}/{rounds}: harness {row['harness']['samples_per_s']:,.0f} img/s, "
            f"bare {row['bare']['samples_per_s']:,.0f} img/s, ratio {row['ratio']:.3f} (other processes used "
            f"{row['harness']['others_cores_during_run']} / {row['bare']['others_cores_during_run']} cores)")

    harness_rate = median([row["harness"]["samples_per_s"] for row in rows])
    bare_rate = median([row["bare"]["samples_per_s"] for row in rows])
    ratio = harness_rate / bare_rate

    def clean(side):
        return [row[side]["samples_per_s"] for row in rows
                if row[side].get("others_cores_during_run") is not None and row[side]["others_cores_during_run"] <= CLEAN_CORES]

    clean_h, clean_b = clean("harness"), clean("bare")
    clean_stats = {
        "definition": f"runs during which other processes used <= {CLEAN_CORES} cores on average (others_cores_during_run)",
        "harness_runs": len(clean_h),
        "bare_runs": len(clean_b),
        "harness_samples_per_s_median": median(clean_h),
        "bare_samples_per_s_median": median(clean_b),
        "ratio_harness_over_bare": median(clean_h) / median(clean_b) if clean_h and clean_b else None,
    }
    return {
        "settings": {**settings, "steps_per_epoch": steps, "epochs_per_run": epochs, "steps_per_full_epoch": epoch_steps,
                     "full_epoch": steps == epoch_steps,
                     "steps_capped_by_budget": capped, "budget_s": budget_s, "threads": threads, "rounds": rounds,
                     "warmup_step_seconds_estimate": per_step},
        "harness_samples_per_s_median": harness_rate,
        "bare_samples_per_s_median": bare_rate,
        "ratio_harness_over_bare": ratio,
        "ratio_median_of_rounds": median([row["ratio"] for row in rows]),
        "clean_runs_only": clean_stats,
        "minor_page_faults_median": {
            side: median([row[side]["process_minor_page_faults"] for row in rows]) for side in ("harness", "bare")
        },
        "minor_page_faults_note": "whole process (start-up and data loading included); see bench/README.md",
        "others_cores_during_runs": [
            [row[side].get("others_cores_during_run") for side in ("harness", "bare")] for row in rows
        ],
        "target": ">= 0.95",
        "meets_target": ratio >= 0.95,
        "harness_timed": (
            "sum of metrics.jsonl epoch_seconds of `python -m harness train --epochs E --max-steps E*STEPS` in a fresh "
            "process. Each epoch's time covers reading the train shards and assembling the 60,000-image macro-batch "
            "(always the whole epoch's, even when STEPS is less than an epoch), its permutation, STEPS optimizer steps "
            "with per-batch uint8->float normalisation, loss bookkeeping and a loss sync + TensorBoard scalars every "
            "log_every steps. Excludes process start, shard hash verification, test-set load, the per-epoch validation "
            "and checkpoint, and run outputs (process_wall_seconds includes them). samples_per_s = E*STEPS*batch/seconds."
        ),
        "bare_timed": (
            "fresh process, E times: torch.randperm(60000), then STEPS x (index slice, gather from a float tensor "
            "normalised once before timing, forward, cross_entropy, zero_grad, backward, SGD step). Excludes process "
            "start, IDX load and the one-off normalisation (prep_seconds_untimed). samples_per_s = E*STEPS*batch/seconds."
        ),
        "rounds": rows,
    }


# ----------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short smoke run: fewer rounds, 100 training steps, 5k per-image reads")
    parser.add_argument("--presets", default=",".join(TRAIN_PRESETS), help="training presets to compare (default lenet,neupy-mlp; '' skips training)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="alternated harness/bare rounds per preset (default: lenet 4, neupy-mlp 6; quick 2)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in both training processes (default 2)")
    parser.add_argument("--budget-s", type=float, default=840.0,
                        help="whole-run target in seconds (default 840); training steps are reduced below a full epoch "
                             "when the warm-up estimate says full epochs would not fit, and the JSON says so")
    parser.add_argument("--quiet-wait-s", type=float, default=0.0,
                        help="before each timed run, wait up to this long for other processes to use < 0.3 cores "
                             "(default 0: only measure and record the contention)")
    parser.add_argument("--omp-wait-policy", default="PASSIVE", choices=("PASSIVE", "ACTIVE", "inherit"),
                        help="OMP_WAIT_POLICY for both training processes (default PASSIVE: on a shared 2-core machine "
                             "the default spinning policy made 2-thread steps up to 30x slower whenever another "
                             "process held a core, which swamps the A/B comparison); 'inherit' leaves it as it is")
    parser.add_argument("--live-package", action="store_true",
                        help="run the checkout's harness as it is instead of a snapshot copied at start "
                             "(the snapshot keeps concurrent edits from changing the code between A/B runs)")
    parser.add_argument("--skip-loader", action="store_true", help="skip the loader comparison")
    parser.add_argument("--bare-worker", metavar="PRESET", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--epochs", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--epochs-per-run", type=int, default=None,
                        help="full epochs per timed run (default: lenet 1, neupy-mlp 3, whose epoch is only a few seconds; "
                             "quick: 1 epoch cut to 100 steps)")
    args = parser.parse_args()

    if args.bare_worker:
        bare_worker(args.bare_worker, args.steps, args.threads, args.epochs)
        return 0

    source_dir = mnist_dir()
    QUIET["wait_s"] = args.quiet_wait_s
    OMP_WAIT_POLICY["value"] = args.omp_wait_policy
    if args.omp_wait_policy != "inherit" and "torch" not in sys.modules:
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy  # this process too, before torch loads OpenMP
    with tempfile.TemporaryDirectory(prefix="bench-loader-train-") as tmp:
        work = Path(tmp)
        code, SNAPSHOT["root"] = harness_code(work, args.live_package)
        record = run_all(args, source_dir, work, code)
    log(f"done in {record['wall_seconds']:.0f} s: {json.dumps(record['summary'])}")
    print(json.dumps(record, indent=1, default=str))
    return 0


def run_all(args, source_dir: Path, work: Path, code: dict) -> dict:
    started = time.perf_counter()
    record = {
        "bench": "loader_and_train",
        "started_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "hardware": hardware(gpu="none used (device cpu)"),
        "versions": versions("webdataset"),
        "harness_code": code,
        "settings": {
            "quick": args.quick,
            "mnist_dir": str(source_dir),
            "threads": args.threads,
            "child_env": {k: v for k, v in child_env(args.threads).items() if k.startswith(("OMP_", "MKL_", "GOMP_", "KMP_", "MALLOC_", "LD_PRELOAD"))},
            "seed": SEED,
            "budget_s": args.budget_s,
            "quiet_wait_s": args.quiet_wait_s,
            "contention_note": "others_busy_cores_before: CPU cores other processes used in the 1 s before a timed run; "
                               "others_cores_during_run: their average over the run (0 = quiet machine; this machine "
                               "has 2). Runs under contention are slower and noisier; clean_runs_only keeps the quiet ones.",
        },
        "loadavg_start": loadavg(),
        "figures": {},
    }
    presets = [p for p in args.presets.split(",") if p]
    default_rounds = {"lenet": 4, "neupy-mlp": 6}
    default_epochs = {"lenet": 1, "neupy-mlp": 3}

    from harness.data.pack import pack
    from harness.data.sources import load_source

    log(f"loading {source_dir} and packing block shards into {work}")
    dataset = load_source(source_dir)
    pack_started = time.perf_counter()
    pack(dataset, work / "shards")
    record["settings"]["pack_seconds"] = time.perf_counter() - pack_started
    shard_dir = work / "shards"

    if not args.skip_loader:
        log("loader: block shards vs one image per member")
        record["figures"]["loader"] = bench_loader(dataset, shard_dir, work, args.quick)
    del dataset

    # Budget for training: what is left, split by the presets' expected cost (LeNet dominates);
    # a preset that finishes early leaves its unused time to the ones after it.
    weights = {"lenet": 0.7, "neupy-mlp": 0.3}
    record["figures"]["train"] = {}
    for i, preset in enumerate(presets):
        left = args.budget_s - (time.perf_counter() - started)
        share = max(60.0, left * weights.get(preset, 0.3) / sum(weights.get(p, 0.3) for p in presets[i:]))
        rounds = args.rounds or (2 if args.quick else default_rounds.get(preset, 3))
        epochs = args.epochs_per_run or default_epochs.get(preset, 1)
        record["figures"]["train"][preset] = bench_train(preset, shard_dir, work, args.quick, rounds, share, args.threads, epochs)

    record["loadavg_end"] = loadavg()
    record["wall_seconds"] = time.perf_counter() - started
    summary = {}
    if "loader" in record["figures"]:
        summary["loader_over_per_image"] = record["figures"]["loader"]["ratio_loader_over_per_image"]
    for preset, figures in record["figures"]["train"].items():
        summary[f"{preset}_harness_over_bare"] = figures["ratio_harness_over_bare"]
        summary[f"{preset}_harness_over_bare_clean_runs"] = figures["clean_runs_only"]["ratio_harness_over_bare"]
    record["summary"] = summary
    return record


if __name__ == "__main__":
    sys.exit(main())
