"""Turn uint8 images into model inputs on the device, and labels into loss targets."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class Normalizer:
    """uint8 [b, 28, 28] on the device → float [b, 1, 28, 28], per the config's `normalize` mode.

    The train-set statistics come from the shard manifest, so they are computed
    once at pack time and are the same on every rank.
    """

    def __init__(self, mode: str, stats: dict, device: torch.device, memory_format=torch.contiguous_format):
        self.mode, self.memory_format = mode, memory_format
        if mode == "standardize":
            # (x/255 - mean)/std written as one scale and one shift
            self.scale, self.shift = 1.0 / (255.0 * stats["std"]), stats["mean"] / stats["std"]
        elif mode == "unit":
            self.shift, self.scale = 0.0, 1.0 / 255.0
        elif mode == "raw":
            self.shift, self.scale = 0.0, 1.0
        elif mode == "unit_minus_pixel_mean":
            self.scale = 1.0 / 255.0
            self.shift = torch.tensor(stats["pixel_mean"], dtype=torch.float32, device=device).reshape(1, 1, 28, 28)
        else:
            raise ValueError(f"unknown normalize mode '{mode}'")

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.unsqueeze(1).float().mul_(self.scale)
        x = x if isinstance(self.shift, float) and self.shift == 0.0 else x.sub_(self.shift)
        return x if self.memory_format == torch.contiguous_format else x.contiguous(memory_format=self.memory_format)


# The manifest's train-set statistics each mode uses (summary.json and checkpoints keep
# them, so that `harness predict` can prepare inputs without the shards).
STATS_USED = {"standardize": ("mean", "std"), "unit_minus_pixel_mean": ("pixel_mean",), "unit": (), "raw": ()}


def stats_used(mode: str, stats: dict) -> dict:
    return {key: stats[key] for key in STATS_USED[mode]}


def make_loss(name: str, num_classes: int = 10, label_smoothing: float = 0.0):
    """cross_entropy on logits (optionally against smoothed targets), or mse of the outputs
    against one-hot targets (both batch means)."""
    if name == "cross_entropy":
        if label_smoothing:
            return lambda outputs, labels: F.cross_entropy(outputs, labels, label_smoothing=label_smoothing)
        return F.cross_entropy
    if name == "mse":
        return lambda outputs, labels: F.mse_loss(outputs, F.one_hot(labels, num_classes).to(outputs.dtype))
    raise ValueError(f"unknown loss '{name}'")
