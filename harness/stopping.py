"""Graceful stop on SIGTERM / SIGUSR1.

The signal handler only records the signal; the training loop looks at it at its
next sync point, where all ranks agree to stop at the same step, checkpoint, and
exit with EXIT_STOPPED.
"""

from __future__ import annotations

import signal

# sysexits' EX_TEMPFAIL: "temporary failure, the user is invited to retry".
# Launch scripts resubmit or requeue on it; the run resumes from its checkpoint.
EXIT_STOPPED = 75


class StopRequest:
    """Set by SIGTERM (Slurm's warning before preemption or the time limit) or SIGUSR1
    (useful without a launcher only: torchrun has no handler for it and dies of it)."""

    def __init__(self):
        self.signal_name: str | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._record)

    def _record(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        return self.signal_name is not None
