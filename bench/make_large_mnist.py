#!/usr/bin/env python
"""A large MNIST-like source directory, made locally: MNIST's training images shifted.

    MNIST_DIR=../shared/mnist python bench/make_large_mnist.py --images 600000 OUT_DIR

The training split is MNIST's 60,000 images repeated with deterministic shifts (copy k
moves every digit by the k-th of the 48 non-zero (dx, dy) in -3..3 x -3..3, filling with
background; copy 0 is MNIST itself), so up to 2,940,000 images of real handwriting,
labels unchanged. The test split is MNIST's own. Written as raw IDX, one copy at a time:
memory holds MNIST plus one shifted copy, whatever --images is.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
from common import mnist_dir

from harness.data.sources import load_source

SHIFTS = [(0, 0)] + [s for s in itertools.product(range(-3, 4), repeat=2) if s != (0, 0)]


def shifted(images: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Every image moved by (dy, dx) pixels; what moves in is background (0)."""
    out = np.zeros_like(images)
    h, w = images.shape[1:]
    out[:, max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = images[:, max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)]
    return out


def idx_header(shape: tuple[int, ...]) -> bytes:
    return bytes([0, 0, 0x08, len(shape)]) + b"".join(d.to_bytes(4, "big") for d in shape)


def make(out: Path, count: int) -> dict:
    mnist = load_source(mnist_dir())
    train, test = mnist.splits["train"], mnist.splits["test"]
    if count > len(train) * len(SHIFTS):
        sys.exit(f"error: --images {count}: at most {len(train) * len(SHIFTS)} ({len(SHIFTS)} shifts of MNIST's training set)")
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "train-images-idx3-ubyte", "wb") as images_file, open(out / "train-labels-idx1-ubyte", "wb") as labels_file:
        images_file.write(idx_header((count, 28, 28)))
        labels_file.write(idx_header((count,)))
        for copy, first in enumerate(range(0, count, len(train))):
            n = min(len(train), count - first)
            images_file.write(shifted(train.images[:n], *SHIFTS[copy]).tobytes())
            labels_file.write(train.labels[:n].tobytes())
    (out / "t10k-images-idx3-ubyte").write_bytes(idx_header(test.images.shape) + test.images.tobytes())
    (out / "t10k-labels-idx1-ubyte").write_bytes(idx_header(test.labels.shape) + test.labels.tobytes())
    return {"train_images": count, "train_bytes": (out / "train-images-idx3-ubyte").stat().st_size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--images", type=int, default=600_000)
    args = parser.parse_args()
    started = time.perf_counter()
    record = make(args.out, args.images)
    print(json.dumps({**record, "seconds": round(time.perf_counter() - started, 1)}))


if __name__ == "__main__":
    main()
