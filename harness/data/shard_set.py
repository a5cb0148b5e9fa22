"""A packed shard set, wherever it is, and one split of it read image by image.

`ShardSource` is where the files are: a local directory (a local disk or a shared
filesystem), or a URL whose files come through a local cache (remote.py), checked
against their SHA-256 as they arrive. Either way the manifest is read and checked first
and every shard is then named by it, so nothing else from the location is opened.

`ShardSplit` is one split restricted to a sample range. It indexes a shard the first
time it is touched (records.py) and then reads just the images asked for, so a rank
that trains on 1/W of a macro-batch reads about 1/W of its bytes.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np

from harness.data.manifest import MANIFEST_NAME, load_manifest, split_info
from harness.data.records import IndexedBlock, index_shard, read_rows
from harness.data.remote import COMMAND_SCHEMES, RemoteShards, is_remote
from harness.data.sources import sha256_of
from harness.errors import HarnessError
from harness.validation import missing_or_not_a_file


def default_cache_dir() -> Path:
    """$HARNESS_CACHE (`~` expanded; blank is unset), else ~/.cache/mnist-harness: the shards
    go into its shards/ folder."""
    given = os.environ.get("HARNESS_CACHE", "")
    return Path(given if given.strip() else Path.home() / ".cache" / "mnist-harness").expanduser()


URL_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def names_a_url(location: str | Path) -> bool:
    """Whether ShardSource fetches `location` into the cache: a URL written as text (only if
    no such local path exists: a directory named `pipe:cat` is a directory)."""
    return isinstance(location, str) and is_remote(location) and not os.path.lexists(location)


def is_a_local_directory(location: str | Path) -> bool:
    """Whether ShardSource reads `location` as a directory: not a URL it fetches, nor one with
    a scheme it has no reader for (which it refuses by name). file:// URLs are directories."""
    text = str(location)
    return not names_a_url(location) and (os.path.lexists(text) or text.startswith("file://") or not URL_SCHEME.match(text))


class ShardSource:
    """A shard set's manifest and shard files, from a directory or through a cache from a URL
    (`remote.is_remote`: https://, http://, gs://, sftp://, ftps://, scp:// or
    `pipe:COMMAND {name}`)."""

    def __init__(self, location: str | Path, cache_dir: Path | None = None, cache_limit_bytes: int | None = None,
                 cancel_when: Callable[[], bool] = lambda: False):
        """`cancel_when`: from a URL, the manifest's fetch gives up with a HarnessError once
        it is true (a stop signal; RemoteShards.fetches_cancelled_when)."""
        self.location = str(location)
        self.remote = None
        # Only a location written as text can be a URL, and only if no such local path
        # exists: a directory named `pipe:cat` is a directory.
        if isinstance(location, str) and location.startswith("file://") and not os.path.lexists(location):
            location = location[len("file://") :]  # file:///data/shards is /data/shards
        if names_a_url(location):
            self.remote = RemoteShards(self.location, Path(cache_dir or default_cache_dir()), cache_limit_bytes)
            with self.remote.fetches_cancelled_when(cancel_when), self.remote.fetched_manifest() as fetched:
                try:
                    self.manifest = load_manifest(fetched)
                except HarnessError as e:  # name the URL, not the fetched copy
                    raise HarnessError(str(e).replace(str(fetched / MANIFEST_NAME), self.url(MANIFEST_NAME))) from None
        else:
            if isinstance(location, str) and URL_SCHEME.match(location) and not os.path.lexists(location):
                raise HarnessError(
                    f"--shards {location}: no reader for {location.split('://')[0]}:// locations; give a directory, an "
                    f"{', '.join(('https://', 'http://', *COMMAND_SCHEMES, 'file://'))} URL, or 'pipe:COMMAND {{name}}' (e.g. 'pipe:aws s3 cp s3://BUCKET/PATH/{{name}} -')"
                )
            self.directory = Path(location)
            self.manifest = load_manifest(self.directory)

    def url(self, name: str) -> str:
        return self.remote.location(name) if self.remote else str(self.directory / name)

    def fetches_cancelled(self):
        """A context within which a shard's download on another thread (the stream's reader)
        gives up soon (RemoteShards.fetches_cancelled): a stopping run does not wait up to
        the download's deadline for data it will not use."""
        return self.remote.fetches_cancelled() if self.remote else contextlib.nullcontext()

    def fetches_cancelled_when(self, asked):
        """A context within which downloads give up soon once `asked()` is true
        (RemoteShards.fetches_cancelled_when)."""
        return self.remote.fetches_cancelled_when(asked) if self.remote else contextlib.nullcontext()

    def shards(self, split: str) -> list[dict]:
        return split_info(self.manifest, split, self.location)["shards"]

    def shard_path(self, split: str, i: int) -> Path:
        """A local file holding shard `i` of `split`: in the directory, or fetched into the
        cache (and checked as it streamed) when it is not there already."""
        shard = self.shards(split)[i]
        if self.remote:
            return self.remote.shard_path(shard["name"], shard["bytes"], shard["sha256"])
        return self.directory / shard["name"]  # a plain file name: load_manifest checked it

    def open_shard(self, split: str, i: int):
        """Shard `i` of `split`, opened for unbuffered reading. A cached shard that another
        process evicted between its fetch and the open is fetched again."""
        for attempt in range(3):
            path = self.shard_path(split, i)
            try:
                return open(path, "rb", buffering=0)
            except (FileNotFoundError, IsADirectoryError):
                if not self.remote or attempt == 2:
                    raise HarnessError(f"{path}: shard listed in {MANIFEST_NAME} {missing_or_not_a_file(path)}") from None
            except OSError as e:
                raise HarnessError(f"{path}: cannot be opened ({e.strerror or e})") from None

    def check(self, split: str, hash_shards: list[int] | None = None) -> None:
        """Every local shard of `split` exists with the manifest's size; the SHA-256 of the
        shards in `hash_shards` (default all) is checked too. A URL's shards are checked as
        they are fetched."""
        if self.remote:
            return
        shards = self.shards(split)
        for shard in shards:
            path = self.directory / shard["name"]
            if not path.is_file():
                raise HarnessError(f"{path}: shard listed in {MANIFEST_NAME} {missing_or_not_a_file(path)}")
            size = path.stat().st_size
            if size != shard["bytes"]:
                raise HarnessError(f"{path}: shard is {size} bytes; {MANIFEST_NAME} records {shard['bytes']} (corrupt or truncated)")
        for i in range(len(shards)) if hash_shards is None else hash_shards:
            path = self.directory / shards[i]["name"]
            try:
                digest = sha256_of(path)
            except OSError as e:
                raise HarnessError(f"{path}: cannot be read ({e.strerror or e})") from None
            if digest != shards[i]["sha256"]:
                raise HarnessError(f"{path}: SHA-256 differs from {MANIFEST_NAME} (shard is corrupt)")


def index_problem(location, split: str, i: int, total: int) -> str | None:
    """`harness show` and `harness predict`: why --index `i` is not a sample of the split."""
    return None if 0 <= i < total else f"{location}: --index {i} is outside the {split} split's {total} images"


class ShardSplit:
    """One split of a shard set, restricted to sample indices [start, stop).

    `verify=True` checks the SHA-256 of every shard of the split here; a distributed run
    passes False and has each rank hash a share of them (Trainer.verify_train_shards)."""

    def __init__(self, shards: ShardSource | str | Path, split: str, start: int = 0, stop: int | None = None, verify: bool = True):
        self.source = shards if isinstance(shards, ShardSource) else ShardSource(shards)
        self.split, self.manifest, self.location = split, self.source.manifest, self.source.location
        info = split_info(self.manifest, split, self.location)
        self.source.check(split, None if verify else [])
        total = info["samples"]
        self.start, self.stop = start, total if stop is None else stop
        if not 0 <= self.start < self.stop <= total:
            raise HarnessError(f"{self.location}: sample range [{self.start}, {self.stop}) is outside the {split} split's {total} samples")
        self.shard_counts = [s["samples"] for s in info["shards"]]
        # Index of each shard's first sample, from the manifest's per-shard counts.
        self.shard_firsts = np.concatenate([[0], np.cumsum(self.shard_counts)[:-1]]).astype(int).tolist()
        self.block_size = info["block_size"]
        self.image_shape = tuple(self.manifest["image_shape"])
        self._index: dict[int, list[IndexedBlock]] = {}
        self._bytes = [0]  # bytes read from shard files: indexing plus images
        self.pages: set | None = None  # a set here collects the file pages the image reads touch

    def __len__(self) -> int:
        return self.stop - self.start

    @property
    def num_shards(self) -> int:
        return len(self.shard_counts)

    @property
    def bytes_read(self) -> int:
        return self._bytes[0]

    def used_in_shard(self, i: int) -> int:
        first = self.shard_firsts[i]
        return max(0, min(self.stop, first + self.shard_counts[i]) - max(self.start, first))

    def block_layout(self, shard: int) -> list[tuple[int, int]]:
        """(first sample index, image count) of each block of a shard, in file order, as the
        packer lays them out: consecutive blocks of block_size, the last one shorter."""
        first, count, size = self.shard_firsts[shard], self.shard_counts[shard], self.block_size
        return [(first + k, min(size, count - k)) for k in range(0, count, size)]

    def blocks(self, shard: int) -> list[IndexedBlock]:
        """A shard's blocks, indexed (and checked against the manifest) on first use."""
        if shard not in self._index:
            with self.source.open_shard(self.split, shard) as f:
                try:
                    self._index[shard] = index_shard(f, self.split, self.block_layout(shard), self.image_shape,
                                                     self.manifest["num_classes"], self._bytes)
                except HarnessError as e:
                    if not self.source.remote:
                        raise
                    raise HarnessError(f"{self.source.url(self.source.shards(self.split)[shard]['name'])}: {e}") from None
        return self._index[shard]

    def read(self, shard: int, requests: list[tuple[int, np.ndarray]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """(images, labels) of rows `rows` (ascending) of block `b`, for each (b, rows) in
        `requests`, all from one shard opened once."""
        blocks, row_bytes = self.blocks(shard), int(np.prod(self.image_shape))
        out = []
        with self.source.open_shard(self.split, shard) as f:
            for b, rows in requests:
                images = read_rows(f, blocks[b], rows, row_bytes, self.pages)
                self._bytes[0] += images.nbytes
                out.append((images.reshape(len(rows), *self.image_shape), blocks[b].labels[rows]))
        return out

    def load_all(self) -> tuple[np.ndarray, np.ndarray]:
        """Every sample of the range in index order (validation and test sets)."""
        images, labels = [], []
        for shard in range(self.num_shards):
            if self.used_in_shard(shard):
                requests = []
                for b, (first, count) in enumerate(self.block_layout(shard)):
                    lo, hi = max(self.start - first, 0), min(self.stop - first, count)
                    if hi > lo:
                        requests.append((b, np.arange(lo, hi)))
                for block_images, block_labels in self.read(shard, requests):
                    images.append(block_images)
                    labels.append(block_labels)
        return np.concatenate(images), np.concatenate(labels)
