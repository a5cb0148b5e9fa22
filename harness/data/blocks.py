"""The block format of a shard, and the checks that hold a shard to it.

A shard is a plain (uncompressed) tar of regular files; each block is three members in
a row, `{split}-{first:08d}.images.npy` (uint8 [count, 28, 28]), `.labels.npy` (uint8
[count], every label below the class count) and `.meta.json` ({"split", "first",
"count"}). Anything else is an error that names the shard and the member: a member of
another name (`*.pickle`, `*.pth`, ...), a link or directory, an .npy of another dtype
or shape or one that needs pickle, a block out of the manifest's order.

Shards are read with `tarfile` (records.py), never handed to webdataset as a URL:
its URL layer expands braces, substitutes `${VAR}`, splits on `::` and runs a shell for
`pipe:`, and its default decoders unpickle `.pickle`/`.pth` members. Checks per block
are on headers, dtypes, shapes and byte counts, plus one `max` over the labels; pixel
data is never looked at, so reading stays at the speed of the copy.
"""

from __future__ import annotations

import io
import math
import re
import tarfile
from pathlib import Path

import numpy as np

from harness.errors import HarnessError
from harness.validation import first_violation, one_line, strict_json_loads

KINDS = ("images.npy", "labels.npy", "meta.json")
MEMBER_NAME = re.compile(r"(?P<key>(?P<split>[a-z]+)-(?P<first>[0-9]{8}))\.(?P<kind>images\.npy|labels\.npy|meta\.json)")
NPY_HEADER_ROOM = 16384  # an .npy header of the packer's arrays is 128 bytes; numpy reads at most 10,000
META_MAX_BYTES = 4096
TAR_MEMBER_OVERHEAD = 1024  # a 512-byte header and up to 511 bytes of padding
TAR_END = 20480  # the end-of-archive blocks and the padding to tarfile's 10,240-byte record, with room
# Only the header versions numpy's public API reads; version 3 differs only in allowing utf-8 names.
NPY_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
META_SCHEMA = {
    "type": "object",
    "properties": {"split": {"type": "string"}, "first": {"type": "integer"}, "count": {"type": "integer"}},
    "required": ["split", "first", "count"],
    "additionalProperties": False,
}


def max_shard_bytes(samples: int, block_size: int, pixels_per_image: int) -> int:
    """The largest shard of `samples` images in blocks of `block_size` that this reader
    would read: every member at its limit (the packer's shards are well below it)."""
    blocks = -(-samples // block_size)
    per_block = 2 * NPY_HEADER_ROOM + META_MAX_BYTES + 3 * TAR_MEMBER_OVERHEAD
    return samples * (pixels_per_image + 1) + blocks * per_block + TAR_END


def open_plain_tar(path: Path, fileobj=None) -> tarfile.TarFile:
    """The shard as an uncompressed tar ("r:": no gzip, bzip2 or xz, which could expand
    without bound), read from `fileobj` when given."""
    try:
        return tarfile.open(path, "r:", fileobj=fileobj)
    except (tarfile.TarError, OSError, ValueError, EOFError) as e:
        raise HarnessError(f"{path}: not a plain (uncompressed) tar file ({e})") from None


def grouped_members(tar: tarfile.TarFile, path: Path, split: str):
    """(key, {kind: TarInfo}) for each run of consecutive members with the same key."""
    key, members = None, {}
    for info in regular_members(tar, path):
        match = MEMBER_NAME.fullmatch(info.name)
        if not match or match["split"] != split:
            raise HarnessError(
                f"{path}: member {info.name!r} is not part of the block format "
                f"({split}-NNNNNNNN.images.npy, .labels.npy or .meta.json)"
            )
        if match["key"] != key:
            if key is not None:
                yield key, members
            key, members = match["key"], {}
        if match["kind"] in members:
            raise HarnessError(f"{path}: member {info.name!r} appears twice in block {key}")
        members[match["kind"]] = info
    if key is not None:
        yield key, members


def regular_members(tar: tarfile.TarFile, path: Path):
    """The tar's members, each a regular file; the tar's own format errors as HarnessErrors."""
    try:
        for info in tar:
            if info.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
                raise HarnessError(f"{path}: member {info.name!r} is not a regular file (tar type {info.type!r})")
            yield info
    except (tarfile.TarError, OSError, ValueError, EOFError, UnicodeError) as e:
        raise HarnessError(f"{path}: not a valid tar file ({e})") from None


def decode_meta(payload: bytes, where: str) -> dict:
    try:
        meta = strict_json_loads(payload)
    except ValueError as e:
        raise HarnessError(f"{where}: not valid JSON ({e})") from None
    problem = first_violation(META_SCHEMA, meta)
    if problem:
        raise HarnessError(f"{where}: {problem}")
    return meta


def decode_npy(payload: bytes, shape: tuple[int, ...], where: str) -> np.ndarray:
    """A uint8 array of exactly `shape` from .npy bytes. The header is parsed and checked
    before any data is touched, and the data is used in place: nothing is unpickled and
    nothing is allocated from the header's numbers."""
    offset = npy_data_offset(payload, shape, where)
    data = len(payload) - offset
    if data != math.prod(shape):
        raise HarnessError(f"{where}: holds {data} data bytes; its header promises {math.prod(shape)}")
    return np.frombuffer(payload, dtype=np.uint8, offset=offset).reshape(shape)


def npy_header_length(prefix: bytes, where: str) -> int:
    """The length of an .npy header (magic, version, length field and header text) from
    the member's first 12 bytes, checked against NPY_HEADER_ROOM."""
    version = tuple(prefix[6:8])
    if len(prefix) < 10 or prefix[:6] != b"\x93NUMPY" or version not in NPY_HEADER_READERS:
        raise HarnessError(f"{where}: not a valid .npy array (no .npy magic and version 1.0 or 2.0)")
    length = 10 + int.from_bytes(prefix[8:10], "little") if version == (1, 0) else 12 + int.from_bytes(prefix[8:12], "little")
    if length > NPY_HEADER_ROOM:
        raise HarnessError(f"{where}: .npy header of {length} bytes; the packer's are 128")
    return length


def npy_data_offset(header: bytes, shape: tuple[int, ...], where: str) -> int:
    """Where the data starts in an .npy that begins with `header`, after checking that the
    header describes a C-order uint8 array of exactly `shape`. The header is parsed with
    numpy's own parser, which evaluates literals only."""
    stream = io.BytesIO(header)
    try:
        version = np.lib.format.read_magic(stream)
        if version not in NPY_HEADER_READERS:
            raise ValueError(f"format version {version[0]}.{version[1]}")
        got_shape, fortran_order, dtype = NPY_HEADER_READERS[version](stream)
    except Exception as e:  # noqa: BLE001 (numpy's header parser on untrusted bytes: it also raises tokenize.TokenError)
        raise HarnessError(f"{where}: not a valid .npy array ({one_line(e)})") from None
    if dtype != np.uint8 or tuple(got_shape) != shape:
        raise HarnessError(f"{where}: holds dtype {dtype} shape {tuple(got_shape)}; expected dtype uint8 shape {shape}")
    if fortran_order and len(shape) > 1:
        raise HarnessError(f"{where}: is in Fortran order; the packer writes C order")
    return stream.tell()
