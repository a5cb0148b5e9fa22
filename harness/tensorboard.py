"""TensorBoard output of rank 0: scalars, weight images, and the report's pictures.

Event files go directly into the run directory, so `tensorboard --logdir runs/`
lists one run per directory. torchvision is not a dependency, so the image
grids are tiled here.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter

from harness.models import first_layer_weights


def tile_grid(weights: torch.Tensor, upscale: int = 1, pad: int = 1) -> torch.Tensor:
    """[n, c, h, w] filters → one grey [1, H, W] image in [0, 1], each filter scaled on its own.

    Multi-channel filters become one row per output filter, one column per input channel.
    """
    n, c, h, w = weights.shape
    tiles = weights.float().cpu().reshape(n * c, h, w)
    low = tiles.amin(dim=(1, 2), keepdim=True)
    high = tiles.amax(dim=(1, 2), keepdim=True)
    tiles = (tiles - low) / (high - low).clamp_min(1e-12)
    if upscale > 1:
        tiles = tiles.repeat_interleave(upscale, 1).repeat_interleave(upscale, 2)
        h, w = h * upscale, w * upscale
    columns = c if c > 1 else math.ceil(math.sqrt(n))
    rows = math.ceil(n * c / columns)
    grid = torch.zeros(rows * (h + pad) + pad, columns * (w + pad) + pad)
    for i, tile in enumerate(tiles):
        r, col = divmod(i, columns)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + col * (w + pad) : pad + col * (w + pad) + w] = tile
    return grid.unsqueeze(0)


# TensorBoard tags of the pictures harness.report draws at the end of a run.
PICTURE_TAGS = {"training_curves": "report/training_curves", "filters": "report/filters", "confusion_matrix": "val/confusion_matrix"}


class TensorBoardLog:
    def __init__(self, run_dir, purge_step: int = 0):
        self.writer = SummaryWriter(log_dir=str(run_dir), purge_step=purge_step or None)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def images(self, images: list[tuple[str, np.ndarray]], step: int) -> None:
        """Grey uint8 [1, H, W] images, as `weight_images` makes them. No torch work, so it
        can run on rank 0's background writer."""
        for tag, pixels in images:
            self.writer.add_image(tag, pixels, step)

    def pictures(self, pictures: dict[str, np.ndarray], step: int) -> None:
        """The report's rendered figures (uint8 RGB [H, W, 3]), e.g. the labelled confusion matrix."""
        for name, pixels in pictures.items():
            self.writer.add_image(PICTURE_TAGS[name], pixels, step, dataformats="HWC")

    def class_report(self, report: str, step: int) -> None:
        self.writer.add_text("val/class_report", "    " + report.replace("\n", "\n    "), step)

    def close(self) -> None:
        self.writer.close()


def weight_images(model: torch.nn.Module) -> list[tuple[str, np.ndarray]]:
    """The first layers' weights as tiled grey uint8 images, TensorBoard tag first: a
    snapshot, taken on the training thread (PNG encoding them is left to `images`)."""
    images = []
    for name, weights in first_layer_weights(model.state_dict()):
        upscale = max(1, 24 // weights.shape[-1])  # 3x3 and 4x4 kernels are too small to see
        # x255, truncated: what add_image would make of the [0, 1] floats.
        images.append((f"weights/{name}", (tile_grid(weights, upscale) * 255).clamp(0, 255).to(torch.uint8).numpy()))
    return images
