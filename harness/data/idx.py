"""Reader for the IDX format of the original MNIST distribution (gzip or raw).

Layout: two zero bytes, a type code (0x08 = unsigned byte), the number of
dimensions, then one big-endian uint32 per dimension, then the data.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from harness.errors import HarnessError

UBYTE = 0x08


def _read_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise HarnessError(f"{path}: gzip data is corrupt or truncated ({e})") from None


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read an unsigned-byte IDX file with `ndim` dimensions, validating the header and size."""
    path = Path(path)
    if not path.is_file():
        raise HarnessError(f"{path}: file not found")
    data = _read_bytes(path)
    if len(data) < 4:
        raise HarnessError(f"{path}: too short for an IDX header ({len(data)} bytes)")
    zero, type_code, file_ndim = data[:2], data[2], data[3]
    magic = int.from_bytes(data[:4], "big")
    expected_magic = (UBYTE << 8) | ndim
    if zero != b"\x00\x00" or type_code != UBYTE or file_ndim != ndim:
        raise HarnessError(
            f"{path}: bad IDX magic number {magic} (0x{magic:08x}); "
            f"expected {expected_magic} (unsigned bytes, {ndim} dimension{'s' if ndim > 1 else ''})"
        )
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise HarnessError(f"{path}: truncated IDX header ({len(data)} of {header_len} bytes)")
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header_len + int(np.prod(dims, dtype=np.int64))
    if len(data) != expected:
        problem = "truncated" if len(data) < expected else "has trailing bytes"
        raise HarnessError(
            f"{path}: {problem}: header says dimensions {'x'.join(map(str, dims))} "
            f"({expected} bytes in all) but the data is {len(data)} bytes"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header_len).reshape(dims)
