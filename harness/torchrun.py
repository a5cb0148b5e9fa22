"""torchrun, for batch scripts: a SIGTERM that comes before torchrun has started the ranks
stops them as they start, instead of killing torchrun.

    python -m harness.torchrun [torchrun's options] -m harness train [options]

torchrun sets its SIGTERM handler only as it starts the ranks, after the rendezvous (which
on several nodes waits for every node's torchrun). Until then the signal's default action
killed it: a job stopped in an attempt's first seconds (scancel --signal=TERM, a
preemption) ended with no stop record, and slurm/train.sbatch reported it failed instead of
requeueing it. Here a handler from this process's start notes the signal in the
environment the ranks will inherit (HARNESS_SIGNAL_BEFORE_START); each rank then starts
with that stop requested and stops before training, as on a signal during its start-up
(harness.train.train), leaving the stop record a batch script requeues on. Everything
else is torchrun's own, its SIGTERM handler once it has one.
"""

from __future__ import annotations

import os
import signal
import sys

from harness.stopping import SIGNAL_BEFORE_START


def note_for_the_ranks(signum, frame) -> None:
    # Only an assignment: the handler may run while torch's import is in C++ code, where
    # an exception would abort the process (errors.signals_held).
    os.environ[SIGNAL_BEFORE_START] = signal.Signals(signum).name


def main() -> None:
    os.environ.pop(SIGNAL_BEFORE_START, None)  # one from a caller's environment is not this job's
    signal.signal(signal.SIGTERM, note_for_the_ranks)
    from torch.distributed.run import main as torchrun

    torchrun()


if __name__ == "__main__":
    sys.exit(main())
