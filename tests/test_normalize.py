"""Inputs and losses: every normalisation mode and both losses against their definitions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from harness.data.pack import pixel_statistics
from harness.normalize import Normalizer, make_loss

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """A stand-in training set: uint8 images with a bright centre, like digits."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 60, (500, 28, 28))
    x[:, 8:20, 8:20] += rng.integers(100, 196, (500, 12, 12))
    return torch.from_numpy(x.astype(np.uint8))


@pytest.fixture(scope="module")
def stats(images) -> dict:
    return pixel_statistics(images.numpy())  # what `harness pack` writes into the manifest


def test_inputs_are_float_with_a_channel_axis(images, stats):
    for mode in ("standardize", "unit", "unit_minus_pixel_mean", "raw"):
        x = Normalizer(mode, stats, CPU)(images[:7])
        assert x.dtype == torch.float32 and x.shape == (7, 1, 28, 28), mode


def test_raw_is_the_pixel_values(images, stats):
    x = Normalizer("raw", stats, CPU)(images)
    assert torch.equal(x[:, 0], images.float())
    assert x.max() == images.max().float() and x.min() == images.min().float()


def test_unit_is_pixels_over_255(images, stats):
    assert torch.allclose(Normalizer("unit", stats, CPU)(images)[:, 0], images.float() / 255, atol=1e-7)


def test_standardize_gives_the_training_set_zero_mean_unit_std(images, stats):
    x = Normalizer("standardize", stats, CPU)(images).double()
    expected = (images.double() / 255 - stats["mean"]) / stats["std"]
    # float32 against float64 arithmetic on values up to ~3: 1e-5 is ~50 float32 ulps. The
    # mean and std: rounding, with wide headroom; the test set's statistics instead of the
    # training set's would move the mean by 6e-3.
    assert torch.allclose(x[:, 0], expected, atol=1e-5)
    assert abs(x.mean().item()) < 1e-5 and abs(x.std().item() - 1) < 1e-3


def test_unit_minus_pixel_mean_centres_every_pixel(images, stats):
    x = Normalizer("unit_minus_pixel_mean", stats, CPU)(images).double()
    assert torch.allclose(x[:, 0], images.double() / 255 - images.double().mean(0) / 255, atol=1e-6)  # float32 on values in [-1, 1]
    assert x.mean(0).abs().max().item() < 1e-6


def test_cross_entropy_is_softmax_cross_entropy():
    outputs, labels = torch.randn(16, 10, generator=torch.Generator().manual_seed(1)), torch.arange(16) % 10
    expected = -torch.log_softmax(outputs, 1)[torch.arange(16), labels].mean()
    assert torch.allclose(make_loss("cross_entropy")(outputs, labels), expected)


def test_mse_is_the_mean_squared_error_against_one_hot_targets():
    outputs, labels = torch.randn(16, 10, generator=torch.Generator().manual_seed(2)), torch.arange(16) % 10
    one_hot = torch.zeros(16, 10)
    one_hot[torch.arange(16), labels] = 1
    expected = ((outputs - one_hot) ** 2).mean()  # the mean over samples and the 10 outputs
    assert torch.allclose(make_loss("mse")(outputs, labels), expected)
    outputs.requires_grad_(True)
    make_loss("mse")(outputs, labels).backward()
    assert torch.allclose(outputs.grad, 2 * (outputs.detach() - one_hot) / outputs.numel())


def test_unknown_modes_are_refused(stats):
    with pytest.raises(ValueError, match="zscore"):
        Normalizer("zscore", stats, CPU)
    with pytest.raises(ValueError, match="hinge"):
        make_loss("hinge")
