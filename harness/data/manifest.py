"""The `manifest.json` beside the shards: what they hold, and how to check them.

A manifest travels with its shards (a shared filesystem, a bucket, a colleague's run
directory), so it is checked like any other input before anything it names is opened:
against MANIFEST_SCHEMA (jsonschema), then for what a schema cannot say: shard names are
the packer's own, numbered from 0 in order (so no path, URL or `pipe:` ever reaches a
reader), the shards' counts add up to the split's, each size is one its images can have
(at most what they can take up, at least a label byte and tar headers' worth: so a size
bounds the count of blocks a reader lays out),
and the pixel mean agrees with the per-pixel means.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

from harness.data.blocks import max_shard_bytes
from harness.data.sources import IMAGE_SHAPE, NUM_CLASSES
from harness.errors import HarnessError
from harness.validation import first_violation, missing_or_not_a_file, read_json_file

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "test")
MAX_MANIFEST_BYTES = 16 << 20  # MNIST's is 13 kB; 100,000 shards would be about 15 MB
MAX_SAMPLES = 2**31 - 1
MAX_BLOCK_SIZE = 100_000  # one block is decoded in memory at a time: at most 78 MB of 28x28 images
# A reader lays out a shard's blocks before it reads the shard, which for a URL's shard is
# before its size is checked: this keeps that list (about 370 bytes a block of RSS,
# measured at 5 million) under 40 MB whatever a manifest claims. MNIST's have 10 blocks.
MAX_BLOCKS_PER_SHARD = 100_000
# The smallest nonzero standard deviation of 8-bit pixels scaled to [0, 1] over N pixels is
# about 1/(255 sqrt(N)): above 1e-8 up to 10^11 pixels. Below it, 1/std overflows float32.
MIN_PIXEL_STD = 1e-8
TAR_HEADER_BYTES = 512  # every tar member starts with one

_COUNT = {"type": "integer", "minimum": 1, "maximum": MAX_SAMPLES}
_FRACTION = {"type": "number", "minimum": 0, "maximum": 1}
SHARD_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": r"^(train|test)-[0-9]{6}\.tar$"},
        "samples": _COUNT,
        "bytes": {"type": "integer", "minimum": 1},
        "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
    },
    "required": ["name", "samples", "bytes", "sha256"],
    "additionalProperties": False,
}
SPLIT_SCHEMA = {
    "type": "object",
    "properties": {
        "samples": _COUNT,
        "block_size": {"type": "integer", "minimum": 1, "maximum": MAX_BLOCK_SIZE},
        "shards": {"type": "array", "minItems": 1, "items": SHARD_SCHEMA},
    },
    "required": ["samples", "block_size", "shards"],
    "additionalProperties": False,
}
# The train-set statistics; a run records the ones its normalisation used (some or none of
# them) in its checkpoints and summary.json, where they are checked against this as well.
STATS_SCHEMA = {
    "type": "object",
    "properties": {
        "mean": _FRACTION,
        "std": {"type": "number", "minimum": MIN_PIXEL_STD, "maximum": 0.5},  # values in [0, 1]: std <= 1/2
        "pixel_mean": {"type": "array", "minItems": math.prod(IMAGE_SHAPE), "maxItems": math.prod(IMAGE_SHAPE), "items": _FRACTION},
    },
    "additionalProperties": False,
}
MANIFEST_SCHEMA = {
    "type": "object",
    "properties": {
        # `const` alone compares as Python does (28.0 == 28): "type" keeps the floats out.
        "format_version": {"type": "integer", "const": FORMAT_VERSION},
        "dataset": {"type": "string"},
        "packed_by": {"type": "string"},
        "image_shape": {"const": list(IMAGE_SHAPE), "items": {"type": "integer"}},  # the models are built for 28x28
        "num_classes": {"type": "integer", "const": NUM_CLASSES},
        "source": {"type": "object"},
        "splits": {
            "type": "object",
            "properties": {split: SPLIT_SCHEMA for split in SPLITS},
            "required": list(SPLITS),
            "additionalProperties": False,
        },
        "train_stats": {**STATS_SCHEMA, "required": ["mean", "std", "pixel_mean"]},
    },
    "required": ["format_version", "image_shape", "num_classes", "splits", "train_stats"],
}


def load_manifest(shard_dir: Path) -> dict:
    """The shard directory's manifest, read and checked in full; HarnessError naming the
    field and the problem otherwise."""
    shard_dir = Path(shard_dir)
    path = shard_dir / MANIFEST_NAME
    if shard_dir.is_file():
        raise HarnessError(f"{shard_dir}: is a file; --shards names the shard directory (the one holding {MANIFEST_NAME})")
    if not shard_dir.is_dir():
        raise HarnessError(f"{shard_dir}: shard directory not found (run `harness pack` first)")
    if not os.path.lexists(path):
        raise HarnessError(f"{path}: manifest not found; {shard_dir} holds no packed shard set (run `harness pack`)")
    if not path.is_file():
        raise HarnessError(f"{path}: {missing_or_not_a_file(path)}; a shard set's manifest is a JSON file")
    manifest = read_json_file(path, MAX_MANIFEST_BYTES, "manifest")
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if isinstance(manifest, dict) and version != FORMAT_VERSION:
        raise HarnessError(f"{path}: format_version is {version!r}; this harness reads version {FORMAT_VERSION}")
    problem = manifest_problem(manifest)
    if problem:
        raise HarnessError(f"{path}: {problem}")
    return manifest


def shard_set_sha256(manifest: dict) -> str:
    """What a run's results depend on in a checked manifest: each split's block size and its
    shards' names, image counts and SHA-256s, hashed. The same set copied elsewhere, or
    served from a URL, has the same digest; another packing of it (another --block-size or
    --shard-size, which reorder the images) or other images have another."""
    layout = {split: [manifest["splits"][split]["block_size"], [[s["name"], s["samples"], s["sha256"]] for s in manifest["splits"][split]["shards"]]]
              for split in SPLITS}
    return hashlib.sha256(json.dumps(layout, sort_keys=True).encode()).hexdigest()


def manifest_problem(manifest) -> str | None:
    """The first way `manifest` fails a reader's checks, as `field: problem`; None if it passes
    (the packer asks too, so that it never publishes a set its readers refuse)."""
    return first_violation(MANIFEST_SCHEMA, manifest) or _layout_problem(manifest)


def _layout_problem(manifest: dict) -> str | None:
    """What the schema cannot check, as `field: problem`; None if there is nothing."""
    for split in SPLITS:
        info, field = manifest["splits"][split], f"splits.{split}"
        for i, shard in enumerate(info["shards"]):
            expected = f"{split}-{i:06d}.tar"
            if shard["name"] != expected:
                return f"{field}.shards[{i}].name: {shard['name']!r}; {expected!r} was expected (the packer numbers a split's shards from 0)"
            problem = _shard_size_problem(shard, info["block_size"])
            if problem:
                return f"{field}.shards[{i}].bytes: {problem}"
            blocks = -(-shard["samples"] // info["block_size"])
            if blocks > MAX_BLOCKS_PER_SHARD:
                return (f"{field}.shards[{i}].samples: {shard['samples']} images in blocks of {info['block_size']} "
                        f"are {blocks:,} blocks; a shard holds at most {MAX_BLOCKS_PER_SHARD:,}")
        held = sum(shard["samples"] for shard in info["shards"])
        if held != info["samples"]:
            return f"{field}.samples: {info['samples']}, but the shards hold {held} ({' + '.join(str(s['samples']) for s in info['shards'][:5])}{' + ...' if len(info['shards']) > 5 else ''})"
    stats = manifest["train_stats"]
    average = math.fsum(stats["pixel_mean"]) / len(stats["pixel_mean"])
    if abs(stats["mean"] - average) > 1e-6:
        return f"train_stats.mean: {stats['mean']} is not the average of pixel_mean ({average:.8f})"
    return None


def min_shard_bytes(samples: int, block_size: int) -> int:
    """A size no shard of `samples` images in blocks of `block_size` can be under: a label
    byte per image and three tar headers per block. Loose on purpose: a shard short of
    bytes beyond this still reaches the indexer, which names the short or damaged member;
    this bound only has to keep the declared block count (and so every per-block list a
    reader builds before indexing) proportional to the shard's real size."""
    return samples + -(-samples // block_size) * 3 * TAR_HEADER_BYTES


def _shard_size_problem(shard: dict, block_size: int) -> str | None:
    """Why a shard's recorded bytes cannot hold its recorded samples; None if they can.
    (A local shard's real size is checked against `bytes` when its split is opened, before
    any layout is built; a fetched one's only as it arrives.)"""
    samples, size = shard["samples"], shard["bytes"]
    high = max_shard_bytes(samples, block_size, math.prod(IMAGE_SHAPE))
    if size > high:
        return f"{size} is more than a shard of {samples} images can be ({high})"
    low = min_shard_bytes(samples, block_size)
    if size < low:
        return (f"{size} is less than a shard of {samples} images in blocks of {block_size} can be "
                f"({low}: a label byte per image and three {TAR_HEADER_BYTES}-byte tar headers per block)")
    return None


def split_info(manifest: dict, split: str, shard_dir: Path) -> dict:
    try:
        return manifest["splits"][split]
    except KeyError:
        raise HarnessError(f"{Path(shard_dir) / MANIFEST_NAME}: has no '{split}' split") from None
