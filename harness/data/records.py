"""Read chosen images of a shard's blocks at their offsets in the file.

A rank of a W-rank run trains on about 1/W of every macro-batch, so it reads only those
images rather than whole blocks. The first time a shard is touched it is indexed: its
tar headers are walked (tarfile seeks over member data rather than reading it), and each
block's meta.json, .npy headers and labels are read and checked against the manifest's
layout, as strictly as a whole-block read would check them (see blocks.py). After that,
image `row` of a block is the 784 bytes at `images_at + row * 784`, and runs of
consecutive rows are read with one `preadv` each, straight into the output array.

Labels are kept from indexing (one byte an image), so reading a row costs only its
pixels. Pixel bytes are never interpreted, so a read cannot do anything but copy them.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from harness.data.blocks import (
    META_MAX_BYTES,
    NPY_HEADER_ROOM,
    decode_meta,
    decode_npy,
    grouped_members,
    npy_data_offset,
    npy_header_length,
    open_plain_tar,
)
from harness.errors import HarnessError

PAGE = 4096  # what a filesystem reads at least: a page-cache page


@dataclass(frozen=True)
class IndexedBlock:
    first: int  # split index of the block's first image
    count: int
    images_at: int  # file offset of the block's first image's first pixel
    labels: np.ndarray  # uint8 [count], checked below num_classes


class CountingFile:
    """A binary file that counts the bytes read through it (tarfile reads headers here)."""

    def __init__(self, raw, counter: list[int]):
        self.raw, self.counter, self.size = raw, counter, os.fstat(raw.fileno()).st_size

    def read(self, size: int = -1) -> bytes:
        # Never more than the file holds: a crafted tar header (a pax header claiming 2**44
        # bytes) would otherwise make the unbuffered read allocate that much first.
        left = max(0, self.size - self.raw.tell())
        try:
            data = self.raw.read(left if size is None or size < 0 else min(size, left))
        except OSError as e:
            raise HarnessError(f"{self.raw.name}: cannot be read ({e.strerror or e})") from None
        self.counter[0] += len(data)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.raw.seek(offset, whence)

    def tell(self) -> int:
        return self.raw.tell()


def index_shard(raw, split: str, layout: list[tuple[int, int]], image_shape: tuple[int, ...], num_classes: int,
                counter: list[int]) -> list[IndexedBlock]:
    """Every block of the shard open as `raw` (an unbuffered binary file), each checked
    against `layout` (the manifest's (first index, image count) of every block, in file
    order). Bytes read are added to counter[0]."""
    blocks, path = [], Path(raw.name)
    f = CountingFile(raw, counter)
    with open_plain_tar(path, fileobj=f) as tar:
        for key, members in grouped_members(tar, path, split):
            if len(blocks) == len(layout):
                raise HarnessError(f"{path}: holds more blocks than manifest.json's {len(layout)} for this shard ({key} is extra)")
            first, count = layout[len(blocks)]
            expected_key = f"{split}-{first:08d}"
            if key != expected_key:
                raise HarnessError(f"{path}: block {len(blocks)} is {key}; manifest.json's layout puts {expected_key} there")
            blocks.append(index_block(f, path, key, members, (split, first, count), image_shape, num_classes))
    if len(blocks) < len(layout):
        raise HarnessError(
            f"{path}: holds {len(blocks)} blocks; manifest.json's layout has {len(layout)} "
            f"({sum(c for _, c in layout)} images): the shard is short"
        )
    return blocks


def index_block(f: CountingFile, path: Path, key: str, members: dict, expected: tuple, image_shape, num_classes) -> IndexedBlock:
    """One block's image offset and labels, after checking all three of its members."""
    split, first, count = expected
    for kind in ("images.npy", "labels.npy", "meta.json"):
        if kind not in members:
            raise HarnessError(f"{path}: block {key} lacks member {kind!r}")
    where = lambda kind: f"{path}: member '{key}.{kind}'"  # noqa: E731
    meta = decode_meta(read_member(f, path, members["meta.json"], 0, META_MAX_BYTES), where("meta.json"))
    if (meta["split"], meta["first"], meta["count"]) != expected:
        raise HarnessError(
            f"{where('meta.json')}: says split {meta['split']!r}, first {meta['first']}, count {meta['count']}; "
            f"manifest.json's layout says split {split!r}, first {first}, count {count}"
        )
    labels = decode_npy(read_member(f, path, members["labels.npy"], 0, count + NPY_HEADER_ROOM), (count,), where("labels.npy"))
    top = int(labels.max())
    if top >= num_classes:
        raise HarnessError(f"{where('labels.npy')}: label {top} at index {int(labels.argmax())} is outside 0..{num_classes - 1}")
    images, image_bytes = members["images.npy"], count * math.prod(image_shape)
    prefix = read_member(f, path, images, 12, image_bytes + NPY_HEADER_ROOM)
    header = read_member(f, path, images, npy_header_length(prefix, where("images.npy")))
    offset = npy_data_offset(header, (count, *image_shape), where("images.npy"))
    if images.size - offset != image_bytes:
        raise HarnessError(f"{where('images.npy')}: holds {images.size - offset} data bytes; its header promises {image_bytes}")
    return IndexedBlock(first, count, images.offset_data + offset, labels.copy())


def read_member(f: CountingFile, path: Path, info, length: int, limit: int | None = None) -> bytes:
    """The first `length` bytes of a member (all of it when `length` is 0, refused from its
    header alone when larger than `limit`)."""
    if limit is not None and info.size > limit:
        raise HarnessError(f"{path}: member {info.name!r} is {info.size} bytes; a block of this layout needs at most {limit}")
    want = min(length, info.size) if length else info.size
    f.seek(info.offset_data)
    data = f.read(want)
    if len(data) != want:
        raise HarnessError(f"{path}: member {info.name!r} is cut short: the file ends {want - len(data)} bytes early")
    return data


def read_rows(raw, block: IndexedBlock, rows: np.ndarray, row_bytes: int, pages: set | None = None) -> np.ndarray:
    """Images `rows` (ascending, distinct) of `block`, from the shard open as `raw`, as
    uint8 [len(rows), row_bytes]: one preadv per run of consecutive rows, into the result.
    `pages`, when given, collects the (file, 4 KiB page) pairs read (for a benchmark)."""
    fd, path = raw.fileno(), raw.name
    out = np.empty((len(rows), row_bytes), dtype=np.uint8)
    if len(rows) and (rows[0] < 0 or rows[-1] >= block.count):
        raise IndexError(f"rows {rows[0]}..{rows[-1]} outside a block of {block.count}")
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    for lo, hi in zip(np.concatenate([[0], breaks]).tolist(), np.concatenate([breaks, [len(rows)]]).tolist()):
        want = (hi - lo) * row_bytes
        at = block.images_at + int(rows[lo]) * row_bytes
        got = read_fully(fd, out[lo:hi].reshape(-1), at, path)
        if pages is not None:
            pages.update((path, page) for page in range(at // PAGE, (at + want - 1) // PAGE + 1))
        if got != want:
            raise HarnessError(f"{path}: block {block.first}'s images are cut short: the file ends {want - got} bytes early")
    return out


def read_fully(fd: int, buffer: np.ndarray, at: int, path) -> int:
    """Read into `buffer` from offset `at` until it is full or the file ends (a network
    filesystem may return a read short); the bytes read."""
    got = 0
    while got < len(buffer):
        try:
            n = os.preadv(fd, [buffer[got:]], at + got)
        except OSError as e:
            raise HarnessError(f"{path}: cannot be read ({e.strerror or e})") from None
        if n == 0:
            break
        got += n
    return got
