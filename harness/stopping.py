"""Graceful stop on SIGTERM / SIGUSR1, and the test-only fault injection.

The signal handler only records the signal; the training loop looks at it at its
next sync point, where all ranks agree to stop at the same step, checkpoint, and
exit with EXIT_STOPPED.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

# sysexits' EX_TEMPFAIL: "temporary failure, the user is invited to retry".
# Launch scripts resubmit or requeue on it; the run resumes from its checkpoint.
EXIT_STOPPED = 75


class StopRequest:
    """Set by SIGTERM (Slurm's warning before preemption or the time limit) or SIGUSR1."""

    def __init__(self):
        self.signal_name: str | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._record)

    def _record(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        return self.signal_name is not None


@dataclass
class Fault:
    """A fault to inject, for tests only, from HARNESS_TEST_FAULT=KIND@STEP[:RANK].

    nan: the loss of that step is NaN; exit: the rank exits with status 1 before that
    step; hang: the rank sleeps forever before that step (a stuck rank, alive but
    silent); kill: the rank SIGKILLs itself before that step, on torchrun's first
    attempt only (so an elastic restart can succeed). Unset, nothing is injected.
    """

    kind: str = ""
    step: int = -1
    rank: int = 0

    @classmethod
    def from_env(cls) -> "Fault":
        spec = os.environ.get("HARNESS_TEST_FAULT", "")
        if not spec:
            return cls()
        kind, _, where = spec.partition("@")
        step, _, rank = where.partition(":")
        if kind == "kill" and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
            return cls()
        return cls(kind, int(step), int(rank or 0))

    def before_step(self, step: int, rank: int) -> None:
        if step != self.step or rank != self.rank:
            return
        if self.kind == "exit":
            os._exit(1)
        if self.kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if self.kind == "hang":
            while True:
                time.sleep(3600)

    def corrupt_loss(self, loss, step: int, rank: int):
        return loss * float("nan") if self.kind == "nan" and step == self.step and rank == self.rank else loss
