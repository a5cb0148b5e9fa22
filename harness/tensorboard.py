"""TensorBoard output of rank 0: scalars, weight images, and the report's pictures.

Event files go directly into the run directory, so `tensorboard --logdir runs/`
lists one run per directory. torchvision is not a dependency, so the image
grids are tiled here.
"""

from __future__ import annotations

import math
import threading

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter

from harness.models import first_layer_weights


def tile_grid(weights: np.ndarray, upscale: int = 1, pad: int = 1) -> np.ndarray:
    """[n, c, h, w] filters → one grey [1, H, W] float32 image in [0, 1], each filter scaled
    on its own, with `pad` pixels of 0 around every tile.

    Multi-channel filters become one row per output filter, one column per input channel.
    Numpy only, so that it runs on rank 0's background writer; no loop over tiles."""
    n, c, h, w = weights.shape
    tiles = weights.astype(np.float32).reshape(n * c, h, w)
    low, high = tiles.min(axis=(1, 2), keepdims=True), tiles.max(axis=(1, 2), keepdims=True)
    tiles = (tiles - low) / np.maximum(high - low, np.float32(1e-12))
    if upscale > 1:
        tiles = tiles.repeat(upscale, axis=1).repeat(upscale, axis=2)
        h, w = h * upscale, w * upscale
    columns = c if c > 1 else math.ceil(math.sqrt(n))
    rows = math.ceil(n * c / columns)
    # Each tile padded below and to the right (and blank tiles to fill the last row), laid
    # out row by row; then one more pad above and to the left of the whole grid.
    tiles = np.pad(tiles, ((0, rows * columns - n * c), (0, pad), (0, pad)))
    grid = tiles.reshape(rows, columns, h + pad, w + pad).transpose(0, 2, 1, 3).reshape(rows * (h + pad), columns * (w + pad))
    return np.pad(grid, ((pad, 0), (pad, 0)))[np.newaxis]


# TensorBoard tags of the pictures harness.report draws at the end of a run.
PICTURE_TAGS = {"training_curves": "report/training_curves", "filters": "report/filters", "confusion_matrix": "test/confusion_matrix"}


# Events a stalled disk may hold up before an add_* call waits for it. SummaryWriter's
# own writer thread writes them; its queue, 10 by default, is what the training thread
# waits on once it is full. Rank 0 logs the train scalars at sync points outside
# main_only, while the other ranks wait in the next all-reduce, bounded by --timeout: so
# the queue holds more than a --timeout of a stall's events. The `lenet` preset on an
# H200 reaches a sync point every 100 steps of 0.22 ms, 3 scalars each: 139 events a
# second, 42,000 in the default --timeout's 300 s. A queued scalar event takes 84 bytes
# (tracemalloc, tensorboard 2.21): 8.4 MB at most.
EVENTS_QUEUED = 100_000


class TensorBoardLog:
    def __init__(self, run_dir, purge_step: int):
        """`purge_step`: TensorBoard hides the events of earlier files in the directory at
        this step and after (0: all of them). The event file is created with the first
        event, so a process that logs nothing (a rerun of a finished run) adds none."""
        self.run_dir, self.purge_step = run_dir, purge_step
        self._writer: SummaryWriter | None = None
        self._lock = threading.Lock()  # the background writer logs weight images too

    @property
    def writer(self) -> SummaryWriter:
        with self._lock:
            if self._writer is None:
                # Creating the writer writes the event file's first record and flushes it.
                self._writer = SummaryWriter(log_dir=str(self.run_dir), purge_step=self.purge_step, max_queue=EVENTS_QUEUED)
            return self._writer

    def open(self) -> None:
        """Create the event file now (see Trainer.fit), not at the first event."""
        self.writer

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def weight_images(self, weights: list[tuple[str, np.ndarray]], step: int) -> None:
        """`weight_snapshot`'s weights as tiled grey images. No torch work, so it can run on
        rank 0's background writer."""
        for name, layer in weights:
            upscale = max(1, 24 // layer.shape[-1])  # 3x3 and 4x4 kernels are too small to see
            # x255, truncated: what add_image would make of the [0, 1] floats.
            self.writer.add_image(f"weights/{name}", np.clip(tile_grid(layer, upscale) * 255, 0, 255).astype(np.uint8), step)

    def pictures(self, pictures: dict[str, np.ndarray], step: int) -> None:
        """The report's rendered figures (uint8 RGB [H, W, 3]), e.g. the labelled confusion matrix."""
        for name, pixels in pictures.items():
            self.writer.add_image(PICTURE_TAGS[name], pixels, step, dataformats="HWC")

    def class_report(self, report: str, step: int) -> None:
        self.writer.add_text("test/class_report", "    " + report.replace("\n", "\n    "), step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def weight_snapshot(model: torch.nn.Module) -> list[tuple[str, np.ndarray]]:
    """The first layers' weights (LeNet: 33 KB), copied on the training thread, which goes on
    changing them; tiling them into images and encoding those is left to the background
    writer (`TensorBoardLog.weight_images`). With the tiling on the training thread, an
    epoch end's outputs (RunOutputs.epoch) took 4.4-12.4 ms there on a 2-core Xeon; with
    only this copy, 0.8-1.3 ms."""
    return [(name, weights.detach().to("cpu", torch.float32, copy=True).numpy()) for name, weights in first_layer_weights(model.state_dict())]
