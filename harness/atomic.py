"""Atomic file writes: a temporary file beside the target, fsync, then rename.

A reader (or a resumed run) sees either the old file or the complete new one,
never a half-written file, even if the process dies or the disk fills mid-write.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import torch


def write_bytes_atomic(path: Path, payload: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def write_json_atomic(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def cpu_tensors(obj):
    """`obj` with every tensor in it (in dicts, lists, tuples) copied to the CPU, so that a
    file written on a GPU loads on any machine and onto any device."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: cpu_tensors(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_tensors(v) for v in obj)
    return obj


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
