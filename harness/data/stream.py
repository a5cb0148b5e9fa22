"""Stream a split's shards as macro-batches on the training device.

An epoch is a fixed sequence of images that depends only on (seed, epoch):
shards in a seeded order, and inside each shard its blocks in a seeded order.
That sequence is cut into macro-batches whose size is a multiple of the global
batch; each macro-batch goes to the device in one transfer, and a seeded
permutation of it is sliced into global batches. A rank keeps its own slice of
every global batch, so the global batches are the same at any world size, and
a position in the stream is just (epoch, macro-batch, step): no hidden
iterator state, so a run can stop and resume at any step.

A rank reads only the images of its own slices (ShardSplit reads single images at
their offsets), about 1/W of each macro-batch, and holds them in step order. The one
exception is a split small enough to be one macro-batch: every rank keeps all of it
resident on its device (one copy per run), since each epoch's slices touch all of it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent import futures
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from harness.background import DaemonExecutor
from harness.data.shard_set import ShardSplit
from harness.errors import HarnessError

log = logging.getLogger("harness")
READER_CLOSE_WAIT_S = 10.0  # a macro-batch from local files loads in well under a second; a download is cut at once


def seeded_generator(*key: int) -> np.random.Generator:
    """A generator that depends only on `key` (seed, epoch, ...), never on rank or world size."""
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


class LoadCancelled(Exception):
    """A load the closed stream no longer wants (no one takes its result)."""


@dataclass
class MacroBatch:
    """One rank's part of a macro-batch: its slices of `steps` consecutive global batches."""

    epoch: int
    index: int  # macro-batch number inside the epoch
    images: torch.Tensor  # uint8 [rows, 28, 28] on the device: this rank's rows, or the whole split when resident
    labels: torch.Tensor  # int64 [rows] on the device (likewise)
    order: torch.Tensor  # int64 [steps * local_batch] on the device: rows of images, in step order
    local_batch_size: int  # this rank's share of a global batch
    ready: torch.cuda.Event | None = None  # when copied on a side stream: done when this is

    @property
    def steps(self) -> int:
        return len(self.order) // self.local_batch_size

    def wait_until_ready(self) -> None:
        """On a GPU: make the compute stream wait for the side stream's copy (the host does
        not wait), and keep the copied tensors alive for the compute stream's use of them."""
        if self.ready is not None:
            compute = torch.cuda.current_stream(self.images.device)
            compute.wait_event(self.ready)
            for tensor in (self.images, self.labels, self.order):
                tensor.record_stream(compute)

    def local_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's slice of global batch `step`: uint8 images and labels."""
        index = self.order[step * self.local_batch_size : (step + 1) * self.local_batch_size]
        return self.images[index], self.labels[index]


class MacroBatchStream:
    """One rank's share of an epoch's global batches, as macro-batches on its device.

    When one macro-batch holds the whole split, the split stays resident on the device
    (one host-to-device copy per run) and each epoch only sends this rank's order, an
    index array. Otherwise each macro-batch's rows for this rank are read from the shards
    and copied. On a GPU the next macro-batch (or the next epoch's order) is prepared in a
    background thread into pinned memory and copied on a side stream while the current one
    trains, across epoch ends too when the caller says another epoch follows: then no
    epoch starts with the GPU idle while the host reads.
    """

    def __init__(
        self, data: ShardSplit, global_batch: int, macro_batch: int, seed: int, device: torch.device, prefetch: bool | None = None,
        shuffle: bool = True, rank: int = 0, world_size: int = 1,
    ):
        """`shuffle=False`: every epoch is the split in file order (shards, blocks and images in
        index order); the slicing into global batches and rank slices stays the same."""
        if global_batch > len(data):
            raise HarnessError(f"--batch-size {global_batch} is larger than the {len(data)} training samples")
        self.data, self.global_batch, self.seed, self.device, self.shuffle = data, global_batch, seed, device, shuffle
        self.rank, self.world_size, self.local_batch_size = rank, world_size, global_batch // world_size
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
        self._closing = False  # close() has begun: a load still running stops before its device copy
        self._copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._reader: DaemonExecutor | None = None  # the reader thread, started when first needed
        # (epoch, index, macro-batch) next to train: loading on the reader thread (or loaded), or not yet begun (None).
        self._ahead: tuple[int, int, MacroBatch | Future[MacroBatch] | None] | None = None

    @property
    def most_steps_per_macro(self) -> int:
        """Steps in the largest macro-batch (an epoch's last may hold fewer)."""
        return min(self.macro_steps, self.steps_per_epoch)

    def _epoch_plan(self, epoch: int, skip: int) -> Iterator[tuple[int, int, int, int]]:
        """The epoch's image sequence from `skip` images in, as pieces (shard, block, lo, hi):
        rows lo:hi of that block of that shard, in the range. Shards in a seeded order, the
        blocks of each shard in a seeded order; the layout comes from the manifest."""
        rng = seeded_generator(self.seed, epoch, 0)
        shards = rng.permutation(self.data.num_shards) if self.shuffle else np.arange(self.data.num_shards)
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

    def steps_in(self, index: int) -> int:
        """Global batches in macro-batch `index` of an epoch (the last may hold fewer)."""
        return min(self.macro_steps, self.steps_per_epoch - index * self.macro_steps)

    def _macro_range(self, index: int) -> tuple[int, int]:
        """(images to skip, images in) macro-batch `index`."""
        return index * self.macro_steps * self.global_batch, self.steps_in(index) * self.global_batch

    def _rank_positions(self, epoch: int, index: int, size: int) -> np.ndarray:
        """Positions in macro-batch `index`'s image sequence of this rank's rows, in step
        order: a seeded permutation of the sequence is cut into global batches, and this
        rank takes slice `rank` of each (the permutation never depends on the world size)."""
        order = seeded_generator(self.seed, epoch, 1 + index).permutation(size) if self.shuffle else np.arange(size)
        return order.reshape(-1, self.world_size, self.local_batch_size)[:, self.rank].reshape(-1)

    def _pieces(self, epoch: int, index: int) -> tuple[list[tuple[int, int, int, int]], np.ndarray, int]:
        """Macro-batch `index`'s pieces (shard, block, lo, hi), the position of each piece's
        first image in the macro-batch's sequence, and the macro-batch's size."""
        skip, size = self._macro_range(index)
        pieces, filled = [], 0
        for shard, b, lo, hi in self._epoch_plan(epoch, skip):
            take = min(hi - lo, size - filled)
            pieces.append((shard, b, lo, lo + take))
            filled += take
            if filled == size:
                break
        if filled < size:
            raise HarnessError(
                f"{self.data.location}: the {self.data.split} shards hold fewer images than manifest.json says "
                f"(a macro-batch of {size} got {filled}); the shards or the manifest are damaged"
            )
        starts = np.cumsum([0] + [hi - lo for _, _, lo, hi in pieces[:-1]])
        return pieces, starts, size

    def preload(self) -> None:
        """A resident split: read it and copy it to the device now (before the clock
        starts), rather than in the first epoch."""
        if self.resident and self._split is None:
            images, labels = self.data.load_all()
            self._stop_if_closing()
            self._split = (torch.from_numpy(images).to(self.device), torch.from_numpy(labels).long().to(self.device))

    def _resident_batch(self, epoch: int) -> MacroBatch:
        """The whole split on the device, and this rank's order as indices into it."""
        self.preload()
        pieces, _, size = self._pieces(epoch, 0)
        layouts = {shard: self.data.block_layout(shard) for shard in {piece[0] for piece in pieces}}  # once a shard, not a piece
        sequence = np.concatenate([layouts[shard][b][0] - self.data.start + np.arange(lo, hi) for shard, b, lo, hi in pieces])
        (order,), ready = self._copy_in(torch.from_numpy(sequence[self._rank_positions(epoch, 0, size)]))
        return MacroBatch(epoch, 0, *self._split, order, self.local_batch_size, ready)

    def _assemble(self, epoch: int, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Host arrays of this rank's rows of macro-batch `index` of `epoch`, in step order.
        Only those rows are read, grouped by shard and block and in file order.

        Numpy only, so that it can run in a reader thread without starting a second
        OpenMP thread team (torch ops there cost ~20% of throughput).
        """
        pieces, starts, size = self._pieces(epoch, index)
        positions = self._rank_positions(epoch, index, size)
        piece_of = np.searchsorted(starts, positions, side="right") - 1
        rows = np.array([lo for _, _, lo, _ in pieces])[piece_of] + positions - starts[piece_of]
        wanted = np.lexsort((rows, piece_of))  # by piece, then row: file order within each block
        images = np.empty((len(positions), *self.data.image_shape), dtype=np.uint8)
        labels = np.empty(len(positions), dtype=np.uint8)
        bounds = np.searchsorted(piece_of[wanted], np.arange(len(pieces) + 1))
        by_shard: dict[int, list[tuple[int, np.ndarray, np.ndarray]]] = {}
        for k, (shard, b, _, _) in enumerate(pieces):
            if bounds[k] < bounds[k + 1]:
                dest = wanted[bounds[k] : bounds[k + 1]]
                by_shard.setdefault(shard, []).append((b, rows[dest], dest))
        for shard, requests in by_shard.items():
            got = self.data.read(shard, [(b, block_rows) for b, block_rows, _ in requests])
            for (_, _, dest), (block_images, block_labels) in zip(requests, got):
                images[dest], labels[dest] = block_images, block_labels
        return images, labels

    def _to_device(self, epoch: int, index: int, host: tuple[np.ndarray, np.ndarray]) -> MacroBatch:
        """The assembled rows on the device. They are already in step order, so the order is 0, 1, 2, ...
        The labels are widened on the host: on the device that would be one more kernel, on
        the copy stream so as not to read them before their copy has landed. It copies 7
        more bytes an image, 0.9% beside the image's 784."""
        images, labels = host
        tensors, ready = self._copy_in(torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64)), torch.from_numpy(np.arange(len(labels))))
        return MacroBatch(epoch, index, *tensors, self.local_batch_size, ready)

    def _copy_in(self, *tensors: torch.Tensor) -> tuple[list[torch.Tensor], torch.cuda.Event | None]:
        """Host tensors onto the device, one transfer each. On a GPU from pinned memory on the
        copy stream, so that the host does not wait, with the event that marks them landed
        (MacroBatch.wait_until_ready makes the compute stream wait for it)."""
        if self._copy_stream is None:
            return [t.to(self.device) for t in tensors], None
        with torch.cuda.stream(self._copy_stream):
            copies = [t.pin_memory().to(self.device, non_blocking=True) for t in tensors]
            ready = torch.cuda.Event()
            ready.record()
        return copies, ready

    def _load(self, epoch: int, index: int) -> MacroBatch:
        if self.resident:
            return self._resident_batch(epoch)
        host = self._assemble(epoch, index)
        self._stop_if_closing()
        return self._to_device(epoch, index, host)

    def _stop_if_closing(self) -> None:
        """Between a load's reading and its copy to the device: a load that outlasted
        close()'s wait goes no further, so that the process does not end with the reader
        thread inside a device copy."""
        if self._closing:
            raise LoadCancelled("the stream was closed while this macro-batch loaded")

    def prepare(self, epoch: int, start_index: int = 0, give_up: Callable[[], bool] = lambda: False) -> None:
        """Load the macro-batch that `epoch(epoch, start_index)` starts with now, before the
        training clock starts, as the resident split is: the first epoch then pays no
        one-off start-up (a process's first epoch order took 8-11 ms against 1 ms for the
        next ones on a 2-core Xeon). Nothing, where that epoch yields nothing from there
        (a run resumed at an epoch's end). Waits as `load_next` does."""
        if start_index < self.macro_batches_per_epoch:
            self._ahead = (epoch, start_index, self._submit(epoch, start_index))
            self.load_next(give_up)

    def epoch(self, epoch: int, start_index: int = 0, next_epoch_follows: bool = False) -> Iterator[MacroBatch]:
        """Macro-batches of `epoch` from `start_index` on. Each one names its successor as
        the next to load: with the prefetch thread it loads at once, while this one trains;
        else when `load_next` asks for it (or when it is taken). `next_epoch_follows` (the
        caller will train `epoch + 1` next) makes the next epoch's first macro-batch the
        last one's successor."""
        for index in range(start_index, self.macro_batches_per_epoch):
            batch = self._take(epoch, index)
            if index + 1 < self.macro_batches_per_epoch:
                self._plan(epoch, index + 1)
            elif next_epoch_follows:
                self._plan(epoch + 1, 0)
            yield batch

    def load_next(self, give_up: Callable[[], bool]) -> None:
        """Have the next macro-batch loaded, on the reader thread, or return early once
        `give_up()` is true. The Trainer calls it before an all-reduce that can stop the
        run (the sync point that ends a macro-batch; between two epochs, after validation),
        with "a stop signal came" as `give_up`: a signal that comes while a shard downloads
        (up to 5 attempts of up to 30 min each) then stops every rank there within 0.1 s,
        rather than after the download, which can outlast a launcher's grace period."""
        if self._ahead is None or give_up():
            return
        epoch, index, loaded = self._ahead
        if loaded is None:
            loaded = self._submit(epoch, index)
            self._ahead = (epoch, index, loaded)
        while isinstance(loaded, Future) and not loaded.done() and not give_up():
            futures.wait([loaded], timeout=0.1)

    def _take(self, epoch: int, index: int) -> MacroBatch:
        """Macro-batch `index` of `epoch`: the one planned or loaded ahead if it is this one
        (used once), else loaded now. A load ahead of some other one is dropped."""
        ahead, self._ahead = self._ahead, None
        if ahead and ahead[:2] == (epoch, index) and ahead[2] is not None:
            return ahead[2].result() if isinstance(ahead[2], Future) else ahead[2]
        if ahead and isinstance(ahead[2], Future):
            ahead[2].cancel()  # one the reader has begun runs to its end, unused
        return self._load(epoch, index)

    def _plan(self, epoch: int, index: int) -> None:
        self._ahead = (epoch, index, self._submit(epoch, index) if self.prefetch else None)

    def _submit(self, epoch: int, index: int) -> Future[MacroBatch]:
        if self._reader is None:
            self._reader = DaemonExecutor("harness-reader")
        return self._reader.submit(self._load, epoch, index)

    def close(self) -> None:
        """Stop the reader thread: a load not begun is dropped, and one under way is cut
        short where it downloads a shard; one from local files is quick to finish, and is
        waited for READER_CLOSE_WAIT_S at most (a hung filesystem: the process then ends
        without it)."""
        self._ahead = None
        self._closing = True
        if self._reader is not None:
            with self.data.source.fetches_cancelled():
                ended = self._reader.shutdown(wait_s=READER_CLOSE_WAIT_S)
            if not ended:
                log.warning(f"the reader thread is still loading a macro-batch after {READER_CLOSE_WAIT_S:g} s "
                            "(is the shards' filesystem hung?): not waiting for it")
            self._reader = None
