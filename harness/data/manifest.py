"""The `manifest.json` beside the shards: what they hold, and how to check them."""

from __future__ import annotations

import json
from pathlib import Path

from harness.data.sources import sha256_of
from harness.errors import HarnessError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"


def load_manifest(shard_dir: Path) -> dict:
    shard_dir = Path(shard_dir)
    path = shard_dir / MANIFEST_NAME
    if not shard_dir.is_dir():
        raise HarnessError(f"{shard_dir}: shard directory not found (run `harness pack` first)")
    if not path.is_file():
        raise HarnessError(f"{path}: manifest not found; {shard_dir} holds no packed shard set (run `harness pack`)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HarnessError(f"{path}: not valid JSON ({e})") from None
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version != FORMAT_VERSION:
        raise HarnessError(f"{path}: format_version is {version!r}; this harness reads version {FORMAT_VERSION}")
    for key in ("splits", "train_stats", "image_shape"):
        if key not in manifest:
            raise HarnessError(f"{path}: field '{key}' is missing")
    return manifest


def split_info(manifest: dict, split: str, shard_dir: Path) -> dict:
    try:
        return manifest["splits"][split]
    except KeyError:
        raise HarnessError(f"{Path(shard_dir) / MANIFEST_NAME}: has no '{split}' split") from None


def verify_shards(shard_dir: Path, manifest: dict, split: str, check_hash: bool = True) -> list[Path]:
    """Check every shard of a split exists with the size and SHA-256 the manifest records."""
    shard_dir = Path(shard_dir)
    paths = []
    for shard in split_info(manifest, split, shard_dir)["shards"]:
        path = shard_dir / shard["name"]
        if not path.is_file():
            raise HarnessError(f"{path}: shard listed in {MANIFEST_NAME} is missing")
        size = path.stat().st_size
        if size != shard["bytes"]:
            raise HarnessError(f"{path}: shard is {size} bytes; {MANIFEST_NAME} records {shard['bytes']} (corrupt or truncated)")
        if check_hash and sha256_of(path) != shard["sha256"]:
            raise HarnessError(f"{path}: SHA-256 differs from {MANIFEST_NAME} (shard is corrupt)")
        paths.append(path)
    return paths
