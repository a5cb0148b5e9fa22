"""One run at a time in a run directory.

Rank 0 holds an exclusive lock (flock) on RUN_DIR/lock from before its first write there
until the run ends. A second run started into the same directory (the same command
twice, a sweep that reuses a name) is refused before it writes anything: without the
lock it resumed from the first run's checkpoint, removed that run's unfinished writes,
set its newer checkpoints aside and wrote a second event file, whose purge hid part of
the first run's curves in TensorBoard, before the two collided at a checkpoint's step.

The lock belongs to the process: it goes when the process ends, however it ends (a
SIGKILL, torchrun restarting the group, a job's end), so a requeued or restarted run does
not wait on it, and the file itself stays (removing it would race a run that has just
opened it). Tried on a local filesystem; by the documentation, not tried: on NFS the
kernel maps flock to the server's byte-range locks, which other clients see, and the
lock of a node that was lost lasts until the server lets it go (NFSv4: the client's
lease, 90 s by default), so a run started sooner is refused, naming that node; Lustre
mounted with `localflock` keeps locks per node, unseen by the others, with no error to
tell; a filesystem without locks (Lustre without `flock`) gets a warning and no lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import stat
from pathlib import Path

from harness.errors import HarnessError
from harness.validation import one_line, printable

log = logging.getLogger("harness")

LOCK_NAME = "lock"
HOLDER_MAX_BYTES = 200  # "pid N on HOST"; the file is read back only to name the holder


class RunDirLock:
    fd: int | None = None  # the lock file's descriptor, while the lock is held

    def __init__(self, run_dir: Path):
        path = Path(run_dir) / LOCK_NAME
        try:  # 0o666 less the umask: another member of a group sharing the directory may take it next
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
        except OSError as e:
            raise HarnessError(f"{path}: cannot open the run directory's lock file ({e.strerror or e}); move it, or pick a new --run-dir") from None
        if not stat.S_ISREG(os.fstat(self.fd).st_mode):  # a FIFO, say: O_NOFOLLOW kept symbolic links out
            self.release()
            raise HarnessError(f"{path}: the run directory's lock file is not a regular file; move it, or pick a new --run-dir")
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, HOLDER_MAX_BYTES, 0).decode("utf-8", "replace").strip()
            self.release()
            raise HarnessError(
                f"{run_dir}: another run is writing to it (its {LOCK_NAME} file names {one_line(printable(holder)) or 'no process'}); "
                "wait for it to end, or pick a new --run-dir"
            ) from None
        except OSError as e:  # ENOLCK, EOPNOTSUPP, ENOSYS: the filesystem keeps no locks
            self.release()
            log.warning(f"{path}: no file locks on this filesystem ({e.strerror or e}); a second run started into "
                        f"{run_dir} is not refused until its checkpoints collide with this one's")
            return
        with contextlib.suppress(OSError):  # who holds it, for a refused run's message; a full disk must not stop this one
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # releases the lock
            self.fd = None

    def __del__(self) -> None:  # a run that failed before closing its outputs, in a process that goes on (a notebook, a test)
        self.release()
