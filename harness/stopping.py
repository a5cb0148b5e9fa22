"""Graceful stop on SIGTERM / SIGUSR1 / a first Ctrl-C.

The signal handler only records the signal; the training loop looks at it at its
next sync point, where all ranks agree to stop at the same step, checkpoint, and
exit with EXIT_STOPPED.
"""

from __future__ import annotations

import os
import signal

# sysexits' EX_TEMPFAIL: "temporary failure, the user is invited to retry": run again and
# the run resumes from its checkpoint. A process run alone exits with it, and so do the
# launchers (harness.launcher) when the ranks alone got the signal; a torchrun signalled too exits
# otherwise, so slurm/train.sbatch requeues on RUN_DIR/stopped.json instead.
EXIT_STOPPED = 75

# The signals a stop can come from, in the order a stop names them when the ranks got
# different ones.
STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")

# Set by the launchers (harness.launcher) to "SIGNAL:PID" for a signal that came before it (process PID)
# started the ranks: each rank it started (its child) starts with that stop requested.
SIGNAL_BEFORE_START = "HARNESS_SIGNAL_BEFORE_START"


class StopRequest:
    """Set by SIGTERM (Slurm's warning before preemption or the time limit), SIGUSR1
    (useful without a launcher only: torchrun has no handler for it and dies of it) or a
    first SIGINT (Ctrl-C; under torchrun, which forwards it to the ranks). A SIGINT after
    any of them raises KeyboardInterrupt, as Python's own handler does, so that a stop that
    takes too long can still be cut short. (Like Python's own, it is raised when the main
    thread next runs Python code: a rank blocked in a collective gets it when the
    collective returns or times out, after --timeout at most.)"""

    def __init__(self):
        """A signal that came to the launcher (harness.launcher) before it started this rank is requested
        at once."""
        self.signal_name: str | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._record)
        signal.signal(signal.SIGINT, self._interrupt)
        name, _, launcher = os.environ.pop(SIGNAL_BEFORE_START, "").partition(":")  # not for this rank's own children
        if name in STOP_SIGNALS and launcher == str(os.getppid()):  # set by this rank's own launcher, not inherited from further up
            self.signal_name = name

    def replay(self, signals: list[int]) -> None:
        """Signals that came before this existed (while `harness train` imported torch:
        see errors.signals_held), handled as they would have been then."""
        for signum in signals:
            (self._interrupt if signum == signal.SIGINT else self._record)(signum, None)

    def _record(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name

    def _interrupt(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self._record(signum, frame)
        # os.write, not logging or print: a handler can run while they hold their locks.
        # Under a launcher (LOCAL_RANK set) once per node, and without the advice: torchrun
        # turns a second Ctrl-C into a SIGTERM to the ranks, which stops them the same way.
        if "LOCAL_RANK" not in os.environ:
            os.write(2, b"SIGINT: stopping at the next sync point with a checkpoint; Ctrl-C again to stop at once\n")
        elif os.environ["LOCAL_RANK"] == "0":
            os.write(2, b"SIGINT: stopping at the next sync point with a checkpoint\n")

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def votes(self) -> list[float]:
        """This rank's signal as a count per STOP_SIGNALS name, for the ranks to sum."""
        return [float(self.signal_name == name) for name in STOP_SIGNALS]


def agreed_signal(summed_votes: list[float]) -> str:
    """The signal the ranks stop for, from their summed votes, so that every rank names the
    same one, whichever rank got it; "" when none did."""
    return next((name for name, count in zip(STOP_SIGNALS, summed_votes) if count), "")
