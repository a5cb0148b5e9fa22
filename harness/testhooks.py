"""Hooks for the tests, off unless their environment variables are set.

HARNESS_TEST_FAULT=KIND@STEP[:RANK] injects a fault into one rank (see `Fault`).
HARNESS_TEST_RANK_WEIGHTS=DIR makes every rank save its final parameters as
DIR/rank-R.pt, so that a test can compare the ranks' weights itself instead of
trusting the run's own `ranks_identical`.
HARNESS_TEST_RANK_RNG=DIR makes the ranks' CPU generator states differ (see
`diverge_rank_rng`) and every rank save its final state as DIR/rank-R-rng.pt.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class Fault:
    """A fault to inject from HARNESS_TEST_FAULT=KIND@STEP[:RANK].

    nan: the loss of that step is NaN; infweights: after that step's update one weight
    is infinite (an update that overflowed, which no loss has seen yet); exit: the rank exits with status 1 before that
    step; hang: the rank sleeps forever before that step (a stuck rank, alive but
    silent), until a SIGTERM ends it (see `before_step`); kill: the rank SIGKILLs itself
    before that step, on torchrun's first attempt only (so an elastic restart can
    succeed); sleep=SECONDS: the rank sleeps that long before that step (a window in
    which a test can signal a run that a GPU would otherwise finish first); term: the
    rank sends itself a SIGTERM before that step (a stop signal at a chosen step);
    slowsave=SECONDS: rank 0 takes that long over the checkpoint of that step while the
    other ranks wait (a slow shared filesystem); slowwrite=SECONDS: rank 0's background
    writer takes that much longer to write that step's checkpoint file, while training
    goes on; freeze: rank 0 stops itself (SIGSTOP) while writing that checkpoint,
    heartbeat included; slowstop=SECONDS: the rank sends itself a SIGTERM before that
    step (as term), and rank 0 takes SECONDS more over the stop record; termval: rank 0
    sends itself a SIGTERM as it validates after that step (after the epoch's last sync
    point: the stop between two epochs); slowevents=SECONDS (any STEP): rank 0 takes that
    long more to create TensorBoard's event file.
    Unset, nothing is injected.
    """

    kind: str = ""
    step: int = -1
    rank: int = 0
    seconds: float = 0.0

    @classmethod
    def from_env(cls) -> "Fault":
        spec = os.environ.get("HARNESS_TEST_FAULT", "")
        if not spec:
            return cls()
        what, _, where = spec.partition("@")
        kind, _, seconds = what.partition("=")
        step, _, rank = where.partition(":")
        if kind == "kill" and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
            return cls()
        return cls(kind, int(step), int(rank or 0), float(seconds or 0))

    def before_step(self, step: int, rank: int) -> None:
        if step != self.step or rank != self.rank:
            return
        if self.kind == "exit":
            os._exit(1)
        if self.kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if self.kind == "sleep":
            time.sleep(self.seconds)
        if self.kind in ("term", "slowstop"):
            os.kill(os.getpid(), signal.SIGTERM)
        if self.kind == "hang":
            # When another rank fails, torchrun SIGTERMs this one and waits 30 s before a
            # SIGKILL (torch 2.13's agent ignores TORCH_ELASTIC_SHUTDOWN_TIMEOUT on that path).
            # Ending at the SIGTERM spares the tests those 30 s; the `freeze` fault still
            # covers a rank that cannot answer it.
            signal.signal(signal.SIGTERM, lambda *_: os._exit(128 + signal.SIGTERM))
            while True:
                time.sleep(3600)

    def before_checkpoint(self, step: int, rank: int) -> None:
        if step != self.step or rank != self.rank:
            return
        if self.kind == "slowsave":
            time.sleep(self.seconds)
        if self.kind == "freeze":
            os.kill(os.getpid(), signal.SIGSTOP)

    def during_validation(self, step: int) -> None:
        """Rank 0, about to validate after `step`."""
        if self.kind == "termval" and step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)

    def before_stop_record(self) -> None:
        """Rank 0, about to write a stop's record (stopped.json)."""
        if self.kind == "slowstop":
            time.sleep(self.seconds)

    def before_event_file(self) -> None:
        """Rank 0, about to create TensorBoard's event file."""
        if self.kind == "slowevents":
            time.sleep(self.seconds)

    def checkpoint_write_hook(self, step: int, rank: int):
        """slowwrite: a callable for the background writer to run before it writes that
        step's checkpoint file; None otherwise."""
        if self.kind == "slowwrite" and step == self.step and rank == self.rank:
            return lambda: time.sleep(self.seconds)
        return None

    def corrupt_weights(self, model: torch.nn.Module, step: int, rank: int) -> None:
        if self.kind == "infweights" and step == self.step and rank == self.rank:
            with torch.no_grad():
                next(model.parameters()).view(-1)[0] = float("inf")

    def corrupt_loss(self, loss, step: int, rank: int):
        return loss * float("nan") if self.kind == "nan" and step == self.step and rank == self.rank else loss


def diverge_rank_rng(rank: int, fresh_start: bool) -> None:
    """On a fresh start, rank R draws R + 1 numbers from torch's CPU generator, after the
    initial weights: training draws none after those, so without this every rank's state
    would be the same, and a test could not tell a rank's own state from another's."""
    if os.environ.get("HARNESS_TEST_RANK_RNG") and fresh_start:
        torch.rand(rank + 1)


def save_rank_files(model: torch.nn.Module, rank: int) -> None:
    """At a run's end, each rank's own: its parameters as HARNESS_TEST_RANK_WEIGHTS/rank-R.pt
    and its CPU generator's state as HARNESS_TEST_RANK_RNG/rank-R-rng.pt, where set."""
    wanted = (
        ("HARNESS_TEST_RANK_WEIGHTS", f"rank-{rank}.pt", lambda: {k: v.detach().cpu() for k, v in model.state_dict().items()}),
        ("HARNESS_TEST_RANK_RNG", f"rank-{rank}-rng.pt", torch.get_rng_state),
    )
    for variable, name, value in wanted:
        directory = os.environ.get(variable)
        if directory:
            Path(directory).mkdir(parents=True, exist_ok=True)
            torch.save(value(), Path(directory) / name)
