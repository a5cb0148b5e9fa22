"""The training loop. `python -m harness.train` is the entry point for torchrun.

Each rank streams the training split as macro-batches, takes its slice of every
global batch and steps the (DDP-wrapped) model; rank 0 validates after every
epoch and writes the run outputs. Every `log_every` steps all ranks meet at a sync
point: one all-reduce carries the loss, any stop signal and any non-finite loss,
so every rank stops, checkpoints or fails at the same step. The loop's position
lives in `LoopState`, which goes into every checkpoint, so a run resumes at the
exact step it stopped at. Details live in the modules it calls.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from harness import distributed
from harness.allocator import keep_freed_memory
from harness.checkpoint import load_newest_valid, load_verified, save_checkpoint
from harness.config import TrainConfig, add_config_options, build_config, changed_fields
from harness.data.stream import MacroBatchStream, ShardSplit
from harness.errors import HarnessError
from harness.evaluate import EvalResult, evaluate
from harness.models import build_model, parameter_checksum
from harness.normalize import Normalizer, make_loss
from harness.run_outputs import RunOutputs, setup_logging
from harness.stopping import EXIT_STOPPED, Fault, StopRequest

log = logging.getLogger("harness")


class Stopped(Exception):
    """Raised on every rank after a stop signal was honoured and checkpointed."""


@dataclasses.dataclass
class LoopState:
    """Where training is: the next step to run, and what the epoch has gathered so far."""

    epoch: int = 0  # 0-based epoch in progress (= epochs completed)
    macro: int = 0  # macro-batch of that epoch in progress
    step_in_macro: int = 0  # next step inside that macro-batch
    step: int = 0  # optimizer steps done in all
    epoch_loss_sum: float = 0.0  # per-rank mean losses, summed over ranks and steps
    epoch_steps: int = 0
    epoch_seconds: float = 0.0  # training time of the epoch in progress
    best_val: float = float("inf")
    stale_epochs: int = 0
    last_metrics: dict = dataclasses.field(default_factory=dict)


def load_eval_set(shard_dir: Path, split: str, start: int, stop: int | None, device: torch.device):
    images, labels = ShardSplit(shard_dir, split, start, stop).load_all()
    return torch.from_numpy(images).to(device), torch.from_numpy(labels).long().to(device)


def train(config: TrainConfig, shard_dir: Path, run_dir: Path, resume: str = "auto") -> dict:
    ctx = distributed.init_distributed(config.device, config.timeout)
    try:
        summary = _train(config, Path(shard_dir), Path(run_dir), ctx, resume)
        # The other ranks wait here while rank 0 evaluates the test set and writes the
        # run files, so every rank tears the process group down together: a rank that
        # destroyed its gloo group and exited while rank 0 was still busy was seen to
        # abort ("terminate called without an active exception").
        ctx.barrier()
        return summary
    finally:
        distributed.shutdown(ctx)


def _train(config: TrainConfig, shard_dir: Path, run_dir: Path, ctx: distributed.DistContext, resume: str) -> dict:
    setup_logging(ctx.rank)
    malloc = keep_freed_memory()
    if config.batch_size % ctx.world_size:
        raise HarnessError(f"--batch-size {config.batch_size} is not divisible by the world size {ctx.world_size}")
    threads, why = distributed.choose_threads(config.threads, ctx.local_world_size)
    stop_request, fault = StopRequest(), Fault.from_env()

    # Data: the training range, and (rank 0) the validation images on the device.
    train_data = ShardSplit(shard_dir, "train")
    n_train = len(train_data) - config.holdout
    if config.holdout:
        train_data = ShardSplit(shard_dir, "train", 0, n_train, verify=False)  # verified just above
    stream = MacroBatchStream(train_data, config.batch_size, config.macro_batch, config.seed, ctx.device)
    val_set = "holdout" if config.holdout else "test"
    if ctx.is_main:
        val_images, val_labels = load_eval_set(shard_dir, "train", n_train, None, ctx.device) if config.holdout else load_eval_set(shard_dir, "test", 0, None, ctx.device)

    torch.manual_seed(config.seed)  # same initial weights on every rank and world size
    model = build_model(config).to(ctx.device)
    trained = DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None) if ctx.distributed else model
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum, nesterov=config.nesterov, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=config.lr_decay)
    normalize = Normalizer(config.normalize, train_data.manifest["train_stats"], ctx.device)
    loss_fn = make_loss(config.loss)

    loop = restore(ctx, run_dir, resume, config, model, optimizer, scheduler)
    outputs = RunOutputs(run_dir, resumed_at=loop.step or None) if ctx.is_main else None
    if outputs:
        outputs.keep_epochs(loop.epoch)

    def checkpoint() -> None:
        """Rank 0 writes; everyone waits, so no rank runs ahead of a checkpoint being written."""
        if ctx.is_main:
            state = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "loop": dataclasses.asdict(loop),
                "rng": {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if ctx.device.type == "cuda" else []},
                "config": dataclasses.asdict(config),
                "world_size": ctx.world_size,
            }
            save_checkpoint(run_dir, state, loop.step, loop.epoch, config.keep_checkpoints)
        ctx.barrier()

    log.info(
        f"{sum(p.numel() for p in model.parameters()):,}-parameter {config.model} on {ctx.device}, "
        f"world size {ctx.world_size}, {threads} CPU thread(s) per rank ({why}), {malloc}; "
        f"{n_train:,} training images, {stream.steps_per_epoch} steps of {config.batch_size} per epoch, "
        f"validating on {val_set}"
    )
    started = time.perf_counter()
    show_bar = ctx.is_main and sys.stderr.isatty()
    window = torch.zeros(config.log_every, device=ctx.device)  # per-step losses since the last sync point
    reached_max = lambda: config.max_steps and loop.step >= config.max_steps  # noqa: E731
    # Derived, not checkpointed: a finished run resumed with a larger --max-steps or
    # --epochs goes on; early stopping stays decided.
    finished = bool(reached_max()) or bool(config.early_stopping and loop.stale_epochs >= config.early_stopping)
    last_eval: tuple[int, EvalResult] | None = None  # (step, result) of rank 0's latest validation
    while loop.epoch < config.epochs and not finished:
        lr = optimizer.param_groups[0]["lr"]
        bar = tqdm(total=stream.steps_per_epoch, initial=loop.epoch_steps, desc=f"epoch {loop.epoch + 1}/{config.epochs}", leave=False, disable=not show_bar)
        n_window, window_started = 0, time.perf_counter()
        for macro in stream.epoch(loop.epoch, start_index=loop.macro):
            for i in range(loop.step_in_macro, macro.steps):
                fault.before_step(loop.step, ctx.rank)
                images, labels = macro.local_batch(i, ctx.rank, ctx.world_size)
                loss = fault.corrupt_loss(loss_fn(trained(normalize(images)), labels), loop.step, ctx.rank)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                window[n_window] = loss.detach()
                n_window += 1
                loop.step += 1
                loop.macro, loop.step_in_macro = (loop.macro + 1, 0) if i + 1 == macro.steps else (loop.macro, i + 1)
                bar.update()
                due_checkpoint = config.checkpoint_every and loop.step % config.checkpoint_every == 0
                if n_window == config.log_every or loop.step_in_macro == 0 or due_checkpoint or reached_max():
                    # The loop's only host sync: one all-reduce every log_every steps.
                    mean_loss, stop = sync_point(ctx, window[:n_window], loop.step - n_window, stop_request)
                    now = time.perf_counter()
                    loop.epoch_loss_sum += mean_loss * n_window
                    loop.epoch_steps += n_window
                    loop.epoch_seconds += now - window_started
                    if ctx.is_main:
                        rate = n_window * config.batch_size / (now - window_started)
                        outputs.tensorboard.scalars(loop.step, {"train/loss": mean_loss, "train/lr": lr, "train/samples_per_s": rate})
                        bar.set_postfix(loss=f"{mean_loss:.4f}")
                    n_window, window_started = 0, now
                    if stop or due_checkpoint:
                        checkpoint()
                    if stop:
                        log.warning(f"{stop}: stopped at step {loop.step} and checkpointed; run again to resume")
                        raise Stopped(stop)
                if reached_max():
                    break
            if reached_max():
                break
        bar.close()

        # Rank 0 validates while the others wait in the broadcast of its verdict.
        verdict = torch.zeros(2, dtype=torch.float64, device=ctx.device)
        if ctx.is_main:
            result = evaluate(model, val_images, val_labels, normalize, loss_fn, config.eval_batch)
            last_eval = (loop.step, result)
            improved = result.loss < loop.best_val
            loop.best_val, loop.stale_epochs = (result.loss, 0) if improved else (loop.best_val, loop.stale_epochs + 1)
            stop_early = config.early_stopping and loop.stale_epochs >= config.early_stopping
            verdict[:] = torch.tensor([result.loss, float(bool(stop_early))])
            loop.last_metrics = {
                "epoch": loop.epoch + 1,  # a partial epoch (--max-steps) too; a resume drops its line
                "step": loop.step,
                "train_loss": loop.epoch_loss_sum / max(loop.epoch_steps, 1),
                "val_loss": result.loss,
                "val_accuracy": result.accuracy,
                "lr": lr,
                "epoch_seconds": loop.epoch_seconds,
                "train_samples_per_s": loop.epoch_steps * config.batch_size / max(loop.epoch_seconds, 1e-9),
            }
            outputs.epoch(loop.last_metrics, config.epochs, model, loop.step)
        ctx.broadcast_from_main(verdict)
        if loop.macro == stream.macro_batches_per_epoch:  # the epoch is complete
            scheduler.step()
            loop.epoch, loop.macro, loop.step_in_macro = loop.epoch + 1, 0, 0
            loop.epoch_loss_sum, loop.epoch_steps, loop.epoch_seconds = 0.0, 0, 0.0
        if verdict[1].item():
            log.info(f"early stopping: no better {val_set} loss for {config.early_stopping} epochs")
        if reached_max():
            log.info(f"stopping after --max-steps {config.max_steps}")
        finished = bool(verdict[1].item()) or bool(reached_max())
        checkpoint()

    def test_result() -> EvalResult:
        """Rank 0's final test-set result: the last validation's when it was on the test
        set at this step, else a fresh evaluation (holdout runs, a resumed finished run)."""
        if not config.holdout:
            if last_eval and last_eval[0] == loop.step:
                return last_eval[1]
            return evaluate(model, val_images, val_labels, normalize, loss_fn, config.eval_batch)
        test_images, test_labels = load_eval_set(shard_dir, "test", 0, None, ctx.device)
        return evaluate(model, test_images, test_labels, normalize, loss_fn, config.eval_batch)

    return finish(ctx, config, model, loop, outputs, test_result, threads, started)


def sync_point(ctx, window: torch.Tensor, first_step: int, stop_request: StopRequest) -> tuple[float, str]:
    """All ranks: mean loss of the window, and the stop signal if any rank got one.

    One all-reduce and one device-to-host copy. A non-finite loss on any rank raises
    on every rank, naming the first bad step.
    """
    nonfinite = ~torch.isfinite(window)
    packed = torch.zeros(3, dtype=torch.float64, device=window.device)
    packed[0], packed[1], packed[2] = window.sum(), nonfinite.any(), float(stop_request.requested)
    loss_sum, any_nonfinite, any_stop = ctx.sum(packed).tolist()
    if any_nonfinite:
        bad_step = first_step + int(nonfinite.nonzero()[0, 0]) if nonfinite.any() else 2**62
        step, rank = min((s[0], r) for r, s in enumerate(ctx.gather([bad_step])))
        raise HarnessError(f"loss is NaN or infinite at step {step + 1} on rank {rank}; stopped every rank; the last checkpoint is intact")
    stop = stop_request.signal_name or ("stop signal on another rank" if any_stop else "")
    return loss_sum / (len(window) * ctx.world_size), stop


def restore(ctx, run_dir: Path, resume: str, config: TrainConfig, model, optimizer, scheduler) -> LoopState:
    """Load the checkpoint to resume from into model, optimizer and scheduler; the loop state to go on from."""
    found = None
    if resume == "auto":
        found = load_newest_valid(run_dir)
    elif resume != "never":
        found = (Path(resume), load_verified(Path(resume)))
    # Every rank must resume from the same checkpoint (RUN_DIR on a shared filesystem).
    steps = [s[0] for s in ctx.gather([found[1]["loop"]["step"] if found else -1])]
    if len(set(steps)) > 1:
        raise HarnessError(f"{run_dir}: ranks found different checkpoints (steps {steps}); RUN_DIR must be on a filesystem every node shares")
    if not found:
        return LoopState()
    path, state = found
    changed = changed_fields(state["config"], config)
    if changed:
        raise HarnessError(
            f"{path}: was written with a different {', '.join('--' + c.replace('_', '-') for c in changed)}; "
            "resuming would mix two experiments (use a new --run-dir, or --resume never there)"
        )
    if state["world_size"] != ctx.world_size:
        log.warning(f"resuming a world-size-{state['world_size']} run with world size {ctx.world_size}: the global batches are the same, results equal up to float summation order")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"] and ctx.device.type == "cuda":
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    loop = LoopState(**state["loop"])
    log.info(f"resuming from {path} (epoch {loop.epoch + 1}, step {loop.step})")
    return loop


def finish(ctx, config, model, loop: LoopState, outputs, test_result, threads, started) -> dict:
    # Every rank reports its step count and parameter digest; DDP must have kept them equal.
    checksum = parameter_checksum(model)
    per_rank = ctx.gather([loop.step, *distributed.digest_ints(checksum)])
    steps_per_rank = [r[0] for r in per_rank]
    ranks_agree = all(r[1:] == per_rank[0][1:] for r in per_rank)
    if not ranks_agree:
        log.error("ranks ended with different parameters")
    if not ctx.is_main:
        return {}
    test = test_result()
    summary = {
        "final": loop.last_metrics,
        "test_loss": test.loss,
        "test_accuracy": test.accuracy,
        "world_size": ctx.world_size,
        "steps": loop.step,
        "steps_per_rank": steps_per_rank,
        "epochs_run": loop.epoch,
        "total_seconds": time.perf_counter() - started,
        "param_checksum": checksum,
        "ranks_identical": ranks_agree,
        "threads_per_rank": threads,
        "device": str(ctx.device),
        "config": dataclasses.asdict(config),
    }
    outputs.finish(summary, test, "test", model)
    return summary


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="python -m harness.train", description="Train on packed shards.")
    parser.add_argument("--preset", help="lenet, neupy-mlp, theanets-mlp or mathspp-mlp")
    parser.add_argument("--shards", type=Path, default=Path("shards"), help="shard directory (default shards/)")
    parser.add_argument("--run-dir", type=Path, required=True, help="where metrics, TensorBoard events and checkpoints go")
    parser.add_argument(
        "--resume", default="auto",
        help="auto (default): continue from the newest valid checkpoint in RUN_DIR/checkpoints if any; "
        "never: start over (refused if RUN_DIR already holds a run); or a checkpoint's path",
    )
    add_config_options(parser)
    return parser


def run_from_args(args: argparse.Namespace) -> int:
    config = build_config(args.preset, args)
    try:
        train(config, args.shards, args.run_dir, args.resume)
    except Stopped:
        return EXIT_STOPPED
    return 0


def main(argv: list[str] | None = None) -> int:
    from harness.cli import run_guarded

    args = build_parser().parse_args(argv)
    return run_guarded(run_from_args, args)


if __name__ == "__main__":
    sys.exit(main())
