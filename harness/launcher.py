"""How the launchers run torchrun's elastic agent (torchrun itself, or accelerate launch,
which starts the ranks through it): a SIGTERM that comes before the agent has started the
ranks stops them as they start, instead of killing the launcher; and the ranks' exit
status is passed on. harness.torchrun and harness.accelerate_launch are its two entry
points.

torchrun sets its SIGTERM handler only as it starts the ranks, after the rendezvous (which
on several nodes waits for every node's torchrun). Until then the signal's default action
killed it: a job stopped in an attempt's first seconds (scancel --signal=TERM, a
preemption) ended with no stop record, and slurm/train.sbatch reported it failed instead of
requeueing it. Here a handler from this process's start notes the signal in the
environment the ranks will inherit (HARNESS_SIGNAL_BEFORE_START); each rank then starts
with that stop requested and stops before training, as on a signal during its start-up
(harness.train.train), leaving the stop record a batch script requeues on. (The variable
stays in torchrun's environment: with --max-restarts, each restart's ranks stop so again,
until the restarts are spent; the launchers give none.)

When the ranks fail, torchrun exits with status 1 whatever they exited with; this exits
with the status of the rank torchrun saw fail first (its "root cause"): 75 when the ranks
stopped on a signal, 2 for a refused option or input, 1 for a failure, 128+N for a rank
killed by signal N, as a shell reports a process. It prints torchrun's account of the
failed ranks without the traceback that leads to it, or, for a stop or a refusal, which
the ranks have explained in one line, one line. When torchrun itself gets a signal once
the ranks run (its handler passes it on and waits for them), one line and 128+N where
torchrun prints a traceback and exits 1: the ranks' status is not known then. A Ctrl-C
before torchrun has its handler is one line and 130, not a traceback; so is a lost or
timed-out rendezvous (the node hosting it ended, or a node never joined), with status 1.
Everything else is the launcher's own.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
from collections.abc import Callable

from harness.errors import HarnessError
from harness.stopping import EXIT_STOPPED, SIGNAL_BEFORE_START


EXPLAINED = {EXIT_STOPPED: "stopped", HarnessError.exit_status: "refused"}  # statuses whose ranks print why, in one line


def note_for_the_ranks(name: str, signum, frame) -> None:
    """The first SIGTERM: for the ranks, which start with it requested (and stop at once);
    a second one ends this process, as a SIGTERM did (a node left waiting for the others
    at the rendezvous, up to RDZV_TIMEOUT, can still be ended so)."""
    # Assignments and os.write only: the handler may run while torch's import is in C++
    # code, where an exception would abort the process (errors.signals_held).
    if os.environ.get(SIGNAL_BEFORE_START):
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    os.environ[SIGNAL_BEFORE_START] = f"{signal.Signals(signum).name}:{os.getpid()}"
    os.write(2, name.encode() + b": SIGTERM before the ranks have started (once every node has joined): they will stop "
                b"as they start; another SIGTERM before then ends this at once\n")


def run_launcher(start: Callable[[], object], name: str) -> int:
    """Run a launcher that starts the ranks through torchrun's elastic agent (`start`: torchrun's
    main, or accelerate launch's), with the SIGTERM and exit-status handling above; `name`
    (the entry point's module) leads its lines."""
    # Set now, empty, so that the handler replaces a variable rather than adds one (which
    # can move the environment's array while another thread reads it); an inherited value
    # is not this job's.
    os.environ[SIGNAL_BEFORE_START] = ""
    signal.signal(signal.SIGTERM, functools.partial(note_for_the_ranks, name))
    interrupted: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: interrupted.append(signum))  # held through torch's import (errors.signals_held)
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError

    from harness.distributed import first_line  # with torch, whose import the handlers above come before

    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        if interrupted:
            raise KeyboardInterrupt
        start()
    except KeyboardInterrupt:  # Ctrl-C before torchrun has its handler (the import, the rendezvous)
        print(f"{name}: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    except ChildFailedError as e:
        status = first_failure_status(e)
        if status in EXPLAINED:  # the ranks have said why, in one line
            print(f"{name}: the ranks exited with status {status} ({EXPLAINED[status]})", file=sys.stderr)
        else:
            print(e, file=sys.stderr)  # torchrun's account of the failed ranks, without its traceback
        return status
    except RendezvousError as e:  # torchrun's traceback, some 60 lines, ended in one of these
        print(f"{name}: {type(e).__name__}: {first_line(e)}; {RENDEZVOUS_ADVICE.get(type(e).__name__, RENDEZVOUS_ADVICE[''])}", file=sys.stderr)
        return 1
    except SignalException as e:
        signame = signal.Signals(e.sigval).name
        print(f"{name}: {signame}: passed on to the ranks, which have ended; their last lines say whether they stopped "
              "(and left stopped.json in the run directory) or finished", file=sys.stderr)
        return 128 + int(e.sigval)
    return 0


RENDEZVOUS_ADVICE = {  # by the rendezvous error's class name
    "RendezvousTimeoutError": "not every node joined within the rendezvous' join timeout (launch/multinode.sh: RDZV_TIMEOUT)",
    "RendezvousConnectionError": "the node that hosts the rendezvous (at --rdzv-endpoint) has ended or cannot be reached; "
                                 "its log, and the ranks' lines above, say why",
    "": "see the other nodes' logs",
}


def first_failure_status(error) -> int:
    """The exit status of the rank torchrun saw fail first, as a shell would report it."""
    _, failure = error.get_first_failure()
    status = failure.exitcode
    return status if 0 < status < 256 else 128 - status if -64 < status < 0 else 1
