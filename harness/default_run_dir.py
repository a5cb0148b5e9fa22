"""Where a run goes without --run-dir: runs/NAME-YYYYMMDD-HHMMSS, or runs/NAME-slurm-JOBID in
a Slurm job; and the same directory again after torchrun restarts the group."""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import re
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING

from harness.atomic import write_json_atomic
from harness.run_lock import LOCK_NAME

if TYPE_CHECKING:
    from harness.distributed import DistContext

log = logging.getLogger("harness")


def default_run_dir(name: str, ctx: DistContext) -> Path:
    """runs/NAME-slurm-JOBID in a Slurm job (a requeued job keeps its id, so it resumes
    there), else runs/NAME-YYYYMMDD-HHMMSS, rank 0's clock on every rank, created by rank 0
    here; with -2, -3, ... added where another run took that name (two runs started in
    the same second, a sweep say, used to share one directory and fail at its end).
    After torchrun restarts the group (--max-restarts), the directory its first attempt
    chose (see restart_record)."""
    job_id = os.environ.get("SLURM_JOB_ID")
    if job_id:
        return Path("runs") / f"{name}-slurm-{job_id}"
    # The ranks start at different moments: they take rank 0's choice, as two ints.
    stamp, n = ctx.gather(list(earlier_attempts_run_dir(name) or claim_run_dir(name)) if ctx.is_main else [0, 0])[0]
    return run_dir_named(name, str(stamp), n)


def run_dir_named(name: str, stamp: str, n: int) -> Path:
    return Path("runs") / f"{name}-{stamp[:8]}-{stamp[8:]}{f'-{n}' if n > 1 else ''}"


def claim_run_dir(name: str) -> tuple[int, int]:
    """(stamp, n) of the first of run_dir_named(name, now, 1, 2, ...) that this process
    creates (recorded for torchrun's restarts); or of the first, uncreated, if creating it
    fails for another reason than its existence, which RunOutputs then reports."""
    stamp = time.strftime("%Y%m%d%H%M%S")
    for n in itertools.count(1):
        candidate = run_dir_named(name, stamp, n)
        try:
            candidate.mkdir(parents=True)
        except OSError:
            # FileExistsError from `runs` itself (a dangling symlink, say) would come for
            # every n: only a taken name is a reason to try the next one.
            if os.path.lexists(candidate):
                continue
            return int(stamp), 1
        record = restart_record()
        if record is not None:
            try:
                write_json_atomic(record, {"name": name, "stamp": int(stamp), "n": n, "agent": torchrun_agent()})
            except OSError as e:
                log.warning(f"{record}: not written ({e.strerror or e}); a restarted attempt would start over in a new directory")
        return int(stamp), n


def restart_record() -> Path | None:
    """Where torchrun's first attempt records the run directory it chose, for the attempts
    after a restart, which would otherwise take the clock of their own start and begin
    again from step 0 in a new directory: runs/.torchrun-RUN_ID.json. None where no restart
    can come (no torchrun, or --max-restarts 0). The run id (a fresh UUID on one node,
    --rdzv-id across nodes: launch/multinode.sh's RDZV_ID, "harness" unless set) need not
    be unique, so the record also names rank 0's torchrun agent (torchrun_agent)."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "")
    if not run_id or os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") in ("", "0"):
        return None
    return Path("runs") / f".torchrun-{re.sub(r'[^A-Za-z0-9_.-]', '_', run_id)[:100]}.json"


def torchrun_agent() -> str:
    """This rank's torchrun agent (its parent process) as host, pid and start time: the same
    in every attempt of one torchrun, and in no other process. A restart that puts rank 0 on
    another node has another agent, and starts over in a new directory."""
    agent = os.getppid()
    try:  # /proc/PID/stat's 22nd field, starttime: the 20th after the command's ")"
        started = Path(f"/proc/{agent}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        started = "?"
    return f"{socket.gethostname()}:{agent}:{started}"


def recorded_choice(record: Path) -> tuple[str, int, int, str] | None:
    """(name, stamp, n, agent) from a restart record; None if it is missing (the first
    attempt died before writing it, say) or not one."""
    try:
        chosen = json.loads(record.read_text())
        return str(chosen["name"]), int(chosen["stamp"]), int(chosen["n"]), str(chosen["agent"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def earlier_attempts_run_dir(name: str) -> tuple[int, int] | None:
    """(stamp, n) of the run directory an earlier attempt of this torchrun chose, if this
    is a restarted attempt, the record is its agent's, and that directory is there."""
    record = restart_record()
    if record is None or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") in ("", "0"):
        return None
    chosen = recorded_choice(record)
    if chosen is None:
        return None
    recorded_name, stamp, n, agent = chosen
    if (recorded_name, agent) != (name, torchrun_agent()) or not run_dir_named(name, str(stamp), n).is_dir():
        return None  # another job's, with the same run id
    return stamp, n


def forget_restart_record(run_dir: Path) -> None:
    """A finished run's record has nothing left to restart."""
    record = restart_record()
    chosen = recorded_choice(record) if record is not None else None
    if chosen is not None:
        name, stamp, n, _ = chosen
        if run_dir_named(name, str(stamp), n) == Path(run_dir):
            with contextlib.suppress(OSError):
                record.unlink()


def remove_if_unused(run_dir: Path) -> None:
    """Remove a default run directory (one claim_run_dir created, so no other run's) that
    holds nothing but its lock file: the run was refused at start-up."""
    with contextlib.suppress(OSError):  # not empty: the run wrote something, which stays
        if [p.name for p in run_dir.iterdir()] == [LOCK_NAME]:
            (run_dir / LOCK_NAME).unlink()
        run_dir.rmdir()
