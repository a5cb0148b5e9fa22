"""Reader for the IDX format of the original MNIST distribution (gzip or raw).

Layout: two zero bytes, a type code (0x08 = unsigned byte), the number of
dimensions, then one big-endian uint32 per dimension, then the data.

The file is read as a stream, gzip or not: the header first, then exactly the bytes
its dimensions promise (at most MAX_IDX_BYTES), then one byte to see whether more
follows. A small gzip file that would expand to gigabytes is refused after the bytes
its header promised, not after the expansion.
"""

from __future__ import annotations

import gzip
import math
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from harness.errors import HarnessError

UBYTE = 0x08
# The largest data this reader holds in memory: 1.3 M images of 28x28 (MNIST's training
# images are 47 MB; EMNIST byclass's 547 MB).
MAX_IDX_BYTES = 1 << 30


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read an unsigned-byte IDX file with `ndim` dimensions, validating the header and size."""
    path = Path(path)
    if not path.is_file():
        raise HarnessError(f"{path}: file not found")
    compressed = _is_gzip(path)
    try:
        with gzip.open(path, "rb") if compressed else open(path, "rb") as stream:
            dims = _read_header(stream, path, ndim)
            data = _read_data(stream, path, dims)
    except (OSError, EOFError, zlib.error) as e:
        problem = "gzip data is corrupt or truncated" if compressed else "unreadable"
        raise HarnessError(f"{path}: {problem} ({e})") from None
    return np.frombuffer(data, dtype=np.uint8).reshape(dims)


def iter_idx(path: Path, ndim: int, rows: int) -> Iterator[np.ndarray]:
    """The file's records `rows` at a time, as they are read: memory holds one chunk,
    whatever the file's size (no MAX_IDX_BYTES here). The same checks as read_idx: the
    header, exactly the bytes it promises, and nothing after them."""
    path = Path(path)
    compressed = _is_gzip(path)
    try:
        with gzip.open(path, "rb") if compressed else open(path, "rb") as stream:
            dims = _read_header(stream, path, ndim)
            record, header_len = math.prod(dims[1:]), 4 + 4 * ndim
            for first in range(0, dims[0], rows):
                count = min(rows, dims[0] - first)
                data = stream.read(count * record)
                if len(data) < count * record:
                    raise HarnessError(
                        f"{path}: truncated: header says dimensions {'x'.join(map(str, dims))} "
                        f"({header_len + dims[0] * record} bytes in all) but the data is {header_len + first * record + len(data)} bytes"
                    )
                yield np.frombuffer(data, dtype=np.uint8).reshape(count, *dims[1:])
            if stream.read(1):
                raise HarnessError(
                    f"{path}: has trailing bytes: header says dimensions {'x'.join(map(str, dims))} "
                    f"({header_len + dims[0] * record} bytes in all) but the data is longer"
                )
    except (OSError, EOFError, zlib.error) as e:
        problem = "gzip data is corrupt or truncated" if compressed else "unreadable"
        raise HarnessError(f"{path}: {problem} ({e})") from None


def idx_dims(path: Path, ndim: int) -> tuple[int, ...]:
    """The dimensions an IDX file's header promises (the data is not read)."""
    path = Path(path)
    if not path.is_file():
        raise HarnessError(f"{path}: file not found")
    compressed = _is_gzip(path)
    try:
        with gzip.open(path, "rb") if compressed else open(path, "rb") as stream:
            return _read_header(stream, path, ndim)
    except (OSError, EOFError, zlib.error) as e:
        # gzip decompresses a whole buffer to give the header: damage far past it fails here.
        problem = "gzip data is corrupt or truncated" if compressed else "unreadable header"
        raise HarnessError(f"{path}: {problem} ({e})") from None


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def _read_header(stream, path: Path, ndim: int) -> tuple[int, ...]:
    head = stream.read(4)
    if len(head) < 4:
        raise HarnessError(f"{path}: too short for an IDX header ({len(head)} bytes)")
    magic = int.from_bytes(head, "big")
    expected_magic = (UBYTE << 8) | ndim
    if head[:2] != b"\x00\x00" or head[2] != UBYTE or head[3] != ndim:
        raise HarnessError(
            f"{path}: bad IDX magic number {magic} (0x{magic:08x}); "
            f"expected {expected_magic} (unsigned bytes, {ndim} dimension{'s' if ndim > 1 else ''})"
        )
    sizes = stream.read(4 * ndim)
    if len(sizes) < 4 * ndim:
        raise HarnessError(f"{path}: truncated IDX header ({4 + len(sizes)} of {4 + 4 * ndim} bytes)")
    return tuple(int.from_bytes(sizes[4 * i : 4 * i + 4], "big") for i in range(ndim))


def _read_data(stream, path: Path, dims: tuple[int, ...]) -> bytes:
    """Exactly the bytes `dims` promise (Python ints: four uint32s can exceed int64)."""
    size, header_len = math.prod(dims), 4 + 4 * len(dims)
    shape = "x".join(map(str, dims))
    if size > MAX_IDX_BYTES:
        raise HarnessError(f"{path}: header says dimensions {shape} ({size} bytes of data), more than the {MAX_IDX_BYTES} this reader accepts")
    data = stream.read(size)
    if len(data) < size:
        raise HarnessError(
            f"{path}: truncated: header says dimensions {shape} ({header_len + size} bytes in all) "
            f"but the data is {header_len + len(data)} bytes"
        )
    if stream.read(1):
        raise HarnessError(f"{path}: has trailing bytes: header says dimensions {shape} ({header_len + size} bytes in all) but the data is longer")
    return data
