"""The one error type users see, and how a command turns it into an exit status."""

from __future__ import annotations

import gc
import os
import signal
import sys

EXIT_USAGE = 2  # a problem the user can fix: bad input, bad option, unusable directory


class HarnessError(Exception):
    """A problem the user can fix (bad input file, bad option, unusable directory).

    The message names the file or option and what is wrong; the CLI prints it
    as one line and exits with status 2 instead of showing a traceback.
    """

    exit_status = EXIT_USAGE


EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE  # what a shell reports for a C tool that SIGPIPE ended
EXIT_INTERRUPTED = 128 + signal.SIGINT  # likewise for one that Ctrl-C ended


def run_guarded(function, args) -> int:
    """Run a command; a HarnessError becomes one line on stderr and its exit status.
    Output piped into a reader that stops early (`harness show ... | head`) ends the
    command quietly, as it ends a C tool, not with a BrokenPipeError traceback; so does
    Ctrl-C, with one line instead of a KeyboardInterrupt traceback."""
    try:
        status = function(args) or 0
        sys.stdout.flush()  # here, where a closed pipe can still be caught
        return status
    except HarnessError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_status
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # Python flushes stdout again at exit: point it at /dev/null so that flush is quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    finally:
        # A failed run's exception chain can keep objects alive in reference cycles, among
        # them a DDP model holding the process group, whose gloo threads must not outlive
        # the interpreter (see distributed.init_distributed): free them while it is whole.
        try:
            gc.collect()
        except KeyboardInterrupt:  # a second Ctrl-C just after a stop's checkpoint: the command has ended
            pass
