#!/usr/bin/env python
"""GPU benchmarks (run by bench/gpu_check.sh): one JSON record on stdout, progress on stderr.

1. variants   `harness train --preset lenet` for 2 epochs in each of several step
              variants (eager, the CUDA graph of PyTorch's kernels or of inductor's,
              torch.compile; fp32 or bf16; deterministic or not):
              samples/s of epoch 2 (epoch 1 includes compiling) and test accuracy.
2. lenet      the lenet preset, 15 epochs, in the fastest variant whose accuracy is
              sane: test accuracy, training-loop seconds (summary's total_seconds:
              validation included, start-up excluded) and the command's wall time.
              Targets: >= 99.2%, <= 2 s.
3. fast       the fast preset as it is (on one GPU: --compile gpu, inductor's kernels in
              the graph) with seeds 0, 1, 2: test accuracy, and training seconds up
              to the end of the first epoch at >= 99.0% (validation excluded).
              Target: mean >= 99.0% in <= 0.15 s.
4. dataloader harness vs an eager loop fed by a torch DataLoader the way
              pytorch/examples/mnist does it (per-sample tensors, normalised on the
              CPU, pinned, copied every step): ratio of samples/s. Target >= 10.
5. bare       harness vs a bare loop in one process (split resident on the device, the
              same model, batch, precision and compile mode), alternated: ratio of
              samples/s, the harness's in its last of 3 epochs, the bare loop's over
              1200 steps after 100 of warm-up. Target >= 1.0. To say where a gap comes
              from: the harness's ms per step in each sync window of that epoch (the
              first holds the epoch's start), and in round 1 the bare loop again with
              the harness's per-step work on the device added (each loss written into a
              window, inside the graph as the harness does, and a host sync every 100
              steps).
6. extras     the fast preset with the plain CUDA graph (--compile auto); how much longer
              the preset's first epoch (as it is) takes than a second one (a two-epoch
              run); then further lenet variants (eager, bf16, torch.compile modes).

Usage: MNIST_DIR=... python bench/bench_gpu.py [--device cuda] [--quick] > gpu.json
`--quick --device cpu` is a smoke run of the script itself on a machine without a GPU.
The script runs itself as a worker for 4 and 5 (`--worker dataloader|bare`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import capture_step, hardware, make_log, median, mnist_dir, versions

log = make_log("gpu")
HERE = Path(__file__).resolve().parent
HARNESS_TIMEOUT = 150  # seconds for one harness run or worker: a bound on what a hang can cost, not an estimate
LENET_TRAIN_FLOP_PER_IMAGE = 3 * 2 * 1_746_000  # forward MACs x 2 FLOP, x3 for forward + backward


PARTS = ("variants", "lenet", "fast", "bare", "dataloader", "later")  # "later": part 6's variants


def harness(shards: Path, run_dir: Path, *args: str, env: dict | None = None) -> dict:
    """`python -m harness train ...` in a fresh process (`env` added to the environment);
    its summary, metrics and wall time."""
    started = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-m", "harness", "train", "--shards", str(shards), "--run-dir", str(run_dir), *args],
                              capture_output=True, text=True, timeout=HARNESS_TIMEOUT, env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired as e:
        log(f"harness {' '.join(args)} timed out after {HARNESS_TIMEOUT} s")
        return {"args": args, "failed": f"timed out after {HARNESS_TIMEOUT} s: {str(e.stderr or '')[-1500:]}", "wall_seconds": HARNESS_TIMEOUT}
    wall = time.perf_counter() - started
    if done.returncode:
        log(f"harness {' '.join(args)} failed:\n{done.stderr[-3000:]}")
        return {"args": args, "failed": done.stderr[-1500:], "wall_seconds": round(wall, 2)}
    summary = json.loads((run_dir / "summary.json").read_text())
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"args": args, "summary": summary, "metrics": metrics, "wall_seconds": round(wall, 2)}


def variant_figures(result: dict) -> dict:
    if "failed" in result:
        return {"failed": result["failed"]}
    metrics = result["metrics"]
    return {
        "samples_per_s": round(metrics[-1]["train_samples_per_s"]),  # the last epoch: compiling done
        "test_accuracy": result["summary"]["test_accuracy"],
        "loop_seconds": round(result["summary"]["total_seconds"], 3),
        "loop_seconds_by_part": result["summary"].get("loop_seconds_by_part"),
        "wall_seconds": result["wall_seconds"],
    }


def seconds_to_accuracy(metrics: list[dict], target: float) -> float | None:
    """Training seconds (validation excluded) up to the end of the first epoch at `target`."""
    total = 0.0
    for m in metrics:
        total += m["epoch_seconds"]
        if m["val_accuracy"] >= target:
            return round(total, 4)
    return None


# ----------------------------------------------------------------------------- workers


WINDOW_STEPS = 13  # fast's 234 steps an epoch are 18 such windows, none across an epoch's end
HARNESS_SYNC_EVERY = 100  # the lenet preset's log_every: steps between the harness's sync points


def window_rates(run_dir: Path) -> list[float]:
    """Each sync window's samples/s, in step order, from the run's TensorBoard scalars."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir))
    events.Reload()
    return [e.value for e in events.Scalars("train/samples_per_s")]


def window_seconds(run_dir: Path, batch: int) -> list[float]:
    """Each WINDOW_STEPS-step sync window's seconds, in step order."""
    return [round(WINDOW_STEPS * batch / rate, 5) for rate in window_rates(run_dir)]


def first_epoch_extra(shards: Path, work: Path, device_args: list[str]) -> dict:
    """The fast preset's first epoch against its second (seed 0, two epochs): how much
    longer the first one takes, which its one-epoch time to 99% pays in full. When that is
    over 10 ms, measured again with CUDA_MODULE_LOADING=EAGER (every kernel loaded at
    start-up), to see whether first kernel launches are the cause, and with a sync point
    every 13 steps, to see where in the epoch the extra goes: at the start (one-off costs,
    or the GPU's clocks still rising) or spread over it."""
    def measure(name: str, env: dict, *extra: str) -> dict:
        log(f"fast preset, 2 epochs, first against second ({name})")
        run_dir = work / f"fast-2ep-{name}"
        result = harness(shards, run_dir, "--preset", "fast", "--epochs", "2", *extra, *device_args, env=env)
        if "failed" in result:
            return {"failed": result["failed"]}
        if len(result["metrics"]) < 2:
            return {"failed": f"{len(result['metrics'])} epoch(s) in metrics.jsonl, not 2"}
        first, second = (m["epoch_seconds"] for m in result["metrics"][:2])
        figures = {"seconds": round(first - second, 4), "epoch_seconds": [round(first, 4), round(second, 4)],
                   "compile_seconds": result["summary"].get("compile_seconds")}
        if extra:
            windows = window_seconds(run_dir, result["summary"]["config"]["batch_size"])
            half = len(windows) // 2
            figures["first_minus_second_by_window"] = [round(a - b, 5) for a, b in zip(windows[:half], windows[half:])]
        return figures

    found = {"lazy": measure("lazy", {})}
    if found["lazy"].get("seconds", 0) > 0.01:
        found["eager_module_loading"] = measure("eager_module_loading", {"CUDA_MODULE_LOADING": "EAGER"})
        found["by_window"] = measure("by_window", {}, "--log-every", str(WINDOW_STEPS))
    return found


def load_mnist(device: str):
    import numpy as np
    import torch

    from harness.data.sources import load_source

    data = load_source(mnist_dir())
    train, test = data.splits["train"], data.splits["test"]
    return (torch.from_numpy(np.ascontiguousarray(train.images)).to(device), torch.from_numpy(train.labels.astype("int64")).to(device),
            test.images, test.labels)


def bare_worker(args) -> dict:
    """The same training step with nothing around it: data resident, permuted on the device."""
    import torch

    from harness.config import load_preset
    from harness.cuda_graph import compile_with_inductor
    from harness.compile_choice import GRAPHED_MODES
    from harness.device import autocast, set_deterministic
    from harness.models import lenet

    preset = load_preset("lenet")
    device = torch.device(args.device)
    set_deterministic(args.deterministic)
    images, labels, _, _ = load_mnist(args.device)
    torch.manual_seed(0)
    model = lenet().to(device)
    graphed = args.compile in GRAPHED_MODES  # the step captured whole, as the harness does
    step_model = torch.compile(model, mode=args.compile) if args.compile and not graphed else model
    fused = {"fused": True} if device.type == "cuda" else {}
    optimizer = torch.optim.SGD(model.parameters(), lr=preset["lr"], momentum=preset["momentum"], **fused)
    batch = preset["batch_size"]
    steps = args.steps
    order = torch.randperm(len(labels), device=device)
    step = torch.zeros((), dtype=torch.int64, device=device)
    offsets = torch.arange(batch, device=device)

    def batch_loss() -> torch.Tensor:
        index = order.index_select(0, (step * batch) % (len(labels) - batch) + offsets)
        x = images.index_select(0, index).unsqueeze(1).float().div_(255)
        with autocast(device, args.precision, cache=not graphed):
            return torch.nn.functional.cross_entropy(step_model(x), labels.index_select(0, index))

    if args.compile == "cuda-graph-inductor":
        batch_loss = compile_with_inductor(batch_loss)

    window = torch.zeros(HARNESS_SYNC_EVERY, device=device)  # --like-harness: the step's losses since the last sync
    slots = torch.arange(HARNESS_SYNC_EVERY, device=device)

    def training_step() -> None:
        loss = batch_loss()
        loss.backward()
        if args.like_harness:  # as GraphedStep writes each loss into the training loop's window
            torch.where(slots == torch.remainder(step, HARNESS_SYNC_EVERY), loss.detach(), window, out=window)
        step.add_(1)
        optimizer.step()

    if graphed:  # the update captured too, reading its lr from the device, as GraphedStep does
        optimizer.param_groups[0]["lr"] = torch.tensor(preset["lr"], dtype=torch.float32, device=device)
        graph = capture_step(training_step, model)

    def run(n: int) -> None:
        for i in range(n):
            if graphed:
                graph.replay()
            else:
                optimizer.zero_grad(set_to_none=True)
                training_step()
            if args.like_harness and (i + 1) % HARNESS_SYNC_EVERY == 0:  # the harness's sync point, at its least
                window.sum().item()

    run(min(steps, 100))  # warm-up (and compile)
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    run(steps)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return {"samples_per_s": steps * batch / (time.perf_counter() - started)}


def dataloader_worker(args) -> dict:
    """pytorch/examples/mnist's way: a Dataset of per-sample tensors normalised on the CPU
    (ToTensor + Normalize), a shuffling DataLoader with a worker and pinned memory, and an
    eager step that copies every batch to the device."""
    import torch
    from torch.utils.data import DataLoader, Dataset

    from harness.config import load_preset
    from harness.models import lenet

    class Mnist(Dataset):
        def __init__(self, images, labels):
            self.images, self.labels = images, labels

        def __len__(self):
            return len(self.labels)

        def __getitem__(self, i):
            x = torch.from_numpy(self.images[i]).float().div(255).sub(0.1307).div(0.3081).unsqueeze(0)
            return x, int(self.labels[i])

    from harness.data.sources import load_source

    data = load_source(mnist_dir()).splits["train"]
    preset = load_preset("lenet")
    device = torch.device(args.device)
    loader = DataLoader(Mnist(data.images, data.labels), batch_size=preset["batch_size"], shuffle=True, num_workers=1,
                        pin_memory=device.type == "cuda")
    torch.manual_seed(0)
    model = lenet().to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=preset["lr"], momentum=preset["momentum"])
    done, started = 0, None
    for i, (x, y) in enumerate(loader):
        if i == 20:  # after the loader's start-up
            if device.type == "cuda":
                torch.cuda.synchronize()
            started, done = time.perf_counter(), 0
        x, y = x.to(device), y.to(device)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        done += len(y)
        if i == 20 + args.steps:
            break
    if device.type == "cuda":
        torch.cuda.synchronize()
    return {"samples_per_s": done / (time.perf_counter() - started)}


def worker(kind: str, device: str, steps: int, compile_mode: str = "", precision: str = "fp32", deterministic: bool = True,
           like_harness: bool = False) -> dict:
    command = [sys.executable, str(HERE / "bench_gpu.py"), "--worker", kind, "--device", device, "--steps", str(steps),
               "--compile", compile_mode, "--precision", precision, "--deterministic" if deterministic else "--no-deterministic",
               *(["--like-harness"] if like_harness else [])]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=HARNESS_TIMEOUT)
    except subprocess.TimeoutExpired:
        return {"failed": f"timed out after {HARNESS_TIMEOUT} s"}
    if done.returncode:
        log(f"worker {kind} failed:\n{done.stderr[-3000:]}")
        return {"failed": done.stderr[-1500:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- the record


def variant_args(name: str) -> list[str]:
    """Step variants by name: eager|compile-MODE, fp32|bf16, det|nondet."""
    how, precision, determinism = name.split("/")
    args = ["--precision", precision, "--deterministic" if determinism == "det" else "--no-deterministic"]
    # eager is --compile '' (the harness's default, auto, would pick the CUDA graph)
    return args + ["--compile", how.removeprefix("compile-") if how.startswith("compile-") else ""]


class Budget:
    """The parts run in order of importance; one that would start after `seconds` is
    skipped (and recorded as skipped), so a slow machine still returns the main figures."""

    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="a smoke run: few steps and variants")
    parser.add_argument("--budget", type=float, default=300, help="seconds; later parts are skipped past it")
    parser.add_argument("--record", type=Path, help="also write the record here after every part")
    parser.add_argument("--parts", default=",".join(PARTS), help="which parts to run, comma-separated (default: all)")
    parser.add_argument("--variant", help="run lenet and the bare loop in this variant (e.g. compile-cuda-graph/fp32/nondet) "
                        "instead of timing the variants first to choose one; the fast preset runs as it is")
    parser.add_argument("--worker", choices=("bare", "dataloader"), help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=600, help=argparse.SUPPRESS)
    parser.add_argument("--compile", default="", help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    parser.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=True, help=argparse.SUPPRESS)
    parser.add_argument("--like-harness", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps((bare_worker if args.worker == "bare" else dataloader_worker)(args)))
        return

    import torch

    from harness.data.pack import pack
    from harness.data.sources import load_source

    budget = Budget(args.budget)
    parts = set(args.parts.split(","))
    if parts - set(PARTS):
        parser.error(f"--parts: unknown {', '.join(sorted(parts - set(PARTS)))} (choose from {', '.join(PARTS)})")
    if args.variant and not re.fullmatch(r"(eager|compile-[a-z-]+)/(fp32|bf16)/(det|nondet)", args.variant):
        parser.error(f"--variant {args.variant!r}: give eager|compile-MODE/fp32|bf16/det|nondet, e.g. compile-cuda-graph/fp32/nondet")
    quick = args.quick
    epochs_variant, epochs_lenet, steps = ("1", "1", 100) if quick else ("2", "15", 1200)
    # The harness's default step, its autotuned (non-deterministic) form and that step of
    # inductor's fused kernels first: they choose the step for the runs after them (on the
    # H200 of docs/gpu-h200-2026-11-26 the autotuned CUDA graph, 1.8x the deterministic
    # one's speed; inductor's kernels had not run). Eager and other options only when time
    # is left at the end.
    names = ([] if args.variant else ["eager/fp32/det"] if quick else
             ["compile-cuda-graph/fp32/det", "compile-cuda-graph/fp32/nondet", "compile-cuda-graph-inductor/fp32/nondet"])
    later = [] if quick or args.variant else ["compile-cuda-graph-inductor/fp32/det", "eager/fp32/det", "eager/fp32/nondet", "compile-reduce-overhead/fp32/det",
                              "compile-cuda-graph/bf16/det", "eager/bf16/det", "compile-default/fp32/det"]
    device_args = ["--device", args.device]
    record: dict = {"benchmark": "bench_gpu", "hardware": hardware(gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None),
                    "versions": versions(nccl=".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None,
                                         cuda=torch.version.cuda),
                    "figures": {}, "skipped": []}
    figures = record["figures"]

    def save() -> None:
        if args.record:
            args.record.write_text(json.dumps(record, indent=1))

    def due(part: str, needs: float) -> bool:
        if budget.left() < needs:
            log(f"skipped {part}: {budget.left():.0f} s of the budget left")
            record["skipped"].append(part)
            return False
        return True

    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        work = Path(tmp)
        shards = work / "shards"
        pack(load_source(mnist_dir()), shards)

        def variant(name: str) -> None:
            log(f"variant {name}")
            result = harness(shards, work / name.replace("/", "_"), "--preset", "lenet", "--epochs", epochs_variant, *device_args, *variant_args(name))
            figures["variants"][name] = variant_figures(result)
            save()

        figures["variants"] = {}
        for name in names if "variants" in parts else []:
            if due(f"variant {name}", 20):
                variant(name)
        sane = {n: v for n, v in figures["variants"].items() if "failed" not in v and v["test_accuracy"] >= (0.9 if quick else 0.98)}
        # Without timed variants: the harness's default on one GPU (--compile auto).
        best = args.variant or (max(sane, key=lambda n: sane[n]["samples_per_s"]) if sane else
                                "eager/fp32/det" if quick else "compile-cuda-graph/fp32/det")
        if "lenet" in parts and due("lenet", 30):
            log(f"lenet, {epochs_lenet} epochs, variant {best}")
            lenet = harness(shards, work / "lenet", "--preset", "lenet", "--epochs", epochs_lenet, *device_args, *variant_args(best))
            figures["lenet"] = {"variant": best, **variant_figures(lenet)}
            if "samples_per_s" in figures["lenet"]:
                rate = figures["lenet"]["samples_per_s"]
                figures["lenet"]["step_ms"] = round(1000 * 100 / rate, 4)  # batch 100
                figures["lenet"]["achieved_tflops"] = round(rate * LENET_TRAIN_FLOP_PER_IMAGE / 1e12, 3)
            save()

        def fast_runs(key: str, compile_args: list[str], fallback: list[str]) -> None:
            """The fast preset, seeds 0-2, into figures[key]; a failed run is retried with the
            options `fallback`, if any (marked compiled_run_failed: its figure is another step's)."""
            figures[key] = {"runs": []}
            for seed in ((0,) if quick else (0, 1, 2)) if "fast" in parts else ():
                if not due(f"{key} seed {seed}", 45):  # inductor's compile: 21-41 s a run on the H200
                    continue
                log(f"{key}: fast preset {' '.join(compile_args) or 'as it is'}, seed {seed}")
                extra = ["--epochs", "1"] if quick else []
                result = harness(shards, work / f"{key}{seed}", "--preset", "fast", "--seed", str(seed), *compile_args, *device_args, *extra)
                if "failed" in result and fallback:  # e.g. no compiler here: the same recipe, with `fallback`
                    log(f"fast preset failed; again with {' '.join(fallback)}")
                    failed = result["failed"]
                    result = harness(shards, work / f"{key}{seed}-fallback", "--preset", "fast", "--seed", str(seed), *fallback, *device_args, *extra)
                    result["compiled_run_failed"] = failed
                if "failed" in result:
                    figures[key]["runs"].append({"seed": seed, "failed": result["failed"]})
                    continue
                figures[key]["runs"].append({
                    "seed": seed, "test_accuracy": result["summary"]["test_accuracy"],
                    "seconds_to_99": seconds_to_accuracy(result["metrics"], 0.99),
                    "epoch_seconds": [round(m["epoch_seconds"], 4) for m in result["metrics"]],
                    "val_accuracy": [m["val_accuracy"] for m in result["metrics"]],
                    "epochs": len(result["metrics"]), "loop_seconds": round(result["summary"]["total_seconds"], 3),
                    "loop_seconds_by_part": result["summary"].get("loop_seconds_by_part"),
                    "compile_seconds": result["summary"].get("compile_seconds"), "wall_seconds": result["wall_seconds"],
                    "config": {k: result["summary"]["config"][k] for k in ("batch_size", "lr", "epochs", "batch_norm", "compile", "precision", "deterministic")},
                    **({"compiled_run_failed": result["compiled_run_failed"]} if "compiled_run_failed" in result else {}),
                })
                ok = [r for r in figures[key]["runs"] if "failed" not in r]
                figures[key]["mean_test_accuracy"] = sum(r["test_accuracy"] for r in ok) / len(ok) if ok else None
                figures[key]["median_seconds_to_99"] = median([r["seconds_to_99"] for r in ok])  # of the runs that reached 99%
                figures[key]["runs_reaching_99"] = f"{sum(r['seconds_to_99'] is not None for r in ok)} of {len(ok)}"
                save()

        fast_runs("fast", [], fallback=["--compile", "auto"])  # as the preset is: --compile gpu

        if "dataloader" in parts and due("DataLoader loop", 20):
            log("DataLoader loop")
            loader = worker("dataloader", args.device, 100 if quick else 400)
            harness_rate = figures["variants"].get(best, {}).get("samples_per_s") or figures.get("lenet", {}).get("samples_per_s")
            figures["harness_vs_dataloader"] = {
                "dataloader_samples_per_s": round(loader.get("samples_per_s", 0)), "harness_samples_per_s": harness_rate,
                "ratio": round(harness_rate / loader["samples_per_s"], 1) if harness_rate and "samples_per_s" in loader else None,
            }
            save()

        how, precision, determinism = best.split("/")
        compile_mode = how.removeprefix("compile-") if how.startswith("compile-") else ""
        rounds = []
        figures["harness_vs_bare"] = {"variant": best, "rounds": rounds}
        for r in range(1 if quick else 2) if "bare" in parts else ():
            if not due(f"harness vs bare, round {r + 1}", 75):  # two processes took 48-53 s on the H200; round 1 runs three
                break
            log(f"harness vs bare loop, round {r + 1}")
            # The harness's last epoch (as the variants): the first includes one-off costs
            # (first launches, the resident split's copy) that the bare loop's warm-up hides.
            h = harness(shards, work / f"ab{r}", "--preset", "lenet", "--epochs", "1" if quick else "3", *device_args, *variant_args(best))
            b = worker("bare", args.device, steps, compile_mode, precision, determinism == "det")
            like = worker("bare", args.device, steps, compile_mode, precision, determinism == "det", like_harness=True) if r == 0 else {}
            if "failed" not in h and "failed" not in b:
                rate = h["metrics"][-1]["train_samples_per_s"]
                steps_per_epoch = -(-h["metrics"][-1]["step"] // len(h["metrics"]))
                per_epoch = max(1, -(-steps_per_epoch // HARNESS_SYNC_EVERY))  # its sync windows (lenet: 600 steps, 6)
                windows = [round(1e3 * 100 / w, 4) for w in window_rates(work / f"ab{r}")[-per_epoch:]]  # batch 100
                rounds.append({"harness": round(rate), "bare": round(b["samples_per_s"]), "ratio": round(rate / b["samples_per_s"], 3),
                               "harness_ms_per_step_by_window": windows, "bare_ms_per_step": round(1e3 * 100 / b["samples_per_s"], 4),
                               **({"bare_like_harness": round(like["samples_per_s"])} if "samples_per_s" in like else
                                  {"bare_like_harness_failed": like["failed"]} if "failed" in like else {})})
            figures["harness_vs_bare"]["median_ratio"] = median([r["ratio"] for r in rounds])
            save()

        # Part 6: what is left of the budget. The fast preset with the plain CUDA graph,
        # which needs no compile at start-up, for the price of inductor's kernels.
        fast_runs("fast_cuda_graph", ["--compile", "auto"], fallback=[])
        if "fast" in parts and not quick and due("fast's first-epoch extra", 90):  # up to 3 runs, each compiling
            figures["fast"]["first_epoch_extra"] = first_epoch_extra(shards, work, device_args)
            save()
        for name in later if "later" in parts else []:
            if due(f"variant {name}", 30):
                variant(name)
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
