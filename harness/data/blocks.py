"""Read one shard's blocks, decoding only what the block format holds.

A shard is a plain (uncompressed) tar of regular files; each block is three members in
a row, `{split}-{first:08d}.images.npy` (uint8 [count, 28, 28]), `.labels.npy` (uint8
[count], every label below the class count) and `.meta.json` ({"split", "first",
"count"}). Anything else is an error that names the shard and the member: a member of
another name (`*.pickle`, `*.pth`, ...), a link or directory, an .npy of another dtype
or shape or one that needs pickle, a block out of the manifest's order.

The file is opened here and read with `tarfile`, never handed to webdataset as a URL:
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


def read_blocks(path: Path, split: str, layout: list[tuple[int, int]], image_shape: tuple[int, ...], num_classes: int):
    """All blocks of one shard as (first index, images, labels), in file order, each one
    checked against `layout`, the manifest's (first index, image count) of every block."""
    blocks = []
    with open_plain_tar(path) as tar:
        for key, members in grouped_members(tar, path, split):
            if len(blocks) == len(layout):
                raise HarnessError(f"{path}: holds more blocks than manifest.json's {len(layout)} for this shard ({key} is extra)")
            first, count = layout[len(blocks)]
            expected_key = f"{split}-{first:08d}"
            if key != expected_key:
                raise HarnessError(f"{path}: block {len(blocks)} is {key}; manifest.json's layout puts {expected_key} there")
            blocks.append(decode_block(tar, path, key, members, (split, first, count), image_shape, num_classes))
    if len(blocks) < len(layout):
        raise HarnessError(
            f"{path}: holds {len(blocks)} blocks; manifest.json's layout has {len(layout)} "
            f"({sum(c for _, c in layout)} images): the shard is short"
        )
    return blocks


def max_shard_bytes(samples: int, block_size: int, pixels_per_image: int) -> int:
    """The largest shard of `samples` images in blocks of `block_size` that this reader
    would read: every member at its limit (the packer's shards are well below it)."""
    blocks = -(-samples // block_size)
    per_block = 2 * NPY_HEADER_ROOM + META_MAX_BYTES + 3 * TAR_MEMBER_OVERHEAD
    return samples * (pixels_per_image + 1) + blocks * per_block + TAR_END


def open_plain_tar(path: Path) -> tarfile.TarFile:
    """The shard as an uncompressed tar ("r:": no gzip, bzip2 or xz, which could expand
    without bound)."""
    try:
        return tarfile.open(path, "r:")
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


def member_bytes(tar: tarfile.TarFile, path: Path, info: tarfile.TarInfo, limit: int) -> bytes:
    """A member's content, refused from its header alone when it is larger than `limit`."""
    if info.size > limit:
        raise HarnessError(f"{path}: member {info.name!r} is {info.size} bytes; a block of this layout needs at most {limit}")
    try:
        return tar.extractfile(info).read()
    except (tarfile.TarError, OSError, ValueError, EOFError) as e:
        raise HarnessError(f"{path}: member {info.name!r} cannot be read ({e})") from None


def decode_block(tar, path, key, members, expected, image_shape, num_classes):
    """(first, images, labels) of one block whose members are all there and as expected."""
    split, first, count = expected
    for kind in KINDS:
        if kind not in members:
            raise HarnessError(f"{path}: block {key} lacks member {kind!r}")
    where = lambda kind: f"{path}: member '{key}.{kind}'"  # noqa: E731
    meta = decode_meta(member_bytes(tar, path, members["meta.json"], META_MAX_BYTES), where("meta.json"))
    if (meta["split"], meta["first"], meta["count"]) != expected:
        raise HarnessError(
            f"{where('meta.json')}: says split {meta['split']!r}, first {meta['first']}, count {meta['count']}; "
            f"manifest.json's layout says split {split!r}, first {first}, count {count}"
        )
    image_bytes = count * math.prod(image_shape)
    images = decode_npy(member_bytes(tar, path, members["images.npy"], image_bytes + NPY_HEADER_ROOM), (count, *image_shape), where("images.npy"))
    labels = decode_npy(member_bytes(tar, path, members["labels.npy"], count + NPY_HEADER_ROOM), (count,), where("labels.npy"))
    top = int(labels.max())
    if top >= num_classes:
        raise HarnessError(f"{where('labels.npy')}: label {top} at index {int(labels.argmax())} is outside 0..{num_classes - 1}")
    return first, images, labels


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
    """A uint8 array of exactly `shape` from .npy bytes. The header is parsed (numpy's own
    parser, which evaluates literals only) and checked before any data is touched, and
    the data is used in place: nothing is unpickled and nothing is allocated from the
    header's numbers."""
    stream = io.BytesIO(payload)
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
    data = len(payload) - stream.tell()
    if data != math.prod(shape):
        raise HarnessError(f"{where}: holds {data} data bytes; its header promises {math.prod(shape)}")
    return np.frombuffer(payload, dtype=np.uint8, offset=stream.tell()).reshape(shape)

