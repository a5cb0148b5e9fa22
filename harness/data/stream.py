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

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from harness.data.blocks import read_blocks
from harness.data.manifest import load_manifest, split_info, verify_shards
from harness.errors import HarnessError


def seeded_generator(*key: int) -> np.random.Generator:
    """A generator that depends only on `key` (seed, epoch, ...), never on rank or world size."""
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


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
        self.block_size = info["block_size"]

    def __len__(self) -> int:
        return self.stop - self.start

    def used_in_shard(self, i: int) -> int:
        first = self.shard_firsts[i]
        return max(0, min(self.stop, first + self.shard_counts[i]) - max(self.start, first))

    def block_layout(self, shard: int) -> list[tuple[int, int]]:
        """(first sample index, image count) of each block of a shard, in file order, as the
        packer lays them out: consecutive blocks of block_size, the last one shorter."""
        first, count, size = self.shard_firsts[shard], self.shard_counts[shard], self.block_size
        return [(first + k, min(size, count - k)) for k in range(0, count, size)]

    def read_shard(self, shard: int) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """A shard's blocks, each checked against the manifest's layout as it is read."""
        return read_blocks(
            self.paths[shard], self.split, self.block_layout(shard), tuple(self.manifest["image_shape"]), self.manifest["num_classes"]
        )

    def clip(self, first: int, images: np.ndarray, labels: np.ndarray):
        lo, hi = max(self.start - first, 0), min(self.stop - first, len(labels))
        return images[lo:hi], labels[lo:hi]

    def load_all(self) -> tuple[np.ndarray, np.ndarray]:
        """Every sample of the range in index order (validation and test sets)."""
        images, labels = [], []
        for i in range(len(self.paths)):
            if self.used_in_shard(i):
                for first, block_images, block_labels in self.read_shard(i):
                    block_images, block_labels = self.clip(first, block_images, block_labels)
                    images.append(block_images)
                    labels.append(block_labels)
        return np.concatenate(images), np.concatenate(labels)


@dataclass
class MacroBatch:
    epoch: int
    index: int  # macro-batch number inside the epoch
    images: torch.Tensor  # uint8 [m, 28, 28] on the device (or the whole split, when resident)
    labels: torch.Tensor  # int64 [m] on the device (likewise)
    order: torch.Tensor  # int64 [steps * global_batch] on the device: the rows of images, in step order
    global_batch: int
    ready: torch.cuda.Event | None = None  # when copied on a side stream: done when this is

    @property
    def steps(self) -> int:
        return len(self.order) // self.global_batch

    def wait_until_ready(self) -> None:
        """On a GPU: make the compute stream wait for the side stream's copy (the host does
        not wait), and keep the copied tensors alive for the compute stream's use of them."""
        if self.ready is not None:
            compute = torch.cuda.current_stream(self.images.device)
            compute.wait_event(self.ready)
            for tensor in (self.images, self.labels, self.order):
                tensor.record_stream(compute)

    def local_batch(self, step: int, rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's slice of global batch `step`: uint8 images and labels."""
        local = self.global_batch // world_size
        begin = step * self.global_batch + rank * local
        index = self.order[begin : begin + local]
        return self.images[index], self.labels[index]


class MacroBatchStream:
    """An epoch's global batches, as macro-batches on the device.

    When one macro-batch holds the whole split, the split stays resident on the device
    (one host-to-device copy per run) and each epoch only sends its order, an index
    array. Otherwise every macro-batch is assembled from the shards and copied; on a
    GPU the next one is assembled in a background thread into pinned memory and copied
    on a side stream while the current one trains.
    """

    def __init__(
        self, data: ShardSplit, global_batch: int, macro_batch: int, seed: int, device: torch.device, prefetch: bool | None = None,
        shuffle: bool = True,
    ):
        """`shuffle=False`: every epoch is the split in file order (shards, blocks and images in
        index order); the slicing into global batches and rank slices stays the same."""
        if global_batch > len(data):
            raise HarnessError(f"--batch-size {global_batch} is larger than the {len(data)} training samples")
        self.data, self.global_batch, self.seed, self.device, self.shuffle = data, global_batch, seed, device, shuffle
        # Macro-batches hold whole global batches, so the only images dropped in
        # an epoch are the final remainder, fewer than one global batch.
        self.steps_per_epoch = len(data) // global_batch
        self.macro_steps = max(1, macro_batch // global_batch)
        self.macro_size = self.macro_steps * global_batch
        self.macro_batches_per_epoch = -(-self.steps_per_epoch // self.macro_steps)
        self.resident = self.macro_batches_per_epoch == 1
        # A reader thread measured ~10% slower LeNet training on 2 CPU cores (it competes
        # with the compute for them), so only a GPU prefetches by default.
        self.prefetch = (device.type == "cuda") if prefetch is None else prefetch
        self._split: tuple[torch.Tensor, torch.Tensor] | None = None  # the resident split, loaded on first use
        self._copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def _epoch_plan(self, epoch: int, skip: int) -> Iterator[tuple[int, int, int, int]]:
        """The epoch's image sequence from `skip` images in, as pieces (shard, block, lo, hi):
        rows lo:hi of that block of that shard, in the range. Shards in a seeded order, the
        blocks of each shard in a seeded order; the layout comes from the manifest."""
        rng = seeded_generator(self.seed, epoch, 0)
        shards = rng.permutation(len(self.data.paths)) if self.shuffle else np.arange(len(self.data.paths))
        for shard in shards.tolist():
            # Draw the block order even for skipped shards, so the rng stream never depends on `skip`.
            used = self.data.used_in_shard(shard)
            block_seed = int(rng.integers(2**63))
            if used == 0:
                continue
            if skip >= used:
                skip -= used
                continue
            blocks = self.data.block_layout(shard)
            block_order = np.random.default_rng(block_seed).permutation(len(blocks)) if self.shuffle else np.arange(len(blocks))
            for b in block_order.tolist():
                first, count = blocks[b]
                lo, hi = max(self.data.start - first, 0), min(self.data.stop - first, count)
                if skip >= max(hi - lo, 0):
                    skip -= max(hi - lo, 0)
                    continue
                yield shard, b, lo + skip, hi
                skip = 0

    def _macro_range(self, index: int) -> tuple[int, int]:
        """(images to skip, images in) macro-batch `index`."""
        first_step = index * self.macro_steps
        return first_step * self.global_batch, min(self.macro_steps, self.steps_per_epoch - first_step) * self.global_batch

    def _order(self, epoch: int, index: int, size: int) -> np.ndarray:
        return seeded_generator(self.seed, epoch, 1 + index).permutation(size) if self.shuffle else np.arange(size)

    def preload(self) -> None:
        """A resident split: read it and copy it to the device now (before the clock
        starts), rather than in the first epoch."""
        if self.resident and self._split is None:
            images, labels = self.data.load_all()
            self._split = (torch.from_numpy(images).to(self.device), torch.from_numpy(labels).long().to(self.device))

    def _resident_batch(self, epoch: int) -> MacroBatch:
        """The whole split on the device, and the epoch's order as indices into it."""
        self.preload()
        skip, size = self._macro_range(0)
        pieces = [self.data.block_layout(shard)[b][0] - self.data.start + np.arange(lo, hi) for shard, b, lo, hi in self._epoch_plan(epoch, skip)]
        sequence = np.concatenate(pieces)[:size] if pieces else np.empty(0, dtype=np.int64)
        self._check_filled(len(sequence), size)
        order = torch.from_numpy(sequence[self._order(epoch, 0, size)]).to(self.device, non_blocking=True)
        return MacroBatch(epoch, 0, *self._split, order, self.global_batch)

    def _assemble(self, epoch: int, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Host arrays for macro-batch `index` of `epoch`.

        Numpy only, so that it can run in a reader thread without starting a second
        OpenMP thread team (torch ops there cost ~20% of throughput).
        """
        skip, size = self._macro_range(index)
        images = np.empty((size, *self.data.manifest["image_shape"]), dtype=np.uint8)
        labels = np.empty(size, dtype=np.uint8)
        filled, cached = 0, {}
        for shard, b, lo, hi in self._epoch_plan(epoch, skip):
            if shard not in cached:
                cached = {shard: self.data.read_shard(shard)}  # one shard decoded at a time
            first, block_images, block_labels = cached[shard][b]
            take = min(hi - lo, size - filled)
            images[filled : filled + take] = block_images[lo : lo + take]
            labels[filled : filled + take] = block_labels[lo : lo + take]
            filled += take
            if filled == size:
                break
        self._check_filled(filled, size)
        return images, labels

    def _check_filled(self, filled: int, size: int) -> None:
        if filled < size:
            raise HarnessError(
                f"{self.data.shard_dir}: the {self.data.split} shards hold fewer images than manifest.json says "
                f"(a macro-batch of {size} got {filled}); the shards or the manifest are damaged"
            )

    def _to_device(self, epoch: int, index: int, host: tuple[np.ndarray, np.ndarray]) -> MacroBatch:
        """One host-to-device transfer per tensor; on a GPU from pinned memory on the copy stream."""
        images, labels = (torch.from_numpy(a) for a in host)
        order = torch.from_numpy(self._order(epoch, index, len(labels)))
        if self._copy_stream is None:
            return MacroBatch(epoch, index, images.to(self.device), labels.long().to(self.device), order.to(self.device), self.global_batch)
        with torch.cuda.stream(self._copy_stream):
            images, labels, order = (t.pin_memory().to(self.device, non_blocking=True) for t in (images, labels, order))
            # Widened on the copy stream too: on any other stream this could read the
            # labels before their copy has landed.
            labels = labels.long()
            ready = torch.cuda.Event()
            ready.record()
        return MacroBatch(epoch, index, images, labels, order, self.global_batch, ready)

    def _load(self, epoch: int, index: int) -> MacroBatch:
        return self._to_device(epoch, index, self._assemble(epoch, index))

    def epoch(self, epoch: int, start_index: int = 0) -> Iterator[MacroBatch]:
        """Macro-batches of `epoch` from `start_index` on."""
        if self.resident:
            if start_index == 0:
                yield self._resident_batch(epoch)
            return
        if not self.prefetch:
            for index in range(start_index, self.macro_batches_per_epoch):
                yield self._load(epoch, index)
            return
        with ThreadPoolExecutor(1, thread_name_prefix="harness-prefetch") as reader:
            upcoming = reader.submit(self._load, epoch, start_index)
            for index in range(start_index, self.macro_batches_per_epoch):
                batch = upcoming.result()
                if index + 1 < self.macro_batches_per_epoch:
                    upcoming = reader.submit(self._load, epoch, index + 1)
                yield batch
