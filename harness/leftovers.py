"""What processes killed mid-way (SIGKILL, the OOM killer) leave behind: temporary files
and folders named with their PID, which no later process of theirs will finish. A pack
and a download remove them as they start: those of processes no longer running here, and
an earlier one's with this PID. A live process's are left alone: another pack may be
writing into the same directory. Only this machine's processes are seen: on a directory
shared between machines, another machine's running pack looks dead."""

from __future__ import annotations

import os
import re
import shutil
import stat
from pathlib import Path


def remove_dead_leftovers(directory: Path, name: re.Pattern) -> list[str]:
    """Remove the files and folders in `directory` whose names match `name` (its last group
    the PID that made them) of processes no longer running; the names removed."""
    try:
        entries = sorted(Path(directory).iterdir())
    except PermissionError:  # a directory this user may write but not list: none can be found
        return []
    removed = []
    for path in entries:
        match = name.fullmatch(path.name)
        if not match:
            continue
        pid = int(match[match.lastindex])
        if pid != os.getpid() and process_running(pid):
            continue
        try:
            mode = path.lstat().st_mode
            if stat.S_ISDIR(mode):
                shutil.rmtree(path, ignore_errors=True)
            elif stat.S_ISREG(mode):
                path.unlink()
            if not os.path.lexists(path):
                removed.append(path.name)
        except FileNotFoundError:  # removed by another process meanwhile
            pass
    return removed


def process_running(pid: int) -> bool:
    """Whether a process with this PID runs on this machine (another user's too: signal 0
    to it is refused, not failed)."""
    if pid <= 0:  # kill(0) would ask about this process group
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OverflowError:  # no PID is that large
        return False
    return True
