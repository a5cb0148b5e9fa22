"""Graceful stop on SIGTERM / SIGUSR1 / a first Ctrl-C.

The signal handler only records the signal; the training loop looks at it at its
next sync point, where all ranks agree to stop at the same step, checkpoint, and
exit with EXIT_STOPPED.
"""

from __future__ import annotations

import os
import signal

# sysexits' EX_TEMPFAIL: "temporary failure, the user is invited to retry".
# Launch scripts resubmit or requeue on it; the run resumes from its checkpoint.
EXIT_STOPPED = 75


class StopRequest:
    """Set by SIGTERM (Slurm's warning before preemption or the time limit), SIGUSR1
    (useful without a launcher only: torchrun has no handler for it and dies of it) or a
    first SIGINT (Ctrl-C; under torchrun, which forwards it to the ranks). A SIGINT after
    any of them raises KeyboardInterrupt, as Python's own handler does, so that a stop that
    takes too long can still be cut short. (Like Python's own, it is raised when the main
    thread next runs Python code: a rank blocked in a collective gets it when the
    collective returns or times out, after --timeout at most.)"""

    def __init__(self):
        self.signal_name: str | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._record)
        signal.signal(signal.SIGINT, self._interrupt)

    def _record(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name

    def _interrupt(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self._record(signum, frame)
        # os.write, not logging or print: a handler can run while they hold their locks.
        os.write(2, b"SIGINT: stopping at the next sync point with a checkpoint; Ctrl-C again to stop at once\n")

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    @property
    def reason(self) -> str:
        """Why the ranks stop, once they agreed to: this rank's signal, or another rank's."""
        return self.signal_name or "stop signal on another rank"
