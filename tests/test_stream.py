"""MacroBatchStream: each sample at most once per epoch, seeded order, world-size independent batches, resume."""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from harness.data.pack import pack
from harness.data.sources import Dataset, Split
from harness.data.stream import MacroBatchStream, ShardSplit
from harness.errors import HarnessError

N = 2950  # shards of 800: 800/800/800/550, the last one ending in a 50-image block
CPU = torch.device("cpu")


def make_dataset(n: int, seed: int = 0) -> Dataset:
    """Random images whose first two pixels encode the sample's index; random labels."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    ids = np.arange(n)
    images[:, 0, 0], images[:, 0, 1] = ids & 0xFF, ids >> 8
    labels = rng.integers(0, 10, n, dtype=np.uint8)
    return Dataset("ids", "idx", {"train": Split(images, labels), "test": Split(images[:100].copy(), labels[:100].copy())})


def ids_of(images: torch.Tensor) -> np.ndarray:
    images = images.numpy()
    return images[:, 0, 0].astype(np.int64) | (images[:, 0, 1].astype(np.int64) << 8)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Small gathers on 2 cores: ~12 ms each with 2 intra-op threads, ~0.4 ms with 1."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, np.ndarray]:
    out = tmp_path_factory.mktemp("stream") / "shards"
    dataset = make_dataset(N)
    pack(dataset, out, shard_size=800, block_size=100)
    return out, dataset.splits["train"].labels


def batches(stream: MacroBatchStream, epoch: int, start_index: int = 0):
    """The epoch's global (or, for a stream of one rank of several, that rank's) batches as
    (ids, labels) numpy arrays, in step order."""
    out = []
    for macro in stream.epoch(epoch, start_index):
        for step in range(macro.steps):
            images, labels = macro.local_batch(step)
            out.append((ids_of(images), labels.numpy()))
    return out


def rank_streams(split: ShardSplit, global_batch: int, macro_batch: int, seed: int, world_size: int) -> list[MacroBatchStream]:
    return [MacroBatchStream(split, global_batch, macro_batch, seed=seed, device=CPU, rank=r, world_size=world_size) for r in range(world_size)]


def epoch_ids(stream: MacroBatchStream, epoch: int) -> np.ndarray:
    return np.concatenate([ids for ids, _ in batches(stream, epoch)])


# --- one epoch: each sample at most once -----------------------------------------------------------


@pytest.mark.parametrize("global_batch,macro_batch", [(64, 60000), (64, 700), (100, 100), (50, 3000)])
def test_epoch_uses_each_sample_at_most_once(data, global_batch, macro_batch):
    shards, labels = data
    stream = MacroBatchStream(ShardSplit(shards, "train"), global_batch, macro_batch, seed=0, device=CPU)
    macros = list(stream.epoch(0))
    assert len(macros) == stream.macro_batches_per_epoch
    assert sum(m.steps for m in macros) == stream.steps_per_epoch == N // global_batch
    for m in macros:
        assert len(m.order) % global_batch == 0  # macro-batches hold whole global batches (one rank: all of each)
        assert len(m.order) <= max(macro_batch, global_batch)
        assert len(set(m.order.tolist())) == len(m.order) and 0 <= m.order.min() and m.order.max() < len(m.labels)
        if stream.resident:  # the whole split stays on the device; the order indexes it
            assert len(m.labels) == N
    got = batches(stream, 0)
    assert all(len(ids) == global_batch for ids, _ in got)
    ids = np.concatenate([i for i, _ in got])
    assert len(np.unique(ids)) == len(ids)  # no sample twice
    assert ids.min() >= 0 and ids.max() < N
    assert 0 <= N - len(ids) < global_batch  # only the remainder is dropped
    np.testing.assert_array_equal(np.concatenate([lab for _, lab in got]), labels[ids])  # labels stay with their images
    if N % global_batch == 0:
        assert sorted(ids.tolist()) == list(range(N))


def test_order_is_seeded_by_seed_and_epoch(data):
    shards, _ = data
    make = lambda seed: MacroBatchStream(ShardSplit(shards, "train"), 64, 700, seed=seed, device=CPU)  # noqa: E731
    first = epoch_ids(make(0), 0)
    np.testing.assert_array_equal(first, epoch_ids(make(0), 0))  # a fresh stream: same (seed, epoch), same order
    np.testing.assert_array_equal(epoch_ids(make(0), 3), epoch_ids(make(0), 3))
    stream = make(0)
    epochs = [epoch_ids(stream, e) for e in range(3)]
    for a in range(3):
        for b in range(a + 1, 3):
            assert not np.array_equal(epochs[a], epochs[b])
            assert np.mean(epochs[a] == epochs[b]) < 0.05  # reshuffled, not just rotated or swapped
            # The blocks that make up a macro-batch (640 images at batch 64) change too, not
            # only the order within it: each epoch's macro-batches hold other images.
            assert set(epochs[a][:640]) != set(epochs[b][:640])
    assert not np.array_equal(first, epoch_ids(make(1), 0))
    # With one macro-batch for the whole set, a global batch mixes images from across it.
    whole = epoch_ids(MacroBatchStream(ShardSplit(shards, "train"), 64, 60000, seed=0, device=CPU), 0)
    assert np.ptp(whole[:64]) > N // 2


def test_one_macro_batch_split_is_read_once_and_reshuffled(data):
    """A split that fits one macro-batch stays resident: later epochs read no shard bytes,
    yet give exactly the order a fresh stream gives them."""
    shards, _ = data
    split = ShardSplit(shards, "train")
    stream = MacroBatchStream(split, 64, 60000, seed=2, device=CPU)
    first = epoch_ids(stream, 0)
    read_once = split.bytes_read
    assert N * 28 * 28 < read_once < N * 28 * 28 * 1.05  # every image once, plus headers and labels
    epochs = [first] + [epoch_ids(stream, e) for e in (1, 2)]
    assert split.bytes_read == read_once
    for e in range(3):
        fresh = MacroBatchStream(ShardSplit(shards, "train"), 64, 60000, seed=2, device=CPU)
        np.testing.assert_array_equal(epochs[e], epoch_ids(fresh, e))
    assert not np.array_equal(epochs[1], epochs[2])
    streamed = ShardSplit(shards, "train")
    streaming = MacroBatchStream(streamed, 64, 700, seed=2, device=CPU)
    epoch_ids(streaming, 0), epoch_ids(streaming, 1)
    assert streamed.bytes_read > 2 * (N // 64 * 64) * 28 * 28  # several macro-batches: images are read every epoch


@pytest.mark.parametrize("macro_batch", [60000, 700])
def test_global_batches_do_not_depend_on_world_size(data, macro_batch):
    """Each rank's stream holds only its slices; in rank order they are the 1-rank batches."""
    shards, _ = data
    whole = batches(MacroBatchStream(ShardSplit(shards, "train"), 64, macro_batch, seed=5, device=CPU), 1)
    assert all(len(labels) == 64 for _, labels in whole)
    for world_size in (2, 4):
        per_rank = [batches(stream, 1) for stream in rank_streams(ShardSplit(shards, "train"), 64, macro_batch, 5, world_size)]
        for step, (ids, labels) in enumerate(whole):
            parts = [rank_batches[step] for rank_batches in per_rank]
            assert all(len(part_labels) == 64 // world_size for _, part_labels in parts)
            np.testing.assert_array_equal(np.concatenate([part_ids for part_ids, _ in parts]), ids)
            np.testing.assert_array_equal(np.concatenate([part_labels for _, part_labels in parts]), labels)


def test_each_rank_reads_only_its_share(data):
    """Streamed macro-batches: a rank of W reads exactly its own images, 1/W of the pixels,
    plus each shard's index once (tar headers, .npy headers and labels; 2.6% here with
    blocks of 100 images, 0.3% with the default 1,000)."""
    shards, _ = data
    indexed = ShardSplit(shards, "train")
    for shard in range(indexed.num_shards):
        indexed.blocks(shard)
    index_bytes = indexed.bytes_read
    assert index_bytes < 0.03 * N * 28 * 28
    pixels = (N // 64 * 64) * 28 * 28
    for world_size in (1, 2, 4):
        splits = [ShardSplit(shards, "train") for _ in range(world_size)]
        for rank, split in enumerate(splits):
            batches(rank_streams(split, 64, 700, 5, world_size)[rank], 1)
            assert split.bytes_read - index_bytes == pixels // world_size, (world_size, rank)


def test_small_macro_batch_on_real_mnist(mnist_shards):
    """macro_batch 7000 with batch 64: nine macro-batches of whole global batches, each image at most once."""
    data = ShardSplit(mnist_shards, "train")
    source_images, source_labels = data.load_all()
    source = Counter(zip(source_labels.tolist(), map(bytes, source_images.reshape(60000, -1))))
    stream = MacroBatchStream(data, 64, 7000, seed=0, device=CPU)
    macros = list(stream.epoch(0))
    assert [len(m.labels) for m in macros] == [109 * 64] * 8 + [(937 - 8 * 109) * 64]
    used = Counter()
    for m in macros:
        for label, image in zip(m.labels.tolist(), m.images.numpy().reshape(len(m.labels), -1)):
            used[(label, bytes(image))] += 1
    assert sum(used.values()) == 937 * 64 == 59968
    assert not used - source  # every (label, image) pair used no more often than it occurs in MNIST
    assert len(source) - len(used) <= 32


@pytest.mark.parametrize("start_index", [0, 1, 3, 4])
def test_resume_from_macro_batch(data, start_index):
    shards, _ = data
    full = list(MacroBatchStream(ShardSplit(shards, "train"), 64, 700, seed=2, device=CPU).epoch(4))
    assert len(full) == 5  # 46 steps: 10+10+10+10+6
    resumed = list(MacroBatchStream(ShardSplit(shards, "train"), 64, 700, seed=2, device=CPU).epoch(4, start_index=start_index))
    assert len(resumed) == len(full) - start_index
    for a, b in zip(full[start_index:], resumed):
        assert (a.epoch, a.index) == (b.epoch, b.index)
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) and torch.equal(a.order, b.order)


# --- sample ranges (holdout) and uneven shards ------------------------------------------------------------


def test_shard_split_range_is_respected(data):
    shards, labels = data
    start, stop = 150, 2375  # inside blocks, across shard boundaries
    train = ShardSplit(shards, "train", start, stop)
    assert len(train) == stop - start
    images, got_labels = train.load_all()
    np.testing.assert_array_equal(ids_of(torch.from_numpy(images)), np.arange(start, stop))
    np.testing.assert_array_equal(got_labels, labels[start:stop])
    holdout_images, _ = ShardSplit(shards, "train", stop).load_all()
    np.testing.assert_array_equal(ids_of(torch.from_numpy(holdout_images)), np.arange(stop, N))
    for macro_batch in (60000, 500):
        stream = MacroBatchStream(train, 64, macro_batch, seed=9, device=CPU)
        ids = epoch_ids(stream, 0)
        assert len(np.unique(ids)) == len(ids) == (stop - start) // 64 * 64
        assert ids.min() >= start and ids.max() < stop  # never a holdout image
        assert ids.min() < start + 200 and ids.max() >= stop - 200  # both ends of the range are used
    # Resuming inside a range gives the same macro-batches as the full iteration.
    full = list(MacroBatchStream(train, 64, 500, seed=9, device=CPU).epoch(2))
    resumed = list(MacroBatchStream(train, 64, 500, seed=9, device=CPU).epoch(2, start_index=3))
    assert len(full) == 5 and len(resumed) == 2
    for a, b in zip(full[3:], resumed):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) and torch.equal(a.order, b.order)


def test_bad_range_and_batch(data):
    shards, _ = data
    with pytest.raises(HarnessError, match="outside the train split's 2950 samples"):
        ShardSplit(shards, "train", 0, N + 1)
    with pytest.raises(HarnessError, match="larger than the 100 training samples"):
        MacroBatchStream(ShardSplit(shards, "train", 0, 100), 128, 1000, seed=0, device=CPU)


def test_uneven_shards(data):
    shards, labels = data
    split = ShardSplit(shards, "train")
    assert split.shard_counts == [800, 800, 800, 550]
    assert [len(b.labels) for b in split.blocks(split.num_shards - 1)] == [100] * 5 + [50]
    # A batch that divides 2950: every sample exactly once per epoch, on 1 or 2 ranks.
    stream = MacroBatchStream(split, 50, 600, seed=4, device=CPU)
    for epoch in (0, 1):
        ids = epoch_ids(stream, epoch)
        assert sorted(ids.tolist()) == list(range(N))
        per_rank = [np.concatenate([i for i, _ in batches(rank_stream, epoch)]) for rank_stream in rank_streams(split, 50, 600, 4, 2)]
        assert len(per_rank[0]) == len(per_rank[1]) == N // 2  # same number of steps on every rank
        assert sorted(np.concatenate(per_rank).tolist()) == list(range(N))


@pytest.mark.parametrize("start_index", [0, 2])
def test_prefetching_reader_gives_the_same_batches(data, start_index):
    """The GPU's reader thread (forced on here, on the CPU) changes nothing in the sequence."""
    shards, _ = data
    make = lambda prefetch: MacroBatchStream(ShardSplit(shards, "train"), 64, 700, seed=4, device=CPU, prefetch=prefetch)  # noqa: E731
    with_thread, without = batches(make(True), 1, start_index=start_index), batches(make(False), 1, start_index=start_index)
    assert len(with_thread) == len(without) > 0
    for (ids_a, labels_a), (ids_b, labels_b) in zip(with_thread, without):
        np.testing.assert_array_equal(ids_a, ids_b)
        np.testing.assert_array_equal(labels_a, labels_b)


def test_resident_split_gives_the_streamed_order(data):
    """Kept on the device with an index order, the split gives the batches that assembling
    the same single macro-batch from the shards gives."""
    shards, _ = data
    resident = MacroBatchStream(ShardSplit(shards, "train"), 64, 60000, seed=6, device=CPU)
    assembled = MacroBatchStream(ShardSplit(shards, "train"), 64, 60000, seed=6, device=CPU)
    assert resident.resident
    assembled.resident = False  # the streaming path, one macro-batch of the whole split
    for epoch in (0, 1):
        np.testing.assert_array_equal(epoch_ids(resident, epoch), epoch_ids(assembled, epoch))


@pytest.mark.parametrize("macro_batch,prefetch,start_index", [(60000, False, 0), (700, False, 2), (700, True, 2)])
def test_a_prepared_macro_batch_is_the_one_its_epoch_starts_with(data, monkeypatch, macro_batch, prefetch, start_index):
    """prepare() loads the macro-batch an epoch starts with ahead of it (the Trainer does so
    before its clock starts): the epoch then loads only the others, and its batches are an
    unprepared stream's. A macro-batch prepared for another epoch or another position is
    not used, and at an epoch's end (a run resumed there) there is nothing to prepare."""
    shards, _ = data
    make = lambda: MacroBatchStream(ShardSplit(shards, "train"), 64, macro_batch, seed=3, device=CPU, prefetch=prefetch)  # noqa: E731
    unprepared = batches(make(), 1, start_index)
    stream = make()
    loads = record_loads(stream, monkeypatch)
    stream.prepare(1, start_index)
    assert len(loads) == 1
    prepared = batches(stream, 1, start_index)
    assert len(loads) == stream.macro_batches_per_epoch - start_index  # the first not again
    other_epoch, other_index = make(), make()
    other_epoch.prepare(0, start_index)
    other_index.prepare(1, 1 - start_index if stream.resident else start_index + 1)
    at_the_end = make()
    at_the_end.prepare(1, stream.macro_batches_per_epoch)
    assert at_the_end._ahead is None
    for got in (prepared, batches(other_epoch, 1, start_index), batches(other_index, 1, start_index)):
        assert_same_batches(got, unprepared)
    for used in (stream, other_epoch, other_index):
        used.close()


def record_loads(stream: MacroBatchStream, monkeypatch) -> list[tuple[str, int, int]]:
    """The list that the (thread name, epoch, index) of each macro-batch `stream` loads from
    now on is appended to."""
    loads, load = [], stream._load
    monkeypatch.setattr(stream, "_load", lambda epoch, index: loads.append((threading.current_thread().name, epoch, index)) or load(epoch, index))
    return loads


@pytest.mark.parametrize("macro_batch", [700, 60000])
def test_the_next_epoch_is_loaded_while_this_one_trains(data, monkeypatch, macro_batch):
    """With the prefetch thread, and the next epoch to follow, an epoch's first macro-batch
    (or a resident split's next order) is loaded on the reader thread during the epoch
    before: on a GPU no epoch starts with the device idle while the host reads. The
    batches are those of a stream without the thread, and only the very first load is the
    caller's."""
    shards, _ = data
    make = lambda prefetch: MacroBatchStream(ShardSplit(shards, "train"), 64, macro_batch, seed=5, device=CPU, prefetch=prefetch)  # noqa: E731
    stream = make(True)
    loads = record_loads(stream, monkeypatch)
    try:
        got = [batches_of(stream.epoch(epoch, next_epoch_follows=epoch < 2)) for epoch in range(3)]
    finally:
        stream.close()
    plain = make(False)
    for epoch in range(3):
        assert_same_batches(got[epoch], batches_of(plain.epoch(epoch)))
    per_epoch = stream.macro_batches_per_epoch
    assert [(e, i) for _, e, i in loads] == [(e, i) for e in range(3) for i in range(per_epoch)]  # each once, in order
    assert loads[0][0] == "MainThread" and all(name.startswith("harness-reader") for name, _, _ in loads[1:])
    assert not [t for t in threading.enumerate() if t.name.startswith("harness-reader")]  # close() ended it


def test_close_does_not_wait_for_ever_for_a_load_stuck_on_a_hung_filesystem(data, monkeypatch, caplog):
    """A load ahead that never ends (a shard on a hung filesystem): close() waits its bound,
    then says so and returns, so that a failed or stopped rank can end."""
    import harness.data.stream as stream_module

    shards, _ = data
    stream = MacroBatchStream(ShardSplit(shards, "train"), 64, 700, seed=5, device=CPU, prefetch=True)
    hung, release = threading.Event(), threading.Event()
    monkeypatch.setattr(stream, "_load", lambda epoch, index: hung.set() or release.wait(60))
    monkeypatch.setattr(stream_module, "READER_CLOSE_WAIT_S", 0.2)
    stream.prepare(0, 0, give_up=hung.is_set)  # returns once the load has begun (and hung)
    began = time.monotonic()
    with caplog.at_level("WARNING", logger="harness"):
        stream.close()
    assert time.monotonic() - began < 5
    assert "the reader thread is still loading a macro-batch after 0.2 s (is the shards' filesystem hung?)" in caplog.text
    release.set()


def test_a_load_that_outlasts_close_stops_before_its_device_copy(data, monkeypatch):
    """A slow read that ends after close() stopped waiting for it: its macro-batch is not
    copied to the device, so that a process ending then does not end inside that copy."""
    import harness.data.stream as stream_module

    shards, _ = data
    stream = MacroBatchStream(ShardSplit(shards, "train"), 64, 700, seed=5, device=CPU, prefetch=True)
    reading, release, copies = threading.Event(), threading.Event(), []
    assemble = stream._assemble
    monkeypatch.setattr(stream, "_assemble", lambda epoch, index: reading.set() or release.wait(60) and assemble(epoch, index))
    monkeypatch.setattr(stream, "_to_device", lambda *args: copies.append(args))
    monkeypatch.setattr(stream_module, "READER_CLOSE_WAIT_S", 0.2)
    stream.prepare(0, 0, give_up=reading.is_set)
    loading = stream._ahead[2]
    stream.close()
    release.set()
    with pytest.raises(stream_module.LoadCancelled):
        loading.result(timeout=30)
    assert copies == []


def test_a_macro_batch_loaded_ahead_but_not_asked_for_is_dropped(data, monkeypatch):
    """A load ahead that the caller does not take (training stopped early, or went on
    elsewhere) is not used: the stream loads what is asked for. A load that failed on the
    reader thread raises its error where its macro-batch is taken, and nowhere else."""
    shards, _ = data
    stream = MacroBatchStream(ShardSplit(shards, "train"), 64, 700, seed=5, device=CPU, prefetch=True)
    loads = record_loads(stream, monkeypatch)
    try:
        first = next(stream.epoch(0))  # the generator is left at macro-batch 0, macro-batch 1 loading ahead
        assert_same_batches(batches_of([first]), batches(MacroBatchStream(ShardSplit(shards, "train"), 64, 700, seed=5, device=CPU), 0)[: first.steps])
        again = batches_of(stream.epoch(1, 2))  # a resume elsewhere: epoch 1 from macro-batch 2
        assert_same_batches(again, batches(MacroBatchStream(ShardSplit(shards, "train"), 64, 700, seed=5, device=CPU), 1, 2))
        assert ("MainThread", 1, 2) in loads

        original = stream._load

        def damaged(epoch, index):
            if (epoch, index) == (2, 0):
                raise HarnessError("shard train-000001.tar: damaged")
            return original(epoch, index)

        monkeypatch.setattr(stream, "_load", damaged)
        epoch_1 = stream.epoch(1, stream.macro_batches_per_epoch - 1, next_epoch_follows=True)
        next(epoch_1)  # epoch 2's first macro-batch is now loading ahead, and fails there
        with pytest.raises(HarnessError, match="train-000001.tar: damaged"):
            next(stream.epoch(2))
    finally:
        stream.close()


def batches_of(macro_batches) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(ids_of(images), labels.numpy()) for macro in macro_batches for images, labels in map(macro.local_batch, range(macro.steps))]


def assert_same_batches(got, expected) -> None:
    assert len(got) == len(expected) > 0
    for (ids_a, labels_a), (ids_b, labels_b) in zip(got, expected):
        np.testing.assert_array_equal(ids_a, ids_b)
        np.testing.assert_array_equal(labels_a, labels_b)
