"""The one error type users see, and how a command turns it into an exit status."""

from __future__ import annotations

import gc
import sys

EXIT_USAGE = 2  # a problem the user can fix: bad input, bad option, unusable directory


class HarnessError(Exception):
    """A problem the user can fix (bad input file, bad option, unusable directory).

    The message names the file or option and what is wrong; the CLI prints it
    as one line and exits with status 2 instead of showing a traceback.
    """

    exit_status = EXIT_USAGE


def run_guarded(function, args) -> int:
    """Run a command; a HarnessError becomes one line on stderr and its exit status."""
    try:
        return function(args) or 0
    except HarnessError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_status
    finally:
        # A failed run's exception chain can keep objects alive in reference cycles, among
        # them a DDP model holding the process group, whose gloo threads must not outlive
        # the interpreter (see distributed.init_distributed): free them while it is whole.
        gc.collect()
