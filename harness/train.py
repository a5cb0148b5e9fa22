"""The training loop. `python -m harness.train` is the entry point for torchrun.

Each rank streams the training split as macro-batches, takes its slice of every
global batch and steps the (DDP-wrapped) model; rank 0 validates after every
epoch and writes the run outputs. Every `log_every` steps all ranks meet at a sync
point: one all-reduce carries the loss, any stop signal and any non-finite loss,
so every rank stops, checkpoints or fails at the same step. Between sync points
nothing waits for the device. The loop's position lives in `Progress`, and
`Trainer.state_dict()` (model, optimizer, schedule, position, RNG) is what a
checkpoint holds, so a run resumes at the exact step it stopped at.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from harness import distributed
from harness.allocator import keep_freed_memory
from harness.augment import RandomAffine
from harness.checkpoint import CHECKPOINT_DIR, checkpoint_to_resume, list_checkpoints, marker_step, state_mismatch
from harness.compile_choice import GRAPHED_MODES, compile_mode, compiler_unusable
from harness.config import TrainConfig, add_config_options, build_config, flag, preset_names
from harness.cuda_graph import GraphedStep, compile_with_inductor
from harness.data.manifest import shard_set_sha256
from harness.data.shard_set import ShardSource, ShardSplit, is_a_local_directory
from harness.data.stream import MacroBatch, MacroBatchStream
from harness.default_run_dir import default_run_dir, remove_if_unused
from harness.device import autocast, set_deterministic
from harness.errors import AgreedError, HarnessError, OptionParser, given, given_path, run_guarded
from harness.evaluate import EvalResult, evaluate
from harness.models import buffers_restored, build_model, parameter_checksum
from harness.normalize import Normalizer, make_loss, stats_used
from harness.optimizer import build_optimizer, load_optimizer_state, make_schedule
from harness.run_outputs import RunOutputs, read_summary, setup_logging, write_start_up_stop_record
from harness.stopping import EXIT_STOPPED, StopRequest
from harness.sync_point import Stopped, agree_at_sync_point, signal_any_rank_got, stop_every_rank
from harness.testhooks import Fault, diverge_rank_rng, save_rank_files

log = logging.getLogger("harness")

START_UP_STOP = "before training, with nothing new to checkpoint"  # how a stop during start-up is logged


class ProgressBar(tqdm):
    monitor_interval = 0  # tqdm's monitor thread is not needed here; nothing extra left running at exit


@dataclasses.dataclass
class Progress:
    """Where training is, and what the epoch in progress has gathered so far."""

    epoch: int = 0  # 0-based epoch in progress (= epochs completed)
    macro: int = 0  # macro-batch of that epoch in progress
    step_in_macro: int = 0  # next step inside that macro-batch
    step: int = 0  # optimizer steps done in all
    epoch_loss_sum: float = 0.0  # each step's loss (the ranks' mean), summed over the epoch's steps
    epoch_steps: int = 0
    epoch_seconds: float = 0.0  # training time of the epoch in progress
    best_val: float = float("inf")  # early stopping: best validation loss so far
    stale_epochs: int = 0  # epochs since it last improved
    last_metrics: dict = dataclasses.field(default_factory=dict)
    before_training: dict = dataclasses.field(default_factory=dict)  # test loss and accuracy of the initial weights

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for name, value in state.items():
            setattr(self, name, value)

    def advance(self, last_in_macro: bool) -> None:
        self.step += 1
        self.macro, self.step_in_macro = (self.macro + 1, 0) if last_in_macro else (self.macro, self.step_in_macro + 1)

    def add_window(self, mean_loss: float, steps: int, seconds: float) -> None:
        self.epoch_loss_sum += mean_loss * steps
        self.epoch_steps += steps
        self.epoch_seconds += seconds

    def record_validation(self, loss: float) -> None:
        self.best_val, self.stale_epochs = (loss, 0) if loss < self.best_val else (self.best_val, self.stale_epochs + 1)

    def next_epoch(self) -> None:
        self.epoch, self.macro, self.step_in_macro = self.epoch + 1, 0, 0
        self.epoch_loss_sum, self.epoch_steps, self.epoch_seconds = 0.0, 0, 0.0


def position_problem(loop: dict, stream: MacroBatchStream) -> str | None:
    """Where a saved loop position does not fit this run's epochs, as `field: problem`; None
    if it fits. The layout (batch, macro-batch and split sizes) cannot change on resume, so
    a position is a macro-batch of an epoch, a step inside it, and the step count they make:
    a checkpoint's position is data from a file, and one out of range trained from rows
    outside a block, or wrote an epoch's line with no steps in it."""
    epoch, macro, step_in_macro = loop["epoch"], loop["macro"], loop["step_in_macro"]
    if epoch < 0:
        return f"loop.epoch: {epoch}; not an epoch"
    if not 0 <= macro < stream.macro_batches_per_epoch:
        return f"loop.macro: {macro}; an epoch here has macro-batches 0 to {stream.macro_batches_per_epoch - 1}"
    if not 0 <= step_in_macro < stream.steps_in(macro):
        return f"loop.step_in_macro: {step_in_macro}; macro-batch {macro} here has steps 0 to {stream.steps_in(macro) - 1}"
    in_epoch = macro * stream.macro_steps + step_in_macro
    if loop["step"] != epoch * stream.steps_per_epoch + in_epoch:
        return (f"loop.step: {loop['step']}; the position (epoch {epoch}, macro {macro}, step_in_macro {step_in_macro}) is step "
                f"{epoch * stream.steps_per_epoch + in_epoch} ({stream.steps_per_epoch} steps an epoch)")
    if not 0 <= loop["epoch_steps"] <= in_epoch:
        return f"loop.epoch_steps: {loop['epoch_steps']}; the epoch's position is {in_epoch} steps in"
    return None


class LossWindow:
    """Per-step losses since the last sync point, kept on the device (no host sync per step).

    A window never spans macro-batches (each one ends at a sync point), so every loss has
    the slot of its step within the macro-batch in `losses`; the window is the `count`
    slots from `first`. An eager step's loss is written there by `add`; the CUDA-graph
    step writes its own from inside the graph (`losses` is GraphedStep's), which spares
    a launch per step."""

    def __init__(self, losses: torch.Tensor):
        self.losses = losses
        self.first, self.count, self.started = 0, 0, time.perf_counter()

    def add(self, loss: torch.Tensor | None) -> None:
        """The next step's loss; None where the CUDA graph has written it."""
        if loss is not None:
            self.losses[self.first + self.count] = loss.detach()
        self.count += 1

    def values(self) -> torch.Tensor:
        return self.losses[self.first : self.first + self.count]

    def restart(self, first: int) -> None:
        """A new window, from step `first` of the macro-batch."""
        self.first, self.count, self.started = first, 0, time.perf_counter()


class Trainer:
    """One rank's training run: built once from the config, then `fit()`."""

    def __init__(self, config: TrainConfig, shards: ShardSource, run_dir: Path, ctx: distributed.DistContext, resume: str = "auto",
                 stop_request: StopRequest | None = None):
        """`resume`: auto (the newest valid checkpoint in RUN_DIR), never, or a checkpoint's path.
        `stop_request`: the process's signal handlers, if installed before (see `train`)."""
        if config.batch_size % ctx.world_size:
            raise AgreedError(f"--batch-size {config.batch_size} is not divisible by the world size {ctx.world_size}")
        if config.batch_norm and ctx.world_size > 1 and ctx.device.type != "cuda":
            raise AgreedError(
                f"--batch-norm with {ctx.world_size} ranks on the {ctx.device.type}: PyTorch's SyncBatchNorm runs on GPUs "
                "only, and BatchNorm over each rank's slice alone would make the weights depend on the world size; "
                "train on one rank, or on GPUs"
            )
        self.config, self.shards, self.run_dir, self.ctx, self.resume = config, shards, Path(run_dir), ctx, resume
        self.malloc = keep_freed_memory()
        self.threads, self.threads_why = distributed.choose_threads(config.threads, ctx.local_world_size)
        set_deterministic(config.deterministic)
        self.stop_request, self.fault = stop_request or StopRequest(), Fault.from_env()
        self.stop_reason = ""  # set once every rank has agreed to stop on a signal
        # Where the loop's time goes (this process's, in seconds): summary.json's loop_seconds_by_part.
        self.spent = dict.fromkeys(("steps", "validation", "epoch_outputs", "checkpoints"), 0.0)
        self.build_data()
        self.build_model()
        self.progress = Progress()
        self.window = LossWindow(self.graphed.losses if self.graphed else torch.zeros(self.stream.most_steps_per_macro, device=ctx.device))
        self.last_eval: tuple[int, EvalResult] | None = None  # (step, result) of rank 0's latest validation
        self.restore()
        diverge_rank_rng(ctx.rank, fresh_start=not self.progress.step)  # test-only
        from_another_run = self.resumes_another_run()
        if from_another_run and not self.training_left():
            limits = f"--epochs {config.epochs}" + (f", --max-steps {config.max_steps}" if config.max_steps else "")
            raise AgreedError(
                f"--resume {resume}: nothing is left to train from it (step {self.progress.step}, {self.progress.epoch} epochs done; "
                f"{limits}{'; early stopping ended its run' if self.stopped_early() else ''})"
            )
        self.outputs = RunOutputs(self.run_dir, resumed_at=self.progress.step or None, from_another_run=from_another_run) if ctx.is_main else None
        if self.outputs:
            # The lines of epochs this run will redo go; with nothing left to train (a run
            # stopped at its last step), the last one, a partial epoch's at --max-steps, stays.
            try:
                self.outputs.keep_epochs(self.progress.epoch + (0 if self.training_left() else 1))
            except BaseException:
                self.outputs.close()  # its writer thread, and the run directory's lock
                raise

    def resumes_another_run(self) -> bool:
        """--resume names a checkpoint from outside RUN_DIR/checkpoints."""
        return self.resume not in ("auto", "never") and Path(self.resume).resolve().parent != (self.run_dir / CHECKPOINT_DIR).resolve()

    def build_data(self) -> None:
        """The training range as a macro-batch stream, and (rank 0) the validation and test sets on the device.

        From a URL into an empty cache, reading the shards here is downloading them. A stop
        signal cuts those downloads short: what they were for is left undone, and fit stops
        the run before anything uses it, on every rank alike."""
        with self.shards.fetches_cancelled_when(lambda: self.stop_request.requested):
            self._build_data()

    def _build_data(self) -> None:
        config, ctx = self.config, self.ctx
        self.verify_train_shards()
        self.n_train = self.shards.manifest["splits"]["train"]["samples"] - config.holdout
        if self.n_train < config.batch_size:
            images = f"{self.n_train + config.holdout:,} training images in {self.shards.url('manifest.json')}"
            raise AgreedError(
                f"--holdout {config.holdout}: leaves {max(self.n_train, 0):,} of the {images}, fewer than one --batch-size {config.batch_size}"
                if config.holdout else f"--batch-size {config.batch_size}: more than the {images}"
            )
        train_data = ShardSplit(self.shards, "train", 0, self.n_train, verify=False)  # verified just above
        self.stream = MacroBatchStream(
            train_data, config.batch_size, config.macro_batch, config.seed, ctx.device, shuffle=config.shuffle,
            rank=ctx.rank, world_size=ctx.world_size,
        )
        with self.unless_stopped():
            self.stream.preload()
        self.train_stats = train_data.manifest["train_stats"]
        self.shard_set = shard_set_sha256(self.shards.manifest)  # a resumed run must train on the same
        self.val_set = "holdout" if config.holdout else "test"
        if ctx.is_main:
            with self.unless_stopped():
                # A holdout run needs the test split too (before training and at the end):
                # it is loaded here, where a stop signal cuts its download short as well.
                self.test_images, self.test_labels = self.load_eval_set("test")
                self.val_images, self.val_labels = self.load_eval_set("train", self.n_train) if config.holdout else (self.test_images, self.test_labels)

    @contextlib.contextmanager
    def unless_stopped(self) -> Iterator[None]:
        """Start-up work whose failure, once a stop signal has come, is the cut download
        (see build_data): the stop follows, as it would have without the failure."""
        try:
            yield
        except HarnessError:
            if not self.stop_request.requested:
                raise

    def build_model(self) -> None:
        """Model, optimizer and schedule; the same initial weights on every rank and world size."""
        config, ctx = self.config, self.ctx
        torch.manual_seed(config.seed)
        self.model = build_model(config).to(ctx.device)
        memory_format = torch.channels_last if config.channels_last and config.model == "lenet" else torch.contiguous_format
        self.model = self.model.to(memory_format=memory_format)
        if config.batch_norm and ctx.world_size > 1:
            # BatchNorm over the global batch, as on one rank: the ranks share each layer's
            # batch statistics (an all-gather per layer and pass), so the weights do not
            # depend on the world size. Its forward also waits for the device once per
            # layer (PyTorch's SyncBatchNorm), the one host sync inside such a step.
            self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.trained = self.model  # what the step calls: the model, wrapped in DDP and/or compiled
        if ctx.world_size > 1:  # one rank has nothing to all-reduce
            self.trained = DistributedDataParallel(self.model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
        self.augment = RandomAffine(config.augment_rotate, config.augment_scale, config.augment_shift, config.seed, ctx.device)
        self.augment_params: torch.Tensor | None = None  # the current macro-batch's, when augmenting
        self.compile_mode = compile_mode(config.compile, ctx, self.augment.active, sync_batch_norm=config.batch_norm and ctx.world_size > 1)
        if self.compile_mode not in ("", *GRAPHED_MODES):
            self.trained = torch.compile(self.trained, mode=self.compile_mode)
        self.optimizer = build_optimizer(self.model, config, ctx.device)
        self.scheduler = make_schedule(self.optimizer, config, self.stream.steps_per_epoch)
        self.keep_lr_float32()
        self.normalize = Normalizer(config.normalize, self.train_stats, ctx.device, memory_format)
        self.loss_fn = make_loss(config.loss)  # validation and test: comparable across recipes
        self.train_loss_fn = make_loss(config.loss, label_smoothing=config.label_smoothing)
        self.graphed = None
        if self.compile_mode in GRAPHED_MODES:
            compiler = compile_with_inductor if self.compile_mode == "cuda-graph-inductor" else None
            self.graphed = GraphedStep(self.model, self.optimizer, self.normalize, self.train_loss_fn, config.precision, self.stream, ctx.device, compiler)

    def verify_train_shards(self) -> None:
        """A node's local rank l of L checks the SHA-256 of training shards l, l+L, l+2L, ...:
        together a node's ranks check every shard once, since each node may read a copy of
        its own (a node-local copy damaged on one node was trained on when rank r of the job
        checked shards r, r+W, ... only). Every rank learns whether any shard differs, so
        that all of them stop at start-up, the finder with the shard's name."""
        ctx, shards = self.ctx, self.shards
        problem = ""
        try:
            with self.unless_stopped():
                local = ctx.local_world_size
                shards.check("train", list(range(ctx.local_rank % local, len(shards.shards("train")), local)))
        except (HarnessError, OSError) as e:  # whatever it is, every rank must reach the gather
            problem = str(e)
        manifest = distributed.digest_ints(json.dumps(shards.manifest, sort_keys=True))
        gathered = ctx.gather([int(bool(problem)), *manifest])
        found = [r for r, row in enumerate(gathered) if row[0]]
        if problem:
            raise HarnessError(problem)
        if found:
            raise HarnessError(f"stopping: rank {found[0]} found a problem with a training shard (its error names it)")
        if any(row[1:] != gathered[0][1:] for row in gathered):
            raise AgreedError(f"{shards.url('manifest.json')}: the ranks read different manifests (was the shard set replaced while the job started?)")

    def load_eval_set(self, split: str, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        # The training shards were verified at start-up; the test split is hashed here.
        images, labels = ShardSplit(self.shards, split, start, verify=split != "train").load_all()
        return torch.from_numpy(images).to(self.ctx.device), torch.from_numpy(labels).long().to(self.ctx.device)

    # --- state ------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything a checkpoint holds: resuming from it continues at the exact step.
        Called on every rank: each rank's RNG states are gathered (lists indexed by rank)."""
        cuda = self.ctx.device.type == "cuda"
        gpu_rng = torch.cuda.get_rng_state(self.ctx.device) if cuda else torch.zeros(0, dtype=torch.uint8)
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "loop": self.progress.state_dict(),
            "rng": {"torch": self.ctx.gather_tensors(torch.get_rng_state()), "cuda": self.ctx.gather_tensors(gpu_rng) if cuda else []},
            "config": dataclasses.asdict(self.config),
            "normalization_stats": stats_used(self.config.normalize, self.train_stats),
            "shard_set_sha256": self.shard_set,
            "world_size": self.ctx.world_size,
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        load_optimizer_state(self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.keep_lr_float32()  # a checkpoint written on the CPU
        self.progress.load_state_dict(state["loop"])
        cpu_rng, gpu_rng = state["rng"]["torch"], state["rng"]["cuda"]
        if isinstance(cpu_rng, torch.Tensor):  # written before RNG states were saved per rank: rank 0's only
            cpu_rng, gpu_rng = [cpu_rng], []
        # This rank's own states; after a change of world size, a new rank takes an old rank's.
        torch.set_rng_state(cpu_rng[self.ctx.rank % len(cpu_rng)])
        if gpu_rng and self.ctx.device.type == "cuda":
            torch.cuda.set_rng_state(gpu_rng[self.ctx.rank % len(gpu_rng)], self.ctx.device)

    def check_state(self, state: dict, path: Path) -> None:
        """HarnessError naming `path` if a loaded checkpoint does not fit this run's objects."""
        problem = state_mismatch(state, self.model, self.optimizer, self.scheduler, self.progress.state_dict()) or position_problem(state["loop"], self.stream)
        if problem:
            raise HarnessError(f"{path}: does not fit this run's model, optimizer or epochs ({problem})")

    def restore(self) -> None:
        found = checkpoint_to_resume(self.ctx, self.run_dir, self.resume, self.config, self.shard_set, fits=self.check_state)
        if found:
            path, state = found
            self.load_state_dict(state)
            log.info(f"resuming from {path} (epoch {self.progress.epoch + 1}, step {self.progress.step})")

    def checkpoint(self, wait: bool = False) -> None:
        """Every rank contributes its RNG state; rank 0 copies the state while the others
        wait, and its background writer serialises it and writes the file while training
        goes on. `wait`: until it is on disk (and the others wait too)."""
        p = self.progress
        with self.timed("checkpoints"):
            self.refuse_nonfinite_state()
            state = self.state_dict()
            with self.ctx.main_only("checkpoint write"):
                if self.ctx.is_main:
                    self.fault.before_checkpoint(p.step, self.ctx.rank)  # test-only
                    slow_write = self.fault.checkpoint_write_hook(p.step, self.ctx.rank)  # test-only
                    self.outputs.checkpoint(state, p.step, p.epoch, self.config.keep_checkpoints, before_write=slow_write)
                    if wait:
                        self.outputs.wait_for_writes()

    def refuse_nonfinite_state(self) -> None:
        """All ranks, before a checkpoint: the sync points check the losses, but the last
        update before a checkpoint has made no loss yet, and an overflowing one leaves
        infinite weights. Such a state is not written, so that the newest checkpoint stays
        one to resume from. The ranks gather their verdicts, so that every rank stops alike
        (one small all-gather; a checkpoint comes right after a sync point anyway)."""
        momentum = (s["momentum_buffer"] for s in self.optimizer.state.values() if s.get("momentum_buffer") is not None)
        tensors = [*self.model.parameters(), *momentum, *self.model.buffers()]  # buffers: BatchNorm's running statistics
        finite = bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())
        bad = [rank for rank, (ok,) in enumerate(self.ctx.gather([int(finite)])) if not ok]
        if bad:
            raise AgreedError(
                f"the weights, momentum or running statistics are NaN or infinite after step {self.progress.step} on rank {bad[0]} "
                "(an update overflowed: lower --lr?); stopped every rank without checkpointing them; any checkpoint already written is intact"
            )

    def wait_for_writes(self) -> None:
        """All ranks: until rank 0's background writes are on disk (a write's error raised here)."""
        with self.timed("checkpoints"), self.ctx.main_only("checkpoint write"):
            if self.ctx.is_main:
                self.outputs.wait_for_writes()

    # --- the loop ---------------------------------------------------------------------------------

    def fit(self) -> dict:
        interrupted = False
        try:
            finished = self.summary_written_before() if not self.training_left() else None
            if finished is not None:
                log.info(f"{self.run_dir}: this run has finished (summary.json); nothing to train, no file rewritten")
                return finished
            self.log_start()
            # Before the compile, which can outlast a launcher's grace period; also where a
            # stop that cut start-up's downloads short stops the run (see build_data).
            self.stop_if_signalled_during_start_up()
            self.open_event_file()
            self.compile_seconds = self.warm_up() if self.compile_mode else 0.0
            if self.progress.step == 0 and not self.progress.before_training:  # a resumed run keeps its first figure
                self.test_before_training()
            if self.training_left():
                # Start-up work, not the first epoch's. A stop signal cuts short its wait (for a
                # shard download, say), and the next line stops.
                self.stream.prepare(self.progress.epoch, self.progress.macro, give_up=lambda: self.stop_request.requested)
                self.stop_if_signalled_during_start_up()
            started = time.perf_counter()
            while self.training_left():
                self.train_epoch()
                self.end_epoch()
                if self.stop_reason:
                    self.stop()
                if self.training_left():
                    self.stop_if_signalled_while_the_next_epoch_loads()
            self.wait_for_writes()  # the loop's time includes the last checkpoint's write
            summary = self.finish(time.perf_counter() - started)
        except KeyboardInterrupt:  # a second Ctrl-C: "ends it at once", not after a write in progress
            interrupted = True
            raise
        finally:
            try:
                if self.outputs:  # first: the checkpoint writes matter more than a load ahead
                    self.outputs.close(wait=not interrupted)
            finally:
                self.stream.close()
        log.info(f"wrote {self.run_dir}")  # once the outputs are closed; not on the path above, which rewrites nothing
        return summary

    def open_event_file(self) -> None:
        """Rank 0 creates TensorBoard's event file (a write to the run directory) here, where
        the other ranks wait on its heartbeat up to --rank0-timeout, and not at the first
        sync point's scalars, where they would wait in an all-reduce that --timeout bounds."""
        with self.ctx.main_only("TensorBoard event file"):
            if self.outputs:
                self.fault.before_event_file()
                self.outputs.tensorboard.open()

    def summary_written_before(self) -> dict | None:
        """The summary a run resumed with nothing left to train had already written, at
        this step (rank 0's; {} on the others), or None: then a rerun leaves its files as
        they are (the summary's times among them). A run stopped by a signal after its last
        step has none: it finishes now; so does one extended (a larger --max-steps or
        --epochs) and stopped at its new last step, whose summary.json is the shorter run's.
        Rank 0 reads it once; every rank takes its answer."""
        summary = read_summary(self.run_dir) if self.ctx.is_main else None
        written = summary is not None and type(summary.get("steps")) is int and summary["steps"] == self.progress.step
        return (summary or {}) if self.ctx.gather([int(written)])[0][0] else None

    def train_epoch(self) -> None:
        """Steps from the current position to the end of the epoch (or to --max-steps)."""
        p, show = self.progress, self.ctx.is_main and sys.stderr.isatty()
        with ProgressBar(total=self.stream.steps_per_epoch, initial=p.epoch_steps, desc=f"epoch {p.epoch + 1}/{self.config.epochs}", leave=False, disable=not show) as bar:
            self.window.restart(p.step_in_macro)
            for macro in self.stream.epoch(p.epoch, start_index=p.macro, next_epoch_follows=self.next_epoch_follows()):
                macro.wait_until_ready()
                if self.graphed:
                    self.graphed.load(macro, p.step_in_macro)
                if self.augment.active:
                    self.augment_params = self.augment.draw(macro.epoch, macro.index, macro.steps * self.config.batch_size)
                for i in range(p.step_in_macro, macro.steps):
                    self.train_step(macro, i)
                    p.advance(last_in_macro=i + 1 == macro.steps)
                    bar.update()
                    if self.window.count == self.config.log_every or p.step_in_macro == 0 or self.checkpoint_due() or self.reached_max_steps():
                        self.sync_point(bar)
                    if self.reached_max_steps():
                        return

    def warm_up(self) -> float:
        """Capture the step's CUDA graph, or compile the step, before the clock starts, then
        rehearse the rest of a step on throwaway tensors. Gradients are dropped and BatchNorm's
        running statistics put back, so the weights, the optimizer and the RNG are as they were."""
        started = time.perf_counter()
        try:
            if self.graphed:
                self.graphed.capture()
            else:
                self.compile_passes()
        except compiler_unusable() as e:
            reason = str(e).strip().splitlines()[0][:300]
            raise HarnessError(f"--compile {self.compile_mode}: torch.compile could not build the step ({reason}); "
                               "--compile cuda-graph (on one GPU) or '' needs no compiler") from None
        self.rehearse_the_rest_of_a_step()
        seconds = time.perf_counter() - started
        what = f"captured the step as one CUDA graph ({self.compile_mode})" if self.graphed else f"compiled the step ({self.compile_mode})"
        log.info(f"{what} in {seconds:.2f} s, before training")
        return seconds

    def compile_passes(self) -> None:
        """Three forward and backward passes through the compiled step on a batch of zeros."""
        local = self.config.batch_size // self.ctx.world_size
        images = torch.zeros(local, 28, 28, dtype=torch.uint8, device=self.ctx.device)
        labels = torch.zeros(local, dtype=torch.int64, device=self.ctx.device)
        with buffers_restored(self.model):
            for _ in range(3):
                with autocast(self.ctx.device, self.config.precision):
                    self.train_loss_fn(self.trained(self.normalize(images)), labels).backward()
                self.optimizer.zero_grad(set_to_none=True)
        if self.ctx.device.type == "cuda":
            torch.cuda.synchronize(self.ctx.device)

    def rehearse_the_rest_of_a_step(self) -> None:
        """The optimizer's update and a sync point's work, once, on throwaway tensors, so that
        their kernels' first launches are not in the first epoch. On an H200 that epoch took
        0.06-0.09 s longer than the next ones (docs/gpu-h200-2026-11-26/run5); that first
        launches are the cause (CUDA loads a kernel's module at its first launch) is a
        hypothesis, which bench_gpu.py's first_epoch_extra measures."""
        params = [torch.zeros_like(p, requires_grad=True) for p in self.model.parameters()]
        for p in params:
            p.grad = torch.zeros_like(p)
        optimizer = type(self.optimizer)(params, **self.optimizer.defaults)
        optimizer.step()  # creates the momentum buffers
        optimizer.step()  # reads them
        window = LossWindow(torch.zeros(1, device=self.ctx.device))
        window.add(torch.zeros((), device=self.ctx.device))
        agree_at_sync_point(self.ctx, window.values(), 0, self.stop_request)

    def train_step(self, macro: MacroBatch, i: int) -> None:
        """One optimizer step on this rank's slice of global batch `i`; nothing here waits for
        the device (but SyncBatchNorm: --batch-norm on several ranks)."""
        self.fault.before_step(self.progress.step, self.ctx.rank)  # test-only fault injection
        if self.graphed:
            loss = self.graphed()  # the same gather, forward, loss, backward and update, replayed as one CUDA graph
            corrupted = self.fault.corrupt_loss(loss, self.progress.step, self.ctx.rank)  # the NaN check sees it; the weights do not
            loss = None if corrupted is loss else corrupted  # None: the graph has written the loss into the window
        else:
            images, labels = macro.local_batch(i)
            inputs = self.normalize(images)
            if self.augment_params is not None:
                local = self.config.batch_size // self.ctx.world_size
                first = i * self.config.batch_size + self.ctx.rank * local  # the rows of this rank's slice, as local_batch takes them
                inputs = self.augment(inputs, self.augment_params[first : first + local])
            with autocast(self.ctx.device, self.config.precision):
                loss = self.train_loss_fn(self.trained(inputs), labels)
            loss = self.fault.corrupt_loss(loss, self.progress.step, self.ctx.rank)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        self.fault.corrupt_weights(self.model, self.progress.step, self.ctx.rank)  # test-only
        if self.config.lr_schedule == "onecycle" and self.scheduler.last_epoch + 1 < self.scheduler.total_steps:
            self.step_schedule()  # per step, but not past the last one, where the lr would fall below 0
        self.window.add(loss)

    def step_schedule(self) -> None:
        self.scheduler.step()
        self.keep_lr_float32()

    def keep_lr_float32(self) -> None:
        """On a GPU the learning rate is always a float32 value. The CUDA-graph step's update
        reads it from a float32 tensor (the fused kernel takes no other), and the eager
        update, given the same number, then does the same arithmetic, so that the two modes
        end bitwise equal and a checkpoint moves between them (tests/test_gpu.py checks
        both). A schedule's next lr is computed from this one, so it is rounded at every
        change, in every mode. The CPU keeps its float64 values, which its recorded results
        were trained with."""
        if self.ctx.device.type == "cuda":
            for group in self.optimizer.param_groups:
                group["lr"] = float(np.float32(group["lr"]))

    def sync_point(self, bar: ProgressBar) -> None:
        """All ranks: log the window's mean loss, fail on a non-finite loss, honour a stop signal."""
        window, lr = self.window, self.optimizer.param_groups[0]["lr"]  # now: a one-cycle schedule moves it every step
        if self.progress.step_in_macro == 0 and not self.epoch_ends_here():
            # A macro-batch ended: its successor must be loaded before the all-reduce, so
            # that a stop signal that comes while it loads is this sync point's, on every rank.
            # (At an epoch's end, see stop_if_signalled_while_the_next_epoch_loads.)
            self.stream.load_next(give_up=lambda: self.stop_request.requested)
        mean_loss, stop = agree_at_sync_point(self.ctx, window.values(), self.progress.step - window.count, self.stop_request)
        # After the sync, so the window's time includes the device finishing its steps (on a
        # GPU the host runs ahead of them) and the all-reduce.
        seconds = time.perf_counter() - window.started
        self.progress.add_window(mean_loss, window.count, seconds)
        self.spent["steps"] += seconds  # this process's: a resumed epoch's earlier windows are in epoch_seconds only
        if self.ctx.is_main:
            rate = window.count * self.config.batch_size / seconds
            self.outputs.tensorboard.scalars(self.progress.step, {"train/loss": mean_loss, "train/lr": lr, "train/samples_per_s": rate})
            bar.set_postfix(loss=f"{mean_loss:.4f}")
        # Where the epoch ends here, end_epoch checkpoints, after validating, and a stop
        # waits for it: a step is checkpointed once, in the state a resume continues from.
        epoch_ends = self.epoch_ends_here()
        if (stop or self.checkpoint_due()) and not epoch_ends:
            self.checkpoint(wait=bool(stop))  # the stop record names a checkpoint that is on disk
        window.restart(self.progress.step_in_macro)  # after the checkpoint, whose time is not the steps'
        self.stop_reason = stop
        if stop and not epoch_ends:
            self.stop()

    def stop(self, what: str = "and checkpointed") -> None:
        """All ranks, once the stop's checkpoint is on disk: record the stop, then raise Stopped."""

        def record() -> None:
            self.fault.before_stop_record()
            self.outputs.stopped(self.progress.step, self.stop_reason)

        stop_every_rank(self.ctx, self.progress.step, self.stop_reason, what, record)

    def stop_if_signalled_during_start_up(self) -> None:
        """All ranks, before the first step: a stop signal that came during start-up (joining
        the process group, reading the data, compiling) stops the run now, as at a sync
        point, with nothing new to checkpoint: a batch script requeues it, and it resumes
        from where it started. One all-reduce, so that every rank decides alike."""
        if self.stop_asked_on_any_rank():
            self.stop(START_UP_STOP)

    def stop_if_signalled_while_the_next_epoch_loads(self) -> None:
        """All ranks, between two epochs: the next epoch's first macro-batch loads (with the
        prefetch thread, since the last one's training, through validation), and a stop
        signal that comes meanwhile, or came during validation, stops the run here, at the
        epoch's checkpoint. The sync point at an epoch's end does not wait for it, so that
        the load overlaps validation and an early stop does not wait for a load it drops."""
        self.stream.load_next(give_up=lambda: self.stop_request.requested)
        if self.stop_asked_on_any_rank():
            self.wait_for_writes()  # the stop record names a checkpoint that is on disk
            self.stop()

    def stop_asked_on_any_rank(self) -> bool:
        """All ranks: whether any rank got a stop signal (setting stop_reason if so)."""
        self.stop_reason = signal_any_rank_got(self.ctx, self.stop_request)
        return bool(self.stop_reason)

    def end_epoch(self) -> None:
        """Validate (rank 0), decide on early stopping (every rank, from the broadcast loss), checkpoint."""
        p = self.progress
        lr = self.optimizer.param_groups[0]["lr"]
        val_loss = self.validate(lr)
        if p.macro == self.stream.macro_batches_per_epoch:  # the epoch is complete (not cut by --max-steps)
            p.record_validation(val_loss)  # early stopping compares whole epochs only
            if self.config.lr_schedule == "exponential":
                self.step_schedule()
            p.next_epoch()
        if self.stopped_early():
            log.info(f"early stopping: no better {self.val_set} loss for {self.config.early_stopping} epochs")
        if self.reached_max_steps():
            log.info(f"stopping after --max-steps {self.config.max_steps}")
        self.checkpoint(wait=bool(self.stop_reason))

    @contextlib.contextmanager
    def timed(self, part: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.spent[part] += time.perf_counter() - started

    def validate(self, lr: float) -> float:
        """Rank 0 evaluates and writes the epoch's metrics; the others then get the loss in a broadcast."""
        p, loss = self.progress, torch.zeros(1, dtype=torch.float64, device=self.ctx.device)
        with self.ctx.main_only("validation"):
            if self.ctx.is_main:
                self.fault.during_validation(p.step)  # test-only
                with self.timed("validation"):
                    result = self.evaluate_on(self.val_images, self.val_labels)
                self.last_eval = (p.step, result)
                p.last_metrics = {
                    "epoch": p.epoch + 1,  # a partial epoch (--max-steps) too; a resume drops its line
                    "step": p.step,
                    "train_loss": p.epoch_loss_sum / max(p.epoch_steps, 1),
                    "val_loss": result.loss,
                    "val_accuracy": result.accuracy,
                    "lr": lr,
                    "epoch_seconds": p.epoch_seconds,
                    "train_samples_per_s": p.epoch_steps * self.config.batch_size / max(p.epoch_seconds, 1e-9),
                }
                with self.timed("epoch_outputs"):  # metrics.jsonl, TensorBoard scalars and weight images
                    self.outputs.epoch(p.last_metrics, self.config.epochs, self.model, p.step)
                loss[0] = result.loss
        return self.ctx.broadcast_from_main(loss).item()

    def evaluate_on(self, images: torch.Tensor, labels: torch.Tensor) -> EvalResult:
        """Rank 0: the model's figures on a split held on the device (validation or test)."""
        return evaluate(self.model, images, labels, self.normalize, self.loss_fn, self.config.eval_batch)

    def test_before_training(self) -> None:
        """Rank 0: the test-set figures of the initial weights (chance, ~10%, unless the
        initialisation is degenerate), recorded in summary.json and TensorBoard at step 0."""
        with self.ctx.main_only("test before training"):
            if self.ctx.is_main:
                result = self.evaluate_on(self.test_images, self.test_labels)
                self.progress.before_training = {"test_loss": result.loss, "test_accuracy": result.accuracy}
                self.outputs.tensorboard.scalars(0, {"test/loss": result.loss, "test/accuracy": result.accuracy})
                log.info(f"before training: test loss {result.loss:.4f}  accuracy {100 * result.accuracy:.2f}%")

    def epoch_ends_here(self) -> bool:
        """The step just taken ends the epoch's training: its last, or --max-steps."""
        return self.progress.macro == self.stream.macro_batches_per_epoch or self.reached_max_steps()

    def checkpoint_due(self) -> bool:
        return bool(self.config.checkpoint_every) and self.progress.step % self.config.checkpoint_every == 0

    def reached_max_steps(self) -> bool:
        return bool(self.config.max_steps) and self.progress.step >= self.config.max_steps

    def next_epoch_follows(self) -> bool:
        """Whether the epoch in progress will be followed by another, as far as is known
        before it ends (early stopping and stop signals are not: the stream then drops the
        next epoch's first macro-batch, which it loaded ahead)."""
        c = self.config
        return self.progress.epoch + 1 < c.epochs and not (c.max_steps and c.max_steps <= (self.progress.epoch + 1) * self.stream.steps_per_epoch)

    def stopped_early(self) -> bool:
        return bool(self.config.early_stopping) and self.progress.stale_epochs >= self.config.early_stopping

    def training_left(self) -> bool:
        return self.progress.epoch < self.config.epochs and not self.finished()

    def finished(self) -> bool:
        # Derived, not checkpointed: a finished run resumed with a larger --max-steps or
        # --epochs goes on; early stopping stays decided.
        return self.reached_max_steps() or self.stopped_early()

    # --- start and finish -------------------------------------------------------------------------

    def log_start(self) -> None:
        c = self.config
        log.info(
            f"{sum(p.numel() for p in self.model.parameters()):,}-parameter {c.model} on {self.ctx.device}, "
            f"world size {self.ctx.world_size}{f' ({self.ctx.backend})' if self.ctx.backend else ''}, {c.precision}"
            f"{', deterministic' if c.deterministic else ''}{f', compiled ({self.compile_mode})' if self.compile_mode else ''}, "
            f"{self.threads} CPU thread(s) per rank ({self.threads_why}), {self.malloc}; "
            f"{self.n_train:,} training images, {self.stream.steps_per_epoch} steps of {c.batch_size} per epoch, "
            f"validating on {self.val_set}"
        )
        if c.early_stopping and not c.holdout:
            log.warning(f"--early-stopping {c.early_stopping} without --holdout: when to stop is chosen on the test set, "
                        "whose accuracy the run then reports; give --holdout N to choose it on held-out training images")

    def finish(self, seconds: float) -> dict:
        """Every rank reports its step count and parameter digest; rank 0 tests and writes the summary."""
        checksum = parameter_checksum(self.model)
        save_rank_files(self.model, self.ctx.rank)  # test-only
        per_rank = self.ctx.gather([self.progress.step, *distributed.digest_ints(checksum)])
        ranks_agree = all(r[1:] == per_rank[0][1:] for r in per_rank)
        if not ranks_agree:
            log.error("ranks ended with different parameters")
        with self.ctx.main_only("test and run files"):
            if self.ctx.is_main:
                return self.write_summary(seconds, checksum, per_rank, ranks_agree)
        return {}

    def write_summary(self, seconds: float, checksum: str, per_rank: list[list[int]], ranks_agree: bool) -> dict:
        test = self.test_result()
        summary = {
            "final": self.progress.last_metrics,
            "test_loss": test.loss,
            "test_accuracy": test.accuracy,
            "before_training": self.progress.before_training,
            "world_size": self.ctx.world_size,
            "steps": self.progress.step,
            "steps_per_rank": [r[0] for r in per_rank],
            "epochs_run": self.progress.epoch,
            "total_seconds": seconds,
            "loop_seconds_by_part": self.loop_breakdown(seconds),
            "compile_seconds": self.compile_seconds,
            "param_checksum": checksum,
            "ranks_identical": ranks_agree,
            "threads_per_rank": self.threads,
            "device": str(self.ctx.device),
            "backend": self.ctx.backend or "none",  # one process, no launcher: no process group
            "config": dataclasses.asdict(self.config),
            "normalization_stats": stats_used(self.config.normalize, self.train_stats),
            "shard_set_sha256": self.shard_set,
        }
        self.outputs.finish(summary, test, "test", self.model)
        return summary

    def loop_breakdown(self, seconds: float) -> dict:
        """total_seconds split into the training steps (sync points and macro-batch reads
        included), rank 0's validation and epoch outputs, checkpoints, and the rest."""
        parts = {part: round(spent, 4) for part, spent in self.spent.items()}
        parts["other"] = round(seconds - sum(self.spent.values()), 4)
        log.info("training loop " + f"{seconds:.2f} s: " + ", ".join(f"{part} {spent:.2f}" for part, spent in parts.items()))
        return parts

    def test_result(self) -> EvalResult:
        """The test-set result: the last validation's when it was on the test set at this
        step, else a fresh evaluation (holdout runs, a resumed finished run)."""
        if not self.config.holdout and self.last_eval and self.last_eval[0] == self.progress.step:
            return self.last_eval[1]
        return self.evaluate_on(self.test_images, self.test_labels)


def open_shards(ctx: distributed.DistContext, location: str | Path, cache_dir: Path | None, cache_limit: int | None,
                stop_request: StopRequest, run_dir: Path) -> ShardSource:
    """All ranks: the shard set. From a URL, opening it fetches its manifest, and a stop
    signal cuts that fetch short (a stalled server would hold the stop through its retries,
    past a launcher's grace period). Then, or on a signal that came sooner, every rank stops
    here, before training, with the stop record a batch script requeues by, and a resume
    starts from the newest checkpoint as before."""
    source = None
    try:
        source = ShardSource(location, cache_dir, cache_limit, cancel_when=lambda: stop_request.requested)
    except HarnessError:
        if not stop_request.requested:
            raise
    reason = signal_any_rank_got(ctx, stop_request)  # set where the fetch was cut: that rank was asked
    if not reason:
        return source
    newest = list_checkpoints(run_dir)
    step = marker_step(newest[0]) if newest else 0
    stop_every_rank(ctx, step, reason, START_UP_STOP, lambda: write_start_up_stop_record(run_dir, step, reason))


def train(config: TrainConfig, shards: str | Path, run_dir: Path | None, resume: str = "auto", name: str = "",
          cache_dir: Path | None = None, cache_limit_gb: float | None = None, stop_request: StopRequest | None = None) -> dict:
    """Train on this process's rank (or alone); rank 0's summary, {} on the others.
    `shards` is a directory or a URL (its files cached in `cache_dir`, at most
    `cache_limit_gb`). Without a `run_dir`, the run goes to default_run_dir(`name`, or
    the model's name). `resume`: as for Trainer. `stop_request`: the process's signal
    handlers, if installed before."""
    # First: from here on a SIGTERM (Slurm's preemption or time limit) is a stop to honour,
    # not the end of the process, through joining the process group and all of start-up.
    stop_request = stop_request or StopRequest()
    ctx = distributed.init_distributed(config.device, config.timeout, config.rank0_timeout, config.backend)
    named_here = run_dir is None
    try:
        setup_logging(ctx.rank)
        distributed.refuse_different_options(ctx, run_options(config, name))
        run_dir = run_dir or default_run_dir(name or config.model, ctx)
        limit = None if cache_limit_gb is None else int(cache_limit_gb * 1e9)
        source = open_shards(ctx, shards, cache_dir, limit, stop_request, run_dir)
        log.info(f"run directory {run_dir}")  # once the shard set is open: a run refused for it has none
        summary = Trainer(config, source, run_dir, ctx, resume, stop_request).fit()
        ctx.barrier()  # every rank tears the process group down together
        return summary
    except (RuntimeError, torch.distributed.DistError) as e:
        failure = distributed.explain_collective_failure(e, config.timeout)
        if failure is None:
            raise
    finally:
        distributed.shutdown(ctx)
        if named_here and ctx.is_main and run_dir is not None:
            remove_if_unused(run_dir)  # a run refused at start-up leaves no empty directory behind
    raise failure  # outside the except block, so no frame keeps the failed collective's traceback


# May differ between ranks: a node's cores, and the device (whose kind the ranks compare
# themselves: distributed.check_same_device_type).
PER_RANK_OPTIONS = ("threads", "device")


def run_options(config: TrainConfig, name: str) -> dict[str, object]:
    """What every rank of a run must be given alike, by option name; `name` (the preset's)
    names the default run directory. Not --shards, --run-dir or --resume: a path may read
    differently on each node (another mount point), and the ranks compare what they find
    there, the manifests and the checkpoint they resume from."""
    options = {f"--{flag(key)}": value for key, value in dataclasses.asdict(config).items() if key not in PER_RANK_OPTIONS}
    return {**options, "--preset": name}


def run_dir_option(text: str) -> Path:
    return given_path(text, "give a directory, or leave --run-dir out")


def positive_gigabytes(text: str) -> float:
    """argparse type of --shard-cache-limit-gb: a number of gigabytes that is at least a byte
    (checked here, with the other options, not once the run has started)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and int(value * 1e9) >= 1):
        raise argparse.ArgumentTypeError(f"{text!r}: give a positive number of gigabytes")
    return value


def resume_option(text: str) -> str:
    return given(text, "give auto, never, or a checkpoint's step-N.pt")


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or OptionParser(prog="python -m harness.train", description="Train on packed shards.")
    # No prefixes (--run-d for --run-dir): slurm/train.sbatch must see --run-dir, --preset,
    # --shards and --resume spelled out to refuse or drop them.
    parser.allow_abbrev = False
    parser.add_argument("--preset", type=given, help=f"one of {', '.join(preset_names())} (harness/presets/*.toml); options given as well override it")
    parser.add_argument(
        "--shards", type=given, default="shards",
        help="shard directory (default shards/), or a URL: https://HOST/PATH/, gs://BUCKET/PATH/ (sftp://, ftps://, "
        "scp:// too) or 'pipe:COMMAND {name}' (e.g. 'pipe:aws s3 cp s3://BUCKET/mnist/{name} -'), whose manifest.json "
        "and shards are fetched into --shard-cache",
    )
    parser.add_argument("--shard-cache", type=given_path, help="shards from a URL are kept in its shards/ folder (default ~/.cache/mnist-harness, or $HARNESS_CACHE)")
    parser.add_argument("--shard-cache-limit-gb", type=positive_gigabytes, help="evict least recently used cached shards beyond this size (default: no limit)")
    parser.add_argument(
        "--run-dir", type=run_dir_option,
        help="where metrics, TensorBoard events and checkpoints go "
        "(default runs/PRESET-YYYYMMDD-HHMMSS, the model's name without --preset; in a Slurm job runs/PRESET-slurm-JOBID)",
    )
    parser.add_argument(
        "--resume", type=resume_option, default="auto",
        help="auto (default): continue from the newest valid checkpoint in RUN_DIR/checkpoints if any; "
        "never: start over (refused if RUN_DIR already holds a run); or a checkpoint's path",
    )
    add_config_options(parser)
    return parser


def run_from_args(args: argparse.Namespace) -> int:
    try:
        config = build_config(args.preset, args)
        cache_options = [o for o, v in (("--shard-cache", args.shard_cache), ("--shard-cache-limit-gb", args.shard_cache_limit_gb)) if v is not None]
        if cache_options and is_a_local_directory(args.shards):
            raise HarnessError(f"{' and '.join(cache_options)}: for shards from a URL; --shards {args.shards} is a local directory")
    except HarnessError as e:  # from the command line and the launcher's environment, alike on every rank of a node
        raise AgreedError(str(e)) from None
    try:
        train(config, args.shards, args.run_dir, args.resume, name=args.preset or "", cache_dir=args.shard_cache,
              cache_limit_gb=args.shard_cache_limit_gb, stop_request=getattr(args, "stop_request", None))  # harness.cli's, if started so
    except Stopped:
        return EXIT_STOPPED
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_guarded(run_from_args, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
