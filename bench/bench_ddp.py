#!/usr/bin/env python
"""Benchmark: what data-parallel training with 2 processes (gloo, CPU) buys over 1 process.

Prints ONE JSON record on stdout (progress goes to stderr):

1. throughput  End-to-end `train_samples_per_s` of the real harness, 1 process vs 2
               processes: `python -m harness.train --preset P ... --device cpu` as a plain
               process and under `python -m torch.distributed.run --standalone
               --nproc-per-node=2 -m harness.train ...`, each in a fresh process, with the
               harness's own thread choice (1 process: 2 threads; 2 processes: 1 each).
               Rounds alternate the order (1-2, 2-1, ...); medians of each side and the
               ratio 2proc/1proc of the medians, every run recorded.
               Presets: lenet (global batch 100) and neupy-mlp (global batch 128).
2. breakdown   Per-step time of the same pieces the harness uses (build_model,
               MacroBatchStream + ShardSplit, Normalizer, SGD, DDP when world size > 1,
               threads chosen by harness.distributed.choose_threads), measured by this
               script's `--worker` mode launched the same way (plain process for world
               size 1, torchrun with 2 processes for world size 2): waiting for data
               (slice of the global batch + normalisation; macro-batch assembly amortised
               separately), forward+backward, all-reduce, optimizer step. DDP overlaps
               the gradient all-reduce with backward, so the exposed all-reduce is
               (DDP fwd+bwd) - (fwd+bwd inside ddp.no_sync()), from interleaved blocks
               of both; the raw time of one dist.all_reduce of a flat float32 tensor
               the size of all gradients is reported beside it.

Timings on a shared 2-core machine are noisy: quote the ratios from one run, and look
at `others_cores_during_run` and the load averages before trusting a figure.

Usage:
    MNIST_DIR=/path/to/mnist python bench/bench_ddp.py [--quick] > result.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import CLEAN_CORES, OthersGauge, hardware, harness_code, loadavg, make_log, median, mnist_dir, versions

PRESETS = ("lenet", "neupy-mlp")
# --max-steps of each harness run (full run): ~7 s of LeNet steps, one whole neupy-mlp epoch.
DEFAULT_STEPS = {"lenet": 300, "neupy-mlp": 468}
QUICK_STEPS = 50
SEED = 0

log = make_log("bench_ddp")


def gloo_available() -> bool:
    import torch

    return torch.distributed.is_available() and torch.distributed.is_gloo_available()


# ----------------------------------------------------------------------------- child processes


SETTINGS = {"omp_wait_policy": "PASSIVE", "snapshot_root": None, "timeout_s": 300.0}
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                 "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT")


def child_env() -> dict:
    """The environment of every run. OMP_NUM_THREADS/MKL_NUM_THREADS are removed so the
    launchers' defaults apply, as for a user who sets neither: torchrun exports
    OMP_NUM_THREADS=1 for 2 ranks, a plain process leaves OpenMP at its default (all
    cores). The harness then picks torch threads itself (cores / local ranks)."""
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", *LAUNCHER_VARS):
        env.pop(name, None)
    if SETTINGS["omp_wait_policy"] != "inherit":
        env["OMP_WAIT_POLICY"] = SETTINGS["omp_wait_policy"]
    if SETTINGS["snapshot_root"]:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [SETTINGS["snapshot_root"], env.get("PYTHONPATH")]))
    return env


def launcher(nproc: int) -> list[str]:
    if nproc == 1:
        return [sys.executable]
    # --standalone: a local c10d rendezvous on a free port that torchrun picks itself.
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]


def run_child(command: list[str], what: str) -> dict:
    """Run a command in its own session; on timeout kill its whole process group (torchrun
    and its ranks), so no rank outlives the benchmark."""
    env = child_env()
    loads = loadavg()
    started = time.perf_counter()
    with OthersGauge() as others:
        proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                cwd=SETTINGS["snapshot_root"] or None, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=SETTINGS["timeout_s"])
        except BaseException as e:  # timeout or Ctrl-C: end the run's process group, then re-raise
            for sig in (signal.SIGTERM, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)
                try:
                    proc.communicate(timeout=10)
                    break
                except subprocess.TimeoutExpired:
                    continue
            if isinstance(e, subprocess.TimeoutExpired):
                raise RuntimeError(f"{what} took longer than --timeout {SETTINGS['timeout_s']:g} s and was killed "
                                   f"with its process group: {' '.join(command)}") from None
            raise
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {proc.returncode}): {' '.join(command)}\n"
                           f"--- stdout ---\n{out[-3000:]}\n--- stderr ---\n{err[-4000:]}")
    return {"stdout": out, "stderr": err, "process_wall_seconds": round(wall, 3),
            "others_cores_during_run": others.cores, "loadavg_before": loads}


def omp_note_from_torchrun(stderr: str) -> bool:
    return "Setting OMP_NUM_THREADS environment variable for each process to be 1" in stderr


# ----------------------------------------------------------------------------- 1. end-to-end throughput


def preset_settings(preset: str) -> dict:
    from harness.config import TrainConfig, load_preset

    config = TrainConfig(**load_preset(preset))
    return {k: getattr(config, k) for k in ("model", "hidden", "normalize", "loss", "batch_size", "macro_batch",
                                            "lr", "momentum", "nesterov", "log_every", "holdout")}


def run_harness(preset: str, nproc: int, shard_dir: Path, run_dir: Path, steps: int) -> dict:
    command = [*launcher(nproc), "-m", "harness.train", "--preset", preset, "--shards", str(shard_dir),
               "--run-dir", str(run_dir), "--epochs", "1", "--max-steps", str(steps), "--device", "cpu"]
    done = run_child(command, f"harness.train {preset} x{nproc}")
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    summary = json.loads((run_dir / "summary.json").read_text())
    last = metrics[-1]
    if last["step"] != steps or summary.get("world_size") != nproc:
        raise RuntimeError(f"{preset} x{nproc}: ran {last['step']} steps at world size {summary.get('world_size')}, "
                           f"expected {steps} at {nproc}")
    shutil.rmtree(run_dir, ignore_errors=True)
    return {
        "processes": nproc,
        "train_samples_per_s": last["train_samples_per_s"],
        "epoch_seconds": last["epoch_seconds"],
        "steps": last["step"],
        "train_loss": last["train_loss"],
        "threads_per_rank": summary.get("threads_per_rank"),
        "world_size": summary.get("world_size"),
        "ranks_identical": summary.get("ranks_identical"),
        "process_total_seconds_reported": summary.get("total_seconds"),
        "torchrun_set_omp_num_threads_1": omp_note_from_torchrun(done["stderr"]) if nproc > 1 else None,
        "command": " ".join(["python", *command[1:]]),
        **{k: done[k] for k in ("process_wall_seconds", "others_cores_during_run", "loadavg_before")},
    }


def bench_throughput(preset: str, shard_dir: Path, work: Path, rounds: int, steps: int) -> dict:
    settings = preset_settings(preset)
    rows = []
    for r in range(rounds):
        order = (1, 2) if r % 2 == 0 else (2, 1)
        row = {"round": r + 1, "order": [f"{n}proc" for n in order]}
        for nproc in order:
            row[f"{nproc}proc"] = run_harness(preset, nproc, shard_dir, work / f"run-{preset}-{nproc}p-{r}", steps)
        row["ratio_2proc_over_1proc"] = row["2proc"]["train_samples_per_s"] / row["1proc"]["train_samples_per_s"]
        rows.append(row)
        log(f"{preset} round {r + 1}/{rounds} ({'-'.join(map(str, order))}): 1 proc "
            f"{row['1proc']['train_samples_per_s']:,.0f} img/s, 2 procs {row['2proc']['train_samples_per_s']:,.0f} img/s, "
            f"ratio {row['ratio_2proc_over_1proc']:.3f} (others used {row['1proc']['others_cores_during_run']} / "
            f"{row['2proc']['others_cores_during_run']} cores)")

    def side(n: int, clean: bool = False) -> list[float]:
        return [row[f"{n}proc"]["train_samples_per_s"] for row in rows
                if not clean or (row[f"{n}proc"]["others_cores_during_run"] is not None
                                 and row[f"{n}proc"]["others_cores_during_run"] <= CLEAN_CORES)]

    one, two = median(side(1)), median(side(2))
    clean_one, clean_two = median(side(1, True)), median(side(2, True))
    return {
        "global_batch": settings["batch_size"],
        "local_batch_2proc": settings["batch_size"] // 2,
        "max_steps": steps,
        "settings": settings,
        "threads_per_rank": {"1proc": rows[0]["1proc"]["threads_per_rank"], "2proc": rows[0]["2proc"]["threads_per_rank"]},
        "train_samples_per_s_median": {"1proc": one, "2proc": two},
        "ratio_2proc_over_1proc": two / one,
        "ratio_median_of_rounds": median([row["ratio_2proc_over_1proc"] for row in rows]),
        "clean_runs_only": {
            "definition": f"runs during which other processes used <= {CLEAN_CORES} cores on average",
            "runs": {"1proc": len(side(1, True)), "2proc": len(side(2, True))},
            "train_samples_per_s_median": {"1proc": clean_one, "2proc": clean_two},
            "ratio_2proc_over_1proc": clean_two / clean_one if clean_one and clean_two else None,
        },
        "timed": "train_samples_per_s of RUN_DIR/metrics.jsonl (rank 0) = steps*global_batch/epoch_seconds; "
                 "epoch_seconds covers reading the shards and assembling the 60,000-image macro-batch (each rank "
                 "reads all of it), its permutation, the steps (slice, normalise, forward, backward with DDP's "
                 "all-reduce, SGD step) and a loss all-reduce every log_every steps; not process start, shard "
                 "verification, validation or run outputs (process_wall_seconds includes those)",
        "rounds": rows,
    }


# ----------------------------------------------------------------------------- 2. per-step breakdown (worker)


def worker(args) -> None:
    """One rank: build what harness.train builds, then time steps by component."""
    import torch

    from harness import distributed
    from harness.allocator import keep_freed_memory
    from harness.config import TrainConfig, load_preset

    values = load_preset(args.worker)
    values["device"] = "cpu"
    config = TrainConfig(**values)
    config.validate()
    ctx = distributed.init_distributed("cpu", config.timeout)  # gloo when WORLD_SIZE > 1, as in harness.train
    try:
        malloc = keep_freed_memory()
        threads, why = distributed.choose_threads(config.threads, ctx.local_world_size)
        _worker(args, config, ctx, torch, threads, why, malloc)
    finally:
        distributed.shutdown(ctx)


def _worker(args, config, ctx, torch, threads: int, why: str, malloc: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from harness.data.shard_set import ShardSplit
    from harness.data.stream import MacroBatchStream
    from harness.models import build_model
    from harness.normalize import Normalizer, make_loss

    perf = time.perf_counter
    rank, world = ctx.rank, ctx.world_size
    data = ShardSplit(Path(args.shards), "train")
    stream = MacroBatchStream(data, config.batch_size, config.macro_batch, config.seed, ctx.device, rank=rank, world_size=world)
    torch.manual_seed(config.seed)
    model = build_model(config).to(ctx.device)
    ddp = DistributedDataParallel(model) if ctx.distributed else None
    trained = ddp if ddp is not None else model
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                nesterov=config.nesterov, weight_decay=config.weight_decay)
    normalize = Normalizer(config.normalize, data.manifest["train_stats"], ctx.device)
    loss_fn = make_loss(config.loss)
    n_params = sum(p.numel() for p in model.parameters())

    # Macro-batch assembly, as the loop gets it: the first epoch reads the shards; with one
    # macro-batch per epoch the stream keeps the decoded blocks, so later epochs only
    # re-shuffle and copy (what every epoch after the first costs in a full run).
    ctx.barrier()
    t = perf()
    macro = next(stream.epoch(0))
    assembly_first = perf() - t
    t = perf()
    later = next(stream.epoch(1))
    assembly_later = perf() - t
    del later

    def block(kind: str, first: int, n: int) -> dict:
        """n steps; kind 'sync' = the harness's step, 'no_sync' = the same inside ddp.no_sync()."""
        rows = []
        ctx.barrier()  # every block starts together (no_sync ranks run free until the next one)
        started = perf()
        for j in range(n):
            i = (first + j) % macro.steps
            t0 = perf()
            images, labels = macro.local_batch(i)
            x = normalize(images)
            t1 = perf()
            with ddp.no_sync() if ddp is not None and kind == "no_sync" else contextlib.nullcontext():
                loss = loss_fn(trained(x), labels)
                t2 = perf()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()  # under DDP: returns after the bucket all-reduces finished
            t3 = perf()
            optimizer.step()
            t4 = perf()
            rows.append((t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0))
        return {"kind": kind, "rows": rows, "wall": perf() - started, "last_loss": loss.item()}

    position = 0
    for kind in ("sync", "no_sync"):  # warm-up: allocator, DDP's bucket rebuild after its first step
        block(kind, position, args.warmup_steps)
        position += args.warmup_steps
    blocks = []
    for b in range(args.blocks):
        for kind in (("no_sync", "sync") if b % 2 == 0 else ("sync", "no_sync")):
            blocks.append(block(kind, position, args.block_steps))
            position += args.block_steps

    allreduce = []
    if ctx.distributed:
        flat = torch.zeros(n_params, dtype=torch.float32, device=ctx.device)
        for k in range(3 + args.allreduce_repeats):
            ctx.barrier()
            t = perf()
            dist.all_reduce(flat)
            if k >= 3:
                allreduce.append(perf() - t)

    env_names = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
    mine = {
        "rank": rank,
        "blocks": blocks,
        "assembly_first": assembly_first,
        "assembly_later": assembly_later,
        "allreduce": allreduce,
        "threads": threads,
        "threads_why": why,
        "torch_num_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "env": {k: os.environ.get(k) for k in env_names},
    }
    if ctx.distributed:
        gathered = [None] * world
        dist.all_gather_object(gathered, mine)
    else:
        gathered = [mine]
    if not ctx.is_main:
        return

    import harness

    parallel = [line.strip() for line in torch.__config__.parallel_info().splitlines()
                if any(s in line for s in ("get_num_threads", "omp_get_max_threads", "mkl_get_max_threads", "backend"))]
    result = summarise_breakdown(gathered, config, macro, world, n_params, args)
    result.update({
        "threads_per_rank": threads,
        "threads_why": why,
        "torch_num_threads_per_rank": [g["torch_num_threads"] for g in gathered],
        "torch_interop_threads_per_rank": [g["torch_interop_threads"] for g in gathered],
        "env_per_rank": [g["env"] for g in gathered],
        "aten_parallel_info_rank0": parallel,
        "malloc": malloc,
        "ddp_bucket_cap_bytes": getattr(ddp, "bucket_bytes_cap", None) if ddp is not None else None,
        "harness_imported_from": str(Path(harness.__file__).parent),
    })
    Path(args.worker_out).write_text(json.dumps(result))


def summarise_breakdown(gathered: list[dict], config, macro, world: int, n_params: int, args) -> dict:
    """Per step: mean over ranks; then medians over steps, in ms."""
    names = ("data_wait", "forward", "backward", "optimizer_step", "step_total")

    def per_step_means(kind: str) -> list[tuple]:
        per_rank = [[row for b in g["blocks"] if b["kind"] == kind for row in b["rows"]] for g in gathered]
        return [tuple(statistics.fmean(r[i][c] for r in per_rank) for c in range(len(names))) for i in range(len(per_rank[0]))]

    def medians(rows: list[tuple]) -> dict:
        out = {name: 1000 * statistics.median(r[c] for r in rows) for c, name in enumerate(names)}
        out["forward_backward"] = 1000 * statistics.median(r[1] + r[2] for r in rows)
        return out

    def means(rows: list[tuple]) -> dict:
        return {"forward_backward": 1000 * statistics.fmean(r[1] + r[2] for r in rows),
                "step_total": 1000 * statistics.fmean(r[4] for r in rows)}

    sync, no_sync = per_step_means("sync"), per_step_means("no_sync")
    ms_sync, ms_no_sync = medians(sync), medians(no_sync)
    difference = ms_sync["forward_backward"] - ms_no_sync["forward_backward"]
    mean_sync, mean_no_sync = means(sync), means(no_sync)
    steps_in_macro = macro.steps
    first_ms = 1000 * statistics.fmean(g["assembly_first"] for g in gathered) / steps_in_macro
    later_ms = 1000 * statistics.fmean(g["assembly_later"] for g in gathered) / steps_in_macro
    allreduce = [statistics.fmean(g["allreduce"][k] for g in gathered) for k in range(len(gathered[0]["allreduce"]))]
    allreduce_ms = 1000 * statistics.median(allreduce) if allreduce else 0.0
    total = ms_sync["step_total"]
    steps_per_s = 1000 / total
    with_assembly = 1000 / (total + later_ms)
    sync_wall = [statistics.fmean(g["blocks"][i]["wall"] for g in gathered) for i in range(len(gathered[0]["blocks"]))
                 if gathered[0]["blocks"][i]["kind"] == "sync"]
    batch = config.batch_size
    per_rank = []
    for g in gathered:
        rows = [row for b in g["blocks"] if b["kind"] == "sync" for row in b["rows"]]
        rows_ns = [row for b in g["blocks"] if b["kind"] == "no_sync" for row in b["rows"]]
        m, mn = medians(rows), medians(rows_ns)
        per_rank.append({"rank": g["rank"], **{f"{k}_ms": round(v, 4) for k, v in m.items()},
                         "forward_backward_no_sync_ms": round(mn["forward_backward"], 4),
                         "macro_batch_assembly_first_s": round(g["assembly_first"], 4),
                         "macro_batch_assembly_later_s": round(g["assembly_later"], 4),
                         "last_loss": [b["last_loss"] for b in g["blocks"]][-1]})
    return {
        "world_size": world,
        "global_batch": batch,
        "local_batch": batch // world,
        "steps_measured": {"sync": len(sync), "no_sync": len(no_sync), "per_block": args.block_steps,
                           "block_pairs": args.blocks, "warmup_steps_per_kind": args.warmup_steps},
        "ms_per_step_median": {
            "data_wait": ms_sync["data_wait"],
            "forward_backward": ms_sync["forward_backward"],
            "forward": ms_sync["forward"],
            "backward": ms_sync["backward"],
            "allreduce_exposed": difference if world > 1 else 0.0,
            "optimizer_step": ms_sync["optimizer_step"],
            "step_total": total,
            "forward_backward_no_sync": ms_no_sync["forward_backward"] if world > 1 else None,
            "step_total_no_sync": ms_no_sync["step_total"] if world > 1 else None,
            "macro_batch_assembly_amortised": later_ms,
            "macro_batch_assembly_amortised_first_epoch": first_ms,
        },
        "ms_per_step_mean": {
            "forward_backward": mean_sync["forward_backward"],
            "forward_backward_no_sync": mean_no_sync["forward_backward"],
            "allreduce_exposed": mean_sync["forward_backward"] - mean_no_sync["forward_backward"] if world > 1 else 0.0,
            "step_total": mean_sync["step_total"],
            "why": "under CPU contention a rank that runs free (no_sync) loses whole time slices on a few steps, "
                   "which the median hides, while a DDP step waits for the slower rank every time; the difference "
                   "of means is the fairer figure then (both kinds get the same descheduling)",
        },
        "noise_floor_ms": (difference if world == 1 else None),
        "steps_per_s": steps_per_s,
        "images_per_s": steps_per_s * batch,
        "steps_per_s_incl_amortised_assembly": with_assembly,
        "images_per_s_incl_amortised_assembly": with_assembly * batch,
        "images_per_s_block_wall": len(sync) * batch / sum(sync_wall) if sync_wall else None,
        "macro_batch_assembly_seconds": {
            "first_epoch_reads_shards": statistics.fmean(g["assembly_first"] for g in gathered),
            "later_epoch_cached_blocks": statistics.fmean(g["assembly_later"] for g in gathered),
            "images": len(macro.labels),
            "steps_per_macro_batch": steps_in_macro,
            "note": "MacroBatchStream.epoch(e) up to the first MacroBatch (read/assemble, torch.from_numpy, seeded "
                    "permutation), mean over ranks (each rank assembles every macro-batch); amortised = seconds / "
                    "steps_per_macro_batch. 'later' is what every epoch after the first costs",
        },
        "allreduce_raw": {
            "ms_median": allreduce_ms,
            "ms_min": 1000 * min(allreduce) if allreduce else 0.0,
            "repeats": len(allreduce),
            "tensor_elements": n_params,
            "gradient_bytes": 4 * n_params,
            "gradient_mb": 4 * n_params / 1e6,
            "what": "one dist.all_reduce (SUM, gloo) of a flat float32 tensor with as many elements as the model's "
                    "parameters, after a barrier; mean over ranks per repeat, median of repeats"
                    if world > 1 else "world size 1: no all-reduce",
        },
        "per_rank": per_rank,
        "method": "per step (time.perf_counter, CPU ops are synchronous): data_wait = macro.local_batch + "
                  "Normalizer; forward = model + loss; backward = zero_grad + backward (under DDP this includes "
                  "waiting for the bucketed all-reduce, which overlaps backward); optimizer_step = SGD step. "
                  "Blocks of 'sync' (the harness's DDP step) and 'no_sync' (model forward+backward inside "
                  "ddp.no_sync(): compute only) alternate; allreduce_exposed = median fwd+bwd(sync) - median "
                  "fwd+bwd(no_sync): the all-reduce time that backward did not hide, including DDP's bucket "
                  "copies, gloo's reduction competing with compute for the cores, and any wait for the slower "
                  "rank. Every rank does the optimizer step in both kinds, so ranks' weights drift "
                  "apart in no_sync blocks (no effect on timing). Per step: mean over ranks; then median over "
                  "steps. steps_per_s = 1000/step_total (sync). At world size 1 both kinds are the same step "
                  "and their fwd+bwd difference is reported as noise_floor_ms. The harness loop adds a per-step "
                  "loss copy and a loss all-reduce every log_every steps, not timed here",
    }


def run_worker(preset: str, nproc: int, shard_dir: Path, work: Path, args) -> dict:
    out = work / f"worker-{preset}-{nproc}.json"
    command = [*launcher(nproc), str(Path(__file__).resolve()), "--worker", preset, "--shards", str(shard_dir),
               "--worker-out", str(out), "--block-steps", str(args.block_steps), "--blocks", str(args.blocks),
               "--warmup-steps", str(args.warmup_steps), "--allreduce-repeats", str(args.allreduce_repeats)]
    done = run_child(command, f"worker {preset} x{nproc}")
    result = json.loads(out.read_text())
    result.update({
        "launched_as": "plain process" if nproc == 1 else "torchrun --standalone --nproc-per-node=2",
        "torchrun_set_omp_num_threads_1": omp_note_from_torchrun(done["stderr"]) if nproc > 1 else None,
        **{k: done[k] for k in ("process_wall_seconds", "others_cores_during_run", "loadavg_before")},
    })
    ms = result["ms_per_step_median"]
    log(f"{preset} world size {nproc}: step {ms['step_total']:.2f} ms = data {ms['data_wait']:.2f} + fwd+bwd "
        f"{ms['forward_backward']:.2f} (no_sync {ms['forward_backward_no_sync'] or ms['forward_backward']:.2f}, "
        f"all-reduce exposed {ms['allreduce_exposed']:.2f}, raw {result['allreduce_raw']['ms_median']:.2f}) + opt "
        f"{ms['optimizer_step']:.2f}; {result['images_per_s']:,.0f} img/s")
    return result


# ----------------------------------------------------------------------------- main


def run_all(args, source_dir: Path, work: Path) -> dict:
    started = time.perf_counter()
    code, SETTINGS["snapshot_root"] = harness_code(work, args.live_package)
    presets = [p for p in args.presets.split(",") if p]
    steps = {p: args.steps or (QUICK_STEPS if args.quick else DEFAULT_STEPS.get(p, 300)) for p in presets}
    for p in presets:  # --epochs 1: at most one epoch of steps
        settings = preset_settings(p)
        epoch_steps = (60000 - settings["holdout"]) // settings["batch_size"]  # MNIST's training split
        if steps[p] > epoch_steps:
            log(f"{p}: --steps {steps[p]} is more than one epoch; using {epoch_steps}")
            steps[p] = epoch_steps
    record = {
        "bench": "ddp",
        "started_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "hardware": hardware(gpu="none used (device cpu, gloo backend)"),
        "versions": versions(gloo_available=gloo_available()),
        "harness_code": code,
        "loadavg_start": loadavg(),
        "settings": {
            "quick": args.quick,
            "mnist_dir": str(source_dir),
            "presets": presets,
            "rounds": args.rounds,
            "harness_max_steps": steps,
            "breakdown": {"block_steps": args.block_steps, "block_pairs": args.blocks,
                          "warmup_steps_per_kind": args.warmup_steps, "allreduce_repeats": args.allreduce_repeats},
            "timeout_s_per_run": args.timeout,
            "seed": "preset default (0)",
            "child_env": {k: v for k, v in child_env().items()
                          if k.startswith(("OMP_", "MKL_", "GOMP_", "KMP_", "MALLOC_", "LD_PRELOAD", "PYTHONPATH"))},
            "omp_num_threads_policy": "OMP_NUM_THREADS/MKL_NUM_THREADS removed from every child's environment: "
                                      "torchrun then exports OMP_NUM_THREADS=1 to its 2 ranks, a plain process "
                                      "keeps OpenMP's default; torch threads are the harness's choice "
                                      "(choose_threads: usable cores / local ranks)",
            "omp_wait_policy": SETTINGS["omp_wait_policy"],
            "omp_wait_policy_why": "the default spinning policy made 2-thread steps up to 30x slower whenever "
                                   "another process held a core of this 2-core machine (bench/README.md, noise)",
        },
        "throughput": {},
        "breakdown": {},
    }

    from harness.data.pack import pack
    from harness.data.sources import load_source

    log(f"packing {source_dir} into {work / 'shards'}")
    t = time.perf_counter()
    pack(load_source(source_dir), work / "shards")
    record["settings"]["pack_seconds"] = round(time.perf_counter() - t, 2)
    shard_dir = work / "shards"

    if not args.skip_throughput and presets:
        # Untimed warm-up of both launch paths (page cache of shards and libraries).
        log("warm-up: one short harness run with 1 and with 2 processes (not recorded)")
        for nproc in (1, 2):
            run_harness(presets[0], nproc, shard_dir, work / f"warm-{nproc}", 10)
        for preset in presets:
            log(f"{preset}: harness throughput, {args.rounds} round(s) of {steps[preset]} steps per run")
            record["throughput"][preset] = bench_throughput(preset, shard_dir, work, args.rounds, steps[preset])

    if not args.skip_breakdown:
        for p, preset in enumerate(presets):
            record["breakdown"][preset] = {}
            for nproc in ((1, 2) if p % 2 == 0 else (2, 1)):
                record["breakdown"][preset][str(nproc)] = run_worker(preset, nproc, shard_dir, work, args)

    record["loadavg_end"] = loadavg()
    record["wall_seconds"] = round(time.perf_counter() - started, 1)
    summary = {}
    for preset in presets:
        t = record["throughput"].get(preset)
        if t:
            summary[f"{preset}_samples_per_s_1proc"] = round(t["train_samples_per_s_median"]["1proc"])
            summary[f"{preset}_samples_per_s_2proc"] = round(t["train_samples_per_s_median"]["2proc"])
            summary[f"{preset}_ratio_2proc_over_1proc"] = round(t["ratio_2proc_over_1proc"], 3)
        b = record["breakdown"].get(preset)
        if b:
            for ws, r in sorted(b.items()):
                ms = r["ms_per_step_median"]
                summary[f"{preset}_ws{ws}_step_ms"] = round(ms["step_total"], 3)
                summary[f"{preset}_ws{ws}_allreduce_exposed_ms"] = round(ms["allreduce_exposed"], 3)
            if "2" in b:
                summary[f"{preset}_allreduce_raw_ms"] = round(b["2"]["allreduce_raw"]["ms_median"], 3)
    record["summary"] = summary
    return record


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run (< ~2 min): 1 round of 50-step harness runs, 1 pair of 15-step breakdown blocks")
    parser.add_argument("--presets", default=",".join(PRESETS), help="comma-separated presets (default lenet,neupy-mlp)")
    parser.add_argument("--steps", type=int, default=None,
                        help="--max-steps of every harness run (default: lenet 300, neupy-mlp 468 = one epoch; quick 50)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="alternated 1-proc/2-proc rounds per preset (default 4; quick 1)")
    parser.add_argument("--block-steps", type=int, default=None, help="steps per timed breakdown block (default 80; quick 15)")
    parser.add_argument("--blocks", type=int, default=None,
                        help="pairs of (no_sync, sync) breakdown blocks, order alternated (default 3; quick 1)")
    parser.add_argument("--warmup-steps", type=int, default=None,
                        help="untimed breakdown steps of each kind before the blocks (default 20; quick 5)")
    parser.add_argument("--allreduce-repeats", type=int, default=None, help="timed raw all-reduces (default 30; quick 10)")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds any one subprocess run may take before its process group is killed (default 300)")
    parser.add_argument("--omp-wait-policy", default="PASSIVE", choices=("PASSIVE", "ACTIVE", "inherit"),
                        help="OMP_WAIT_POLICY of every run (default PASSIVE; 'inherit' keeps the caller's environment)")
    parser.add_argument("--live-package", action="store_true",
                        help="run the checkout's harness as it is instead of a snapshot copied at start")
    parser.add_argument("--skip-throughput", action="store_true", help="only the per-step breakdown")
    parser.add_argument("--skip-breakdown", action="store_true", help="only the end-to-end throughput")
    parser.add_argument("--worker", metavar="PRESET", help=argparse.SUPPRESS)
    parser.add_argument("--shards", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args()

    q = args.quick
    args.rounds = args.rounds or (1 if q else 4)
    args.block_steps = args.block_steps or (15 if q else 80)
    args.blocks = args.blocks or (1 if q else 3)
    args.warmup_steps = args.warmup_steps if args.warmup_steps is not None else (5 if q else 20)
    args.allreduce_repeats = args.allreduce_repeats or (10 if q else 30)

    if args.worker:
        worker(args)
        return 0

    source_dir = mnist_dir()
    SETTINGS["omp_wait_policy"] = args.omp_wait_policy
    SETTINGS["timeout_s"] = args.timeout
    with tempfile.TemporaryDirectory(prefix="bench-ddp-") as tmp:
        try:
            record = run_all(args, source_dir, Path(tmp))
        except RuntimeError as e:
            log(f"error: {e}")
            return 1
    log(f"done in {record['wall_seconds']:.0f} s: {json.dumps(record['summary'])}")
    print(json.dumps(record, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
