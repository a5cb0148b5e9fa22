"""Random affine augmentation on the training device: rotation, scale and shift per image.

The parameters of every image of a macro-batch are drawn at once from a generator seeded
with (seed, epoch, macro-batch), in the order of the macro-batch's global batches, and
each rank takes the rows of its own slice. So, like the image order, they do not depend
on the world size, and a resumed run draws the same ones again: no hidden RNG state.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from harness.data.stream import seeded_generator

AUGMENT_KEY = 0xA7  # a fourth key element: a stream of its own, apart from the data order's


class RandomAffine:
    def __init__(self, rotate_degrees: float, scale: float, shift_pixels: float, seed: int, device: torch.device, size: int = 28):
        self.rotate, self.scale, self.shift = math.radians(rotate_degrees), scale, 2.0 * shift_pixels / size  # shift in grid units
        self.seed, self.device = seed, device

    @property
    def active(self) -> bool:
        return bool(self.rotate or self.scale or self.shift)

    def draw(self, epoch: int, macro_index: int, images: int) -> torch.Tensor:
        """[images, 4] (angle, scale, dx, dy) for each position of the macro-batch's order."""
        rng = seeded_generator(self.seed, epoch, macro_index, AUGMENT_KEY)
        uniform = torch.from_numpy(rng.uniform(-1.0, 1.0, size=(images, 4)).astype("float32"))
        params = uniform * torch.tensor([self.rotate, self.scale, self.shift, self.shift])
        params[:, 1] += 1.0
        return params.to(self.device, non_blocking=True)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """Warp normalised images [b, 1, h, w]. Pixels from outside the frame repeat the border,
        which in MNIST is background, so this is right for every normalisation."""
        angle, scale, dx, dy = params.to(x.dtype).unbind(1)
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale  # the grid maps output to input: the inverse map
        theta = torch.stack([torch.stack([cos, -sin, dx], 1), torch.stack([sin, cos, dy], 1)], 1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
