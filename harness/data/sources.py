"""Find and load a dataset directory: IDX files (gzip or raw) or CSV files.

A source directory holds a train and a test split, named as in the original
MNIST distribution (`train-images-idx3-ubyte[.gz]`, `t10k-labels-idx1-ubyte`,
also with a dot: `train-images.idx3-ubyte`) or as the common CSV layout
(`mnist_train.csv` / `train.csv` and the matching test file).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from harness.data.csv_source import read_csv
from harness.data.idx import idx_dims, iter_idx, read_idx
from harness.errors import HarnessError
from harness.validation import existing_directory

IMAGE_SHAPE = (28, 28)
NUM_CLASSES = 10
SPLIT_PREFIXES = {"train": ("train",), "test": ("t10k", "test")}


@dataclass
class Split:
    images: np.ndarray  # uint8 [n, 28, 28]
    labels: np.ndarray  # uint8 [n]

    def __len__(self) -> int:
        return len(self.labels)

    def chunks(self, rows: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for first in range(0, len(self.labels), rows):
            yield self.images[first : first + rows], self.labels[first : first + rows]


@dataclass
class StreamedSplit:
    """A split whose IDX files are read as it is packed, `rows` images at a time, so
    packing holds one chunk in memory whatever the split's size."""

    images_file: Path
    labels_file: Path
    count: int

    def __len__(self) -> int:
        return self.count

    def chunks(self, rows: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        first = 0
        for images, labels in zip(iter_idx(self.images_file, 3, rows), iter_idx(self.labels_file, 1, rows), strict=True):
            check_labels(labels, first, self.labels_file)
            yield images, labels
            first += len(labels)


@dataclass
class Dataset:
    name: str
    kind: str  # "idx" or "csv"
    splits: dict[str, Split | StreamedSplit]
    # file name -> {"sha256", "bytes"}: recorded in the manifest so a pack says what it came from
    files: dict[str, dict] = field(default_factory=dict)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _find_one(directory: Path, patterns: list[str]) -> Path | None:
    found = sorted({p for pattern in patterns for p in directory.glob(pattern) if p.is_file()})
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise HarnessError(f"{directory}: ambiguous source, several files match ({names}); keep one")
    return found[0] if found else None


def _idx_paths(directory: Path, split: str) -> tuple[Path, Path] | None:
    def patterns(kind: str, ndim: int) -> list[str]:
        return [f"{prefix}-{kind}[-.]idx{ndim}-ubyte{ext}" for prefix in SPLIT_PREFIXES[split] for ext in ("", ".gz")]

    images = _find_one(directory, patterns("images", 3))
    labels = _find_one(directory, patterns("labels", 1))
    if images is None and labels is None:
        return None
    if images is None or labels is None:
        missing = "images" if images is None else "labels"
        raise HarnessError(f"{directory}: found the {split} {'labels' if images is None else 'images'} but no {split} {missing} IDX file")
    return images, labels


def _csv_path(directory: Path, split: str) -> Path | None:
    return _find_one(directory, [f"{p}{prefix}.csv" for prefix in SPLIT_PREFIXES[split] for p in ("", "mnist_")])


def check_split(images: np.ndarray, labels: np.ndarray, images_file: Path, labels_file: Path) -> Split:
    if images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE:
        raise HarnessError(f"{images_file}: images are {'x'.join(map(str, images.shape[1:]))}; expected 28x28")
    if len(images) != len(labels):
        raise HarnessError(
            f"{images_file}: holds {len(images)} images but {labels_file.name} holds {len(labels)} labels"
        )
    if len(labels) == 0:
        raise HarnessError(f"{labels_file}: holds no samples")
    check_labels(labels, 0, labels_file)
    return Split(np.ascontiguousarray(images, dtype=np.uint8), labels.astype(np.uint8))


def check_labels(labels: np.ndarray, first: int, labels_file: Path) -> None:
    """Every label a class number; `first`: the index of labels[0] in the file."""
    bad = np.flatnonzero(labels >= NUM_CLASSES) if labels.dtype == np.uint8 else np.flatnonzero((labels < 0) | (labels >= NUM_CLASSES))
    if bad.size:
        raise HarnessError(
            f"{labels_file}: label {int(labels[bad[0]])} at index {first + int(bad[0])} is outside 0..{NUM_CLASSES - 1}"
        )


def streamed_idx_split(images_file: Path, labels_file: Path) -> StreamedSplit:
    """An IDX split checked from its headers; its data is checked as it is read."""
    image_dims, label_dims = idx_dims(images_file, 3), idx_dims(labels_file, 1)
    if image_dims[1:] != IMAGE_SHAPE:
        raise HarnessError(f"{images_file}: images are {'x'.join(map(str, image_dims[1:]))}; expected 28x28")
    if image_dims[0] != label_dims[0]:
        raise HarnessError(f"{images_file}: holds {image_dims[0]} images but {labels_file.name} holds {label_dims[0]} labels")
    if label_dims[0] == 0:
        raise HarnessError(f"{labels_file}: holds no samples")
    return StreamedSplit(images_file, labels_file, label_dims[0])


def load_source(directory: Path, name: str | None = None, stream: bool = False) -> Dataset:
    """Load both splits of a source directory, validating everything. `stream`: IDX
    splits are read only when their chunks are asked for (StreamedSplit), for packing in
    bounded memory; CSV files are read whole either way."""
    directory = existing_directory(Path(directory), "source directory", "--source names the directory that holds the IDX or CSV files")
    splits, files = {}, {}
    kinds = set()
    for split in ("train", "test"):
        idx = _idx_paths(directory, split)
        csv = _csv_path(directory, split)
        if idx and csv:
            raise HarnessError(f"{directory}: holds both IDX and CSV files for the {split} split; keep one")
        if idx:
            images_file, labels_file = idx
            used = [images_file, labels_file]
            kinds.add("idx")
            if stream:
                splits[split] = streamed_idx_split(images_file, labels_file)
            else:
                splits[split] = check_split(read_idx(images_file, 3), read_idx(labels_file, 1), images_file, labels_file)
        elif csv:
            pixels, labels = read_csv(csv, IMAGE_SHAPE[0] * IMAGE_SHAPE[1])
            splits[split] = check_split(pixels.reshape(-1, *IMAGE_SHAPE), labels, csv, csv)
            used = [csv]
            kinds.add("csv")
        else:
            raise HarnessError(
                f"{directory}: no {split} split found (expected IDX files such as "
                f"{SPLIT_PREFIXES[split][0]}-images-idx3-ubyte.gz or a CSV such as mnist_{split}.csv)"
            )
        for path in used:
            files[path.name] = {"sha256": sha256_of(path), "bytes": path.stat().st_size}
    return Dataset(name or directory.resolve().name, "+".join(sorted(kinds)), splits, files)
