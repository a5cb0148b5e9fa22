"""The one error type users see, and how a command turns it into an exit status."""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import signal
import sys
import threading
from pathlib import Path
from typing import NoReturn

EXIT_USAGE = 2  # a problem the user can fix: bad input, bad option, unusable directory


class HarnessError(Exception):
    """A problem the user can fix (bad input file, bad option, unusable directory).

    The message names the file or option and what is wrong; the CLI prints it
    as one line and exits with status 2 instead of showing a traceback.
    """

    exit_status = EXIT_USAGE


class OptionParser(argparse.ArgumentParser):
    """argparse's parser, whose errors end a command as the harness's others do: one line
    and status 2. (argparse's own print the command's whole usage first: 34 lines for
    `harness train`, above the one that says what was wrong.)"""

    def error(self, message: str) -> NoReturn:
        # Every rank of a job parses the same command line: as for an AgreedError, each
        # node's first rank prints the error.
        printed = prints_what_every_rank_meets()
        self.exit(EXIT_USAGE, f"error: {self.prog}: {message} ({self.prog} --help lists the options)\n" if printed else None)

    def print_help(self, file=None) -> None:
        # Likewise --help, which every rank of a node would print.
        if prints_what_every_rank_meets():
            super().print_help(file)


def given(text: str, hint: str = "") -> str:
    """argparse type of an option that names a file, directory, URL or preset: not empty.
    An empty path is the working directory (Path("") is "."), where `pack --out ""` from an
    unset variable put its shards, and an empty --preset meant none. `hint`: what to give
    instead, for an option whose help alone does not say."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty (an unset shell variable?)" + (f": {hint}" if hint else ""))
    return text


def given_path(text: str, hint: str = "") -> Path:
    """A path option, `~` expanded: one that reaches the harness unexpanded (quoted, or from
    a variable set in a file) made a folder named `~` in the working directory. `hint`: as
    for `given`."""
    return Path(given(text, hint)).expanduser()


class AgreedError(HarnessError):
    """A HarnessError that every rank of a job raises alike, with the same message: one
    decided through a collective (a NaN loss, the ranks' kinds of device) or from what the
    ranks share (the options, the world size, the manifest). Each node's first rank
    (LOCAL_RANK 0) prints it and the others exit with its status silently: eight ranks on
    a node print one line, not eight of the same. Errors of one rank's own (its GPU, its
    store, its files) stay HarnessErrors, printed by whichever rank meets them."""


def prints_what_every_rank_meets() -> bool:
    """Whether this process prints an error that every rank meets alike: LOCAL_RANK 0, or a
    process alone (a stray LOCAL_RANK or not)."""
    return os.environ.get("LOCAL_RANK", "0") == "0" or os.environ.get("WORLD_SIZE", "1") == "1"


def printed_here(error: HarnessError) -> bool:
    """Whether this process prints `error`: not an AgreedError in a local rank other than 0."""
    return not isinstance(error, AgreedError) or prints_what_every_rank_meets()


_job_rank: int | None = None  # this process's rank, once it is one of a job's several ranks


def note_job_rank(rank: int | None) -> None:
    """Set (by distributed.init_distributed) once this process is one rank of several: its
    own errors from then on are led by its rank. None: a process alone again."""
    global _job_rank
    _job_rank = rank


def from_this_rank(message: str) -> str:
    """A rank's own error, led by its rank: a job's ranks share one terminal or log, and an
    error met by one of them (its shard, its GPU, its disk) says where to look by it. The
    messages leave their rank to this."""
    if _job_rank is None:
        return message
    return f"rank {_job_rank}: {message}"


def print_line(line: str) -> None:
    """One line on stderr in one write: the ranks of a job share it, and print()'s separate
    write of the newline let another rank's line in before it (two errors on one line, seen in CI)."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE  # what a shell reports for a C tool that SIGPIPE ended
EXIT_INTERRUPTED = 128 + signal.SIGINT  # likewise for one that Ctrl-C ended
EXIT_TERMINATED = 128 + signal.SIGTERM
EXIT_OS_ERROR = 1  # the system refused a file operation: a full disk, a read-only directory


class SystemRefused(HarnessError):
    """The system refused a write the harness wraps to say what it kept (a checkpoint, a
    shard set): one line, with the operating system's status, not the one for bad input."""

    exit_status = EXIT_OS_ERROR


class Terminated(BaseException):
    """SIGTERM (kill's default, a scheduler's) to a command: it ends as Ctrl-C ends one,
    through its cleanup (`harness pack` removes its temporary directory), where Python's
    default action for the signal would end the process on the spot. `harness train`
    installs its own handler: there a SIGTERM asks for a stop at the next sync point."""


def _raise_terminated(signum, frame):
    raise Terminated


@contextlib.contextmanager
def signals_held():
    """Within: a SIGINT or SIGTERM is noted, not acted on; on leaving, the first one noted
    raises KeyboardInterrupt or Terminated, as its handler would have. For torch's import:
    there a handler's exception can land inside a C++ callback of torch's extension
    (torch._C._c10d_init), where it aborts the process (SIGABRT, a core dump) instead of
    unwinding: a review saw it 5 times in 100 signals sent 0.3-0.4 s into `harness show`.
    A signal the process ignores (SIGINT in a background job) stays ignored. Yields the
    signal numbers noted so far: a caller that handles them itself installs its own
    handlers within (they are left in place), then takes the noted ones (empties the list)."""
    noted: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield noted
        return

    def note(signum, frame) -> None:
        noted.append(signum)

    held = [s for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) not in (signal.SIG_IGN, None)]  # None: set outside Python
    previous = {s: signal.signal(s, note) for s in held}
    try:
        yield noted
    finally:
        for s, handler in previous.items():
            if signal.getsignal(s) is note:  # not where the caller has set its own
                signal.signal(s, handler)
    if noted:
        raise KeyboardInterrupt if noted[0] == signal.SIGINT else Terminated


def run_guarded(function, args) -> int:
    """Run a command; a HarnessError becomes one line on stderr and its exit status.
    Output piped into a reader that stops early (`harness show ... | head`) ends the
    command quietly, as it ends a C tool, not with a BrokenPipeError traceback; so does
    Ctrl-C, with one line instead of a KeyboardInterrupt traceback, and an error the
    operating system reports (a full disk, a read-only run directory, a file where a
    directory is wanted), with one line: the file, where the system names it, and its reason."""
    on_main_thread = threading.current_thread() is threading.main_thread()  # where Python runs signal handlers
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if on_main_thread else None
    try:
        status = function(args) or 0
        sys.stdout.flush()  # here, where a closed pipe can still be caught
        return status
    except HarnessError as e:
        if printed_here(e):
            print_line(f"error: {e if isinstance(e, AgreedError) else from_this_rank(str(e))}")
        return e.exit_status
    except KeyboardInterrupt:
        print_line("interrupted")
        return EXIT_INTERRUPTED
    except Terminated:
        print_line("terminated")
        return EXIT_TERMINATED
    except BrokenPipeError:
        # Python flushes stdout again at exit: point it at /dev/null so that flush is quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except OSError as e:
        if e.errno is None:  # not the system's: shown in full, as a bug's would be
            raise
        # A write that fails (ENOSPC, say) names no file: the system's reason alone.
        print_line(f"error: {from_this_rank(('' if e.filename is None else f'{e.filename}: ') + e.strerror)}")
        return EXIT_OS_ERROR
    finally:
        # A failed run's exception chain can keep objects alive in reference cycles, among
        # them a DDP model holding the process group, whose gloo threads must not outlive
        # the interpreter (see distributed.init_distributed): free them while it is whole.
        try:
            gc.collect()
        except (KeyboardInterrupt, Terminated):  # a second Ctrl-C just after a stop's checkpoint: the command has ended
            pass
        if on_main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)  # None: a handler set outside Python
