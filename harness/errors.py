class HarnessError(Exception):
    """A problem the user can fix (bad input file, bad option, unusable directory).

    The message names the file or option and what is wrong; the CLI prints it
    as one line and exits with status 2 instead of showing a traceback.
    """
