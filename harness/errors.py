"""The one error type users see, and how a command turns it into an exit status."""

from __future__ import annotations

import sys

EXIT_USAGE = 2  # a problem the user can fix: bad input, bad option, unusable directory


class HarnessError(Exception):
    """A problem the user can fix (bad input file, bad option, unusable directory).

    The message names the file or option and what is wrong; the CLI prints it
    as one line and exits with status 2 instead of showing a traceback.
    """


def run_guarded(function, args) -> int:
    """Run a command; a HarnessError becomes one line on stderr and exit status 2."""
    try:
        return function(args) or 0
    except HarnessError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
