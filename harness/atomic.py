"""Atomic file writes: a temporary file beside the target, fsync, then rename.

A reader (or a resumed run) sees either the old file or the complete new one,
never a half-written file, even if the process dies or the disk fills mid-write.
"""

from __future__ import annotations

import io
import json
import os
import re
import stat
from pathlib import Path

import torch


TEMPORARY_NAME = re.compile(r"\..+\.tmp-[0-9]+")  # temporary_path's names


def temporary_path(path: Path) -> Path:
    """Where `path` is written before it is renamed into place: .NAME.tmp-PID, beside it."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_bytes_atomic(path: Path, payload: bytes) -> None:
    path = Path(path)
    tmp = temporary_path(path)
    try:
        with os.fdopen(create_new(tmp), "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def create_new(path: Path) -> int:
    """A file descriptor, open for writing, of a new, empty file at `path`, whatever was there:
    an earlier process's leftover of that name is removed first, and a symbolic link there
    (a run directory from someone else may hold one) is removed, not written through."""
    path.unlink(missing_ok=True)
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)


def remove_interrupted_writes(directory: Path) -> list[Path]:
    """Remove the temporary files that writes killed mid-way (SIGKILL, a node lost) left in
    `directory`: nothing reads them, and a checkpoint's is as large as the checkpoint.
    Called as a run starts in its directory, where no other run writes. Returns them."""
    removed = []
    for path in Path(directory).glob(".*.tmp-*"):
        try:
            if TEMPORARY_NAME.fullmatch(path.name) and stat.S_ISREG(path.lstat().st_mode):
                path.unlink()
                removed.append(path)
        except FileNotFoundError:
            pass
    return removed


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def write_json_atomic(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def map_tensors(obj, fn):
    """`obj` with `fn(tensor)` in place of every tensor in it (in dicts, lists, tuples)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_tensors(v, fn) for v in obj)
    return obj


def cpu_tensors(obj):
    """`obj` with every tensor in it on the CPU (a CPU tensor is not copied), so that a file
    written on a GPU loads on any machine and onto any device."""
    return map_tensors(obj, lambda t: t.detach().cpu())


def tensor_snapshot(obj):
    """`obj` with every tensor in it copied where it is: on a GPU, copies queued on the
    device (the host does not wait for them), which later changes to the originals do not
    reach."""
    return map_tensors(obj, lambda t: t.detach().clone())


def torch_bytes(obj) -> bytes:
    """torch.save of `obj` with CPU tensors, as bytes."""
    buffer = io.BytesIO()
    torch.save(cpu_tensors(obj), buffer)
    return buffer.getvalue()


def torch_save_atomic(obj, path: Path) -> None:
    write_bytes_atomic(path, torch_bytes(obj))


def fsync_dir(directory: Path) -> None:
    """Make renames inside `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
