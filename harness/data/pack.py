"""Pack a dataset into webdataset tar shards of image blocks, with a manifest.

One webdataset sample is a block of consecutive images: `{key}.images.npy`
(uint8 [n, 28, 28]), `{key}.labels.npy` (uint8 [n]) and `{key}.meta.json`
(split and index of the block's first image). Reading one tar member per image
tops out near 5k images/s; blocks of 1,000 read two orders of magnitude faster.

Packing is deterministic (fixed tar metadata, no timestamps: the same input
gives byte-identical shards) and atomic: everything is written to a temporary
directory first, and `manifest.json`, the file that makes a shard set look
complete, is the last thing to appear in the output directory. The temporary
directory sits on the output's filesystem, so that publishing is renames only:
beside a new output directory (which it then becomes), or inside an existing one
(a mount point, or a directory whose parent is not writable, works too).
"""

from __future__ import annotations

import io
import itertools
import json
import math
import os
import re
import shutil
import tarfile
from fractions import Fraction
from pathlib import Path

import numpy as np

from harness import __version__
from harness.atomic import fsync_dir, write_json_atomic
from harness.data.manifest import FORMAT_VERSION, MANIFEST_NAME, MAX_BLOCK_SIZE, MAX_BLOCKS_PER_SHARD, manifest_problem
from harness.data.sources import IMAGE_SHAPE, Dataset, sha256_of
from harness.errors import HarnessError, SystemRefused
from harness.leftovers import remove_dead_leftovers

DEFAULT_BLOCK_SIZE = 1000
DEFAULT_SHARD_SIZE = 10000  # images per shard: six train shards and one test shard for MNIST


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def _add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mode = 0o644
    info.mtime = 0  # fixed metadata keeps shards byte-identical across packs
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(payload))


def _write_shard(path: Path, split: str, blocks, first: int, stats: PixelSums | None) -> int:
    """Write `blocks` ((images, labels) pairs, in order) as one shard; the images written."""
    index = first
    with open(path, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for images, labels in blocks:
            key = f"{split}-{index:08d}"
            _add_member(tar, f"{key}.images.npy", _npy_bytes(images))
            _add_member(tar, f"{key}.labels.npy", _npy_bytes(labels))
            meta = {"split": split, "first": index, "count": len(labels)}
            _add_member(tar, f"{key}.meta.json", json.dumps(meta, sort_keys=True).encode())
            if stats:
                stats.add(images)
            index += len(labels)
        f.flush()
        os.fsync(f.fileno())
    return index - first


class PixelSums:
    """Train-set pixel statistics gathered block by block, in exact integer arithmetic
    (uint8 pixels: the sums are integers), so the result does not depend on how the
    images were split into blocks, and each figure is the correctly rounded value."""

    def __init__(self, pixels: int = 28 * 28):
        self.images, self.total, self.squares = 0, 0, 0
        self.per_pixel = np.zeros(pixels, dtype=np.int64)

    def add(self, images: np.ndarray) -> None:
        flat = images.reshape(len(images), -1)
        self.images += len(flat)
        self.total += int(flat.sum(dtype=np.uint64))
        self.squares += int(np.square(flat, dtype=np.uint32).sum(dtype=np.uint64))
        self.per_pixel += flat.sum(axis=0, dtype=np.int64)

    def statistics(self) -> dict:
        """Of pixels scaled to [0, 1], for normalisation on the device."""
        n = self.images * len(self.per_pixel)
        mean = Fraction(self.total, n * 255)
        variance = Fraction(self.squares, n * 255 * 255) - mean * mean
        return {
            "mean": round(float(mean), 8),
            "std": round(math.sqrt(variance), 8),
            "pixel_mean": [round(float(Fraction(int(s), self.images * 255)), 8) for s in self.per_pixel],
        }


def pixel_statistics(train_images: np.ndarray) -> dict:
    """The manifest's train_stats of in-memory images (as `pack` computes them)."""
    sums = PixelSums(int(np.prod(train_images.shape[1:])))
    sums.add(train_images)
    return sums.statistics()


def check_output_dir(out_dir: Path) -> None:
    """Refuse a directory that already holds shards: packing never overwrites good data."""
    if out_dir.exists() and not out_dir.is_dir():
        raise HarnessError(f"{out_dir}: exists and is not a directory")
    if not out_dir.is_dir():
        return
    if (out_dir / MANIFEST_NAME).exists():
        raise HarnessError(f"{out_dir}: already holds shards ({MANIFEST_NAME} exists); remove it or pick another --out")
    leftovers = sorted(p.name for p in out_dir.glob("*.tar"))
    if leftovers:
        raise HarnessError(
            f"{out_dir}: holds tar files but no {MANIFEST_NAME} ({leftovers[0]}...): an interrupted pack? "
            "remove them or pick another --out"
        )


def pack(
    dataset: Dataset,
    out_dir: Path,
    shard_size: int = DEFAULT_SHARD_SIZE,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> dict:
    """Write `dataset` as shards plus manifest into `out_dir`; return the manifest."""
    out_dir = Path(out_dir)
    if block_size < 1 or shard_size < 1:
        raise HarnessError(f"--block-size and --shard-size must be positive (got {block_size}, {shard_size})")
    if block_size > MAX_BLOCK_SIZE:
        raise HarnessError(f"--block-size {block_size} is larger than {MAX_BLOCK_SIZE}, the most a reader decodes at once")
    if shard_size % block_size:
        raise HarnessError(f"--shard-size {shard_size} must be a multiple of --block-size {block_size}")
    if shard_size // block_size > MAX_BLOCKS_PER_SHARD:
        raise HarnessError(f"--shard-size {shard_size} / --block-size {block_size}: at most {MAX_BLOCKS_PER_SHARD:,} blocks a shard")
    check_output_dir(out_dir)
    check_train_images_vary(dataset)
    tmp = _make_temp_dir(out_dir)
    try:
        splits, train_sums = {}, PixelSums()
        for split, data in dataset.splits.items():
            # Blocks stream from the source into the shards: one block in memory at a time.
            blocks, shards = data.chunks(block_size), []
            for shard_no, first in enumerate(range(0, len(data), shard_size)):
                name = f"{split}-{shard_no:06d}.tar"
                in_shard = itertools.islice(blocks, -(-min(shard_size, len(data) - first) // block_size))
                samples = _write_shard(tmp / name, split, in_shard, first, train_sums if split == "train" else None)
                shards.append({"name": name, "samples": samples, "bytes": (tmp / name).stat().st_size, "sha256": sha256_of(tmp / name)})
            if next(blocks, None) is not None:  # also runs the source's end-of-file checks (trailing bytes)
                raise HarnessError(f"{dataset.name}: the {split} split holds more than the {len(data)} images it declared")
            splits[split] = {"samples": len(data), "block_size": block_size, "shards": shards}
        manifest = {
            "format_version": FORMAT_VERSION,
            "dataset": dataset.name,
            "packed_by": f"harness {__version__}",
            "image_shape": list(IMAGE_SHAPE),
            "num_classes": 10,
            "source": {"kind": dataset.kind, "files": dataset.files},
            "splits": splits,
            "train_stats": train_sums.statistics(),
        }
        problem = manifest_problem(manifest)
        if problem:  # e.g. a std too small to divide by, which the readers refuse
            raise HarnessError(f"{dataset.name}: the packed set would fail its readers' checks ({problem}); nothing was published")
        write_json_atomic(tmp / MANIFEST_NAME, manifest)
        _publish(tmp, out_dir)
    except OSError as e:  # disk full, I/O error, a directory that refuses the rename: nothing was published
        raise SystemRefused(f"{out_dir}: could not write the shards ({_reason(e)}); nothing was published") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def check_train_images_vary(dataset: Dataset) -> None:
    """Refuse a source whose training pixels are all one value, before anything is written:
    its std of 0 is one the readers refuse (normalising would divide by it), and there is
    nothing to learn from it. Reads only until a pixel differs: one block of ordinary data."""
    split = dataset.splits["train"]
    chunks, first = split.chunks(DEFAULT_BLOCK_SIZE), None
    try:
        for images, _ in chunks:
            if first is None:
                first = images.flat[0]
            if (images != first).any():
                return
    finally:
        chunks.close()  # a generator: closing it closes the source files it has open
    source = getattr(split, "images_file", dataset.name)  # the IDX file; a CSV source by its name
    raise HarnessError(
        f"{source}: every pixel of every training image is {first}: a pixel std of 0, which the shard set's "
        "readers refuse (normalising divides by it, and there is nothing to learn); nothing was packed"
    )


def _reason(e: OSError) -> str:
    """The OS's reason for `e`, with the path it names when it names one."""
    return f"{e.strerror or e}: {e.filename}" if e.filename else str(e.strerror or e)


def _make_temp_dir(out_dir: Path) -> Path:
    """An empty temporary directory on `out_dir`'s filesystem: inside `out_dir` when it
    exists (it may be a mount point, or sit in a directory this user cannot write),
    else beside it, in its parent (created if need be), so that it can become `out_dir`."""
    if out_dir.is_dir():
        tmp = out_dir / f".packing-{os.getpid()}"
    else:
        tmp = out_dir.parent / f".{out_dir.name}.packing-{os.getpid()}"
    try:
        tmp.parent.mkdir(parents=True, exist_ok=True)
        prefix = tmp.name.removesuffix(str(os.getpid()))  # ".packing-" or ".NAME.packing-"
        removed = remove_dead_leftovers(tmp.parent, re.compile(re.escape(prefix) + "([0-9]+)"))
        tmp.mkdir()
    except OSError as e:
        raise HarnessError(f"{out_dir}: cannot create a temporary directory in {tmp.parent} ({_reason(e)})") from None
    if removed:
        print(f"removed {len(removed)} temporary folder(s) of packs that did not finish: {', '.join(removed)}", flush=True)
    return tmp


def _publish(tmp: Path, out_dir: Path) -> None:
    """Move a finished pack into place; the manifest goes last. On failure, what was
    moved is taken out again: `out_dir` holds what it held before."""
    if tmp.parent != out_dir:
        os.rename(tmp, out_dir)  # one atomic step (onto a new, or meanwhile created empty, out_dir)
        return
    # out_dir exists (e.g. the tracked shards/ with its README, or a mount point): move the
    # shards in, make their renames durable, then the manifest, the commit point.
    moved = []
    try:
        for path in sorted(tmp.iterdir()):
            if path.name != MANIFEST_NAME:
                os.replace(path, out_dir / path.name)
                moved.append(out_dir / path.name)
        fsync_dir(out_dir)
        os.replace(tmp / MANIFEST_NAME, out_dir / MANIFEST_NAME)
    except BaseException:
        for path in moved:
            path.unlink(missing_ok=True)
        raise
