"""The training loop. `python -m harness.train` is the entry point for torchrun.

Each rank: stream the training split as macro-batches, take its slice of every
global batch, step the (DDP-wrapped) model; rank 0 validates after every
epoch and writes the run outputs. Read top to bottom; details live in the
modules it calls.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from harness import distributed
from harness.config import TrainConfig, add_config_options, build_config
from harness.data.stream import MacroBatchStream, ShardSplit
from harness.errors import HarnessError
from harness.evaluate import evaluate
from harness.models import build_model, parameter_checksum
from harness.normalize import Normalizer, make_loss
from harness.run_outputs import RunOutputs, setup_logging

log = logging.getLogger("harness")


def load_eval_set(shard_dir: Path, split: str, start: int, stop: int | None, device: torch.device):
    images, labels = ShardSplit(shard_dir, split, start, stop).load_all()
    return torch.from_numpy(images).to(device), torch.from_numpy(labels).long().to(device)


def train(config: TrainConfig, shard_dir: Path, run_dir: Path) -> dict:
    ctx = distributed.init_distributed(config.device)
    try:
        return _train(config, Path(shard_dir), Path(run_dir), ctx)
    finally:
        distributed.shutdown(ctx)


def _train(config: TrainConfig, shard_dir: Path, run_dir: Path, ctx: distributed.DistContext) -> dict:
    setup_logging(ctx.rank)
    if config.batch_size % ctx.world_size:
        raise HarnessError(f"--batch-size {config.batch_size} is not divisible by the world size {ctx.world_size}")
    threads, why = distributed.choose_threads(config.threads, ctx.local_world_size)
    outputs = RunOutputs(run_dir) if ctx.is_main else None

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

    log.info(
        f"{sum(p.numel() for p in model.parameters()):,}-parameter {config.model} on {ctx.device}, "
        f"world size {ctx.world_size}, {threads} CPU thread(s) per rank ({why}); "
        f"{n_train:,} training images, {stream.steps_per_epoch} steps of {config.batch_size} per epoch, "
        f"validating on {val_set}"
    )
    step, best_val, stale_epochs, metrics = 0, float("inf"), 0, {}
    started = time.perf_counter()
    show_bar = ctx.is_main and sys.stderr.isatty()
    for epoch in range(config.epochs):
        epoch_started, epoch_steps = time.perf_counter(), 0
        loss_sum = torch.zeros((), device=ctx.device)
        window_loss, window_steps, window_started = torch.zeros((), device=ctx.device), 0, time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        bar = tqdm(total=stream.steps_per_epoch, desc=f"epoch {epoch + 1}/{config.epochs}", leave=False, disable=not show_bar)
        for macro in stream.epoch(epoch):
            for i in range(macro.steps):
                images, labels = macro.local_batch(i, ctx.rank, ctx.world_size)
                loss = loss_fn(trained(normalize(images)), labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_sum += loss.detach()
                window_loss += loss.detach()
                step, epoch_steps, window_steps = step + 1, epoch_steps + 1, window_steps + 1
                bar.update()
                end_of_macro = i == macro.steps - 1
                if step % config.log_every == 0 or end_of_macro or step == config.max_steps:
                    # The only host sync of the loop: one all-reduce of the loss every log_every steps.
                    mean_loss = ctx.sum(window_loss.clone()).item() / (window_steps * ctx.world_size)
                    now = time.perf_counter()
                    if ctx.is_main:
                        rate = window_steps * config.batch_size / (now - window_started)
                        outputs.tensorboard.scalars(step, {"train/loss": mean_loss, "train/lr": lr, "train/samples_per_s": rate})
                        bar.set_postfix(loss=f"{mean_loss:.4f}")
                    window_loss.zero_()
                    window_steps, window_started = 0, now
                if step == config.max_steps:
                    break
            if step == config.max_steps:
                break
        bar.close()
        train_seconds = time.perf_counter() - epoch_started
        train_loss = ctx.sum(loss_sum.clone()).item() / (max(epoch_steps, 1) * ctx.world_size)

        # Rank 0 validates while the others wait in the broadcast of its verdict.
        verdict = torch.zeros(2, dtype=torch.float64, device=ctx.device)
        if ctx.is_main:
            result = evaluate(model, val_images, val_labels, normalize, loss_fn, config.eval_batch)
            improved = result.loss < best_val
            best_val, stale_epochs = (result.loss, 0) if improved else (best_val, stale_epochs + 1)
            stop = config.early_stopping and stale_epochs >= config.early_stopping
            verdict[:] = torch.tensor([result.loss, float(bool(stop))])
            metrics = {
                "epoch": epoch + 1,
                "step": step,
                "train_loss": train_loss,
                "val_loss": result.loss,
                "val_accuracy": result.accuracy,
                "lr": lr,
                "epoch_seconds": train_seconds,
                "train_samples_per_s": epoch_steps * config.batch_size / train_seconds,
            }
            outputs.epoch(metrics, config.epochs, model, step)
        ctx.broadcast_from_main(verdict)
        scheduler.step()
        if verdict[1].item():
            log.info(f"early stopping: no better {val_set} loss for {config.early_stopping} epochs")
            break
        if step == config.max_steps:
            log.info(f"stopping after --max-steps {config.max_steps}")
            break

    # Every rank reports its step count and parameter digest; DDP must have kept them equal.
    checksum = parameter_checksum(model)
    per_rank = ctx.gather([step, *distributed.digest_ints(checksum)])
    steps_per_rank = [r[0] for r in per_rank]
    ranks_agree = all(r[1:] == per_rank[0][1:] for r in per_rank)
    if not ranks_agree:
        log.error("ranks ended with different parameters")
    if not ctx.is_main:
        return {}
    test_set = "test"
    if config.holdout:
        test_images, test_labels = load_eval_set(shard_dir, "test", 0, None, ctx.device)
        test = evaluate(model, test_images, test_labels, normalize, loss_fn, config.eval_batch)
    else:
        test = result
    summary = {
        "final": metrics,
        "test_loss": test.loss,
        "test_accuracy": test.accuracy,
        "world_size": ctx.world_size,
        "steps": step,
        "steps_per_rank": steps_per_rank,
        "epochs_run": metrics.get("epoch", 0),
        "total_seconds": time.perf_counter() - started,
        "param_checksum": checksum,
        "ranks_identical": ranks_agree,
        "threads_per_rank": threads,
        "device": str(ctx.device),
        "config": vars(config),
    }
    outputs.finish(summary, test, test_set, model)
    return summary


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="python -m harness.train", description="Train on packed shards.")
    parser.add_argument("--preset", help="lenet, neupy-mlp, theanets-mlp or mathspp-mlp")
    parser.add_argument("--shards", type=Path, default=Path("shards"), help="shard directory (default shards/)")
    parser.add_argument("--run-dir", type=Path, required=True, help="where metrics, TensorBoard events and checkpoints go")
    add_config_options(parser)
    return parser


def run_from_args(args: argparse.Namespace) -> int:
    config = build_config(args.preset, args)
    train(config, args.shards, args.run_dir)
    return 0


def main(argv: list[str] | None = None) -> int:
    from harness.cli import run_guarded

    args = build_parser().parse_args(argv)
    return run_guarded(run_from_args, args)


if __name__ == "__main__":
    sys.exit(main())
