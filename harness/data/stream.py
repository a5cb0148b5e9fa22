"""Stream a split's shards as macro-batches on the training device.

An epoch is a fixed sequence of images that depends only on (seed, epoch):
shards in a seeded order, and inside each shard its blocks in a seeded order.
That sequence is cut into macro-batches whose size is a multiple of the global
batch; each macro-batch goes to the device in one transfer, and a seeded
permutation of it is sliced into global batches. A rank keeps its own slice of
every global batch, so the global batches are the same at any world size, and
a position in the stream is just (epoch, macro-batch, step): no hidden
iterator state, so a run can stop and resume at any step.

Every rank reads every macro-batch. MNIST is small enough for that; a dataset
too large for it would give each rank only the blocks its slices touch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import webdataset as wds

from harness.data.manifest import load_manifest, split_info, verify_shards
from harness.errors import HarnessError


def seeded_generator(*key: int) -> np.random.Generator:
    """A generator that depends only on `key` (seed, epoch, ...), never on rank or world size."""
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


def _every_shard(urls):
    return urls


def read_blocks(path: Path) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """All blocks of one shard as (first index, images, labels), in file order."""
    # Every rank reads every shard on purpose (see the module docstring), so the
    # node and worker splitters are the identity.
    dataset = wds.WebDataset(
        str(path), shardshuffle=False, empty_check=False, nodesplitter=_every_shard, workersplitter=_every_shard
    ).decode()
    blocks = []
    for sample in dataset:
        try:
            blocks.append((int(sample["meta.json"]["first"]), sample["images.npy"], sample["labels.npy"]))
        except KeyError as e:
            raise HarnessError(f"{path}: block {sample.get('__key__')} lacks member {e}") from None
    return blocks


@dataclass
class ShardSplit:
    """One split of a packed shard set, restricted to sample indices [start, stop)."""

    shard_dir: Path
    split: str
    start: int = 0
    stop: int | None = None
    verify: bool = True

    def __post_init__(self):
        self.shard_dir = Path(self.shard_dir)
        self.manifest = load_manifest(self.shard_dir)
        info = split_info(self.manifest, self.split, self.shard_dir)
        self.paths = verify_shards(self.shard_dir, self.manifest, self.split, check_hash=self.verify)
        total = info["samples"]
        self.stop = total if self.stop is None else self.stop
        if not 0 <= self.start < self.stop <= total:
            raise HarnessError(f"{self.shard_dir}: sample range [{self.start}, {self.stop}) is outside the {self.split} split's {total} samples")
        # Index of each shard's first sample, from the manifest's per-shard counts.
        counts = [s["samples"] for s in info["shards"]]
        self.shard_firsts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int).tolist()
        self.shard_counts = counts

    def __len__(self) -> int:
        return self.stop - self.start

    def used_in_shard(self, i: int) -> int:
        first = self.shard_firsts[i]
        return max(0, min(self.stop, first + self.shard_counts[i]) - max(self.start, first))

    def clip(self, first: int, images: np.ndarray, labels: np.ndarray):
        lo, hi = max(self.start - first, 0), min(self.stop - first, len(labels))
        return images[lo:hi], labels[lo:hi]

    def load_all(self) -> tuple[np.ndarray, np.ndarray]:
        """Every sample of the range in index order (validation and test sets)."""
        images, labels = [], []
        for i, path in enumerate(self.paths):
            if self.used_in_shard(i):
                for first, block_images, block_labels in read_blocks(path):
                    block_images, block_labels = self.clip(first, block_images, block_labels)
                    images.append(block_images)
                    labels.append(block_labels)
        return np.concatenate(images), np.concatenate(labels)


@dataclass
class MacroBatch:
    epoch: int
    index: int  # macro-batch number inside the epoch
    images: torch.Tensor  # uint8 [m, 28, 28] on the device
    labels: torch.Tensor  # int64 [m] on the device
    order: torch.Tensor  # seeded permutation of range(m) on the device
    global_batch: int

    @property
    def steps(self) -> int:
        return len(self.labels) // self.global_batch

    def local_batch(self, step: int, rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's slice of global batch `step`: uint8 images and labels."""
        local = self.global_batch // world_size
        begin = step * self.global_batch + rank * local
        index = self.order[begin : begin + local]
        return self.images[index], self.labels[index]


class MacroBatchStream:
    def __init__(self, data: ShardSplit, global_batch: int, macro_batch: int, seed: int, device: torch.device):
        if global_batch > len(data):
            raise HarnessError(f"--batch-size {global_batch} is larger than the {len(data)} training samples")
        self.data, self.global_batch, self.seed, self.device = data, global_batch, seed, device
        # Macro-batches hold whole global batches, so the only images dropped in
        # an epoch are the final remainder, fewer than one global batch.
        self.steps_per_epoch = len(data) // global_batch
        self.macro_steps = max(1, macro_batch // global_batch)
        self.macro_size = self.macro_steps * global_batch
        self.macro_batches_per_epoch = -(-self.steps_per_epoch // self.macro_steps)
        self._pin = device.type == "cuda"
        # When one macro-batch holds the whole split, the decoded blocks are already
        # in memory once per epoch; keeping them saves re-reading the shards every
        # epoch (~4% of a neupy-mlp epoch on 2 cores). Larger splits stream.
        self._decoded: dict[int, list] | None = {} if self.macro_batches_per_epoch == 1 else None

    def _shard_blocks(self, shard: int) -> list[tuple[int, np.ndarray, np.ndarray]]:
        if self._decoded is None:
            return read_blocks(self.data.paths[shard])
        if shard not in self._decoded:
            self._decoded[shard] = read_blocks(self.data.paths[shard])
        return self._decoded[shard]

    def _epoch_blocks(self, epoch: int, skip: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The epoch's image sequence as blocks, starting `skip` images in."""
        rng = seeded_generator(self.seed, epoch, 0)
        for shard in rng.permutation(len(self.data.paths)).tolist():
            # Draw the block order even for skipped shards, so the rng stream never depends on `skip`.
            used = self.data.used_in_shard(shard)
            block_seed = int(rng.integers(2**63))
            if used == 0:
                continue
            if skip >= used:
                skip -= used
                continue
            blocks = self._shard_blocks(shard)
            for b in np.random.default_rng(block_seed).permutation(len(blocks)).tolist():
                images, labels = self.data.clip(*blocks[b])
                if skip >= len(labels):
                    skip -= len(labels)
                    continue
                yield images[skip:], labels[skip:]
                skip = 0

    def _assemble(self, epoch: int, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Host arrays for macro-batch `index` of `epoch`.

        Numpy only, so that it could move to a reader thread without starting
        a second OpenMP thread team (torch ops there cost ~20% of throughput).
        """
        first_step = index * self.macro_steps
        steps = min(self.macro_steps, self.steps_per_epoch - first_step)
        size = steps * self.global_batch
        images = np.empty((size, *self.data.manifest["image_shape"]), dtype=np.uint8)
        labels = np.empty(size, dtype=np.uint8)
        filled = 0
        for block_images, block_labels in self._epoch_blocks(epoch, skip=first_step * self.global_batch):
            take = min(len(block_labels), size - filled)
            images[filled : filled + take] = block_images[:take]
            labels[filled : filled + take] = block_labels[:take]
            filled += take
            if filled == size:
                break
        return images, labels

    def _to_device(self, epoch: int, index: int, host: tuple[np.ndarray, np.ndarray]) -> MacroBatch:
        """One host-to-device transfer per tensor: from pinned memory, non-blocking, on CUDA."""
        images, labels = (torch.from_numpy(a) for a in host)
        if self._pin:
            images, labels = images.pin_memory(), labels.pin_memory()
        images, labels = (t.to(self.device, non_blocking=True) for t in (images, labels))
        order = torch.from_numpy(seeded_generator(self.seed, epoch, 1 + index).permutation(len(labels)))
        return MacroBatch(epoch, index, images, labels.long(), order.to(self.device, non_blocking=True), self.global_batch)

    def epoch(self, epoch: int, start_index: int = 0) -> Iterator[MacroBatch]:
        """Macro-batches of `epoch` from `start_index` on.

        Read on the training thread, with no prefetch: with the default macro-batch
        (the whole MNIST training set) there is nothing to overlap, and a reader
        thread measured ~10% slower LeNet training on 2 cores.
        """
        for index in range(start_index, self.macro_batches_per_epoch):
            yield self._to_device(epoch, index, self._assemble(epoch, index))
