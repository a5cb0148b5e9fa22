"""A picture of a handwritten digit → a 28x28 MNIST-style image.

MNIST was made by scaling each digit, aspect ratio kept, to fit a 20x20 box (with
anti-aliasing, hence the grey levels), then placing it in a 28x28 field so that its
centre of mass is at the centre: light ink (255) on a dark (0) background. Pictures
of any size, colour or greyscale, dark ink on light paper or light on dark, go
through the same steps here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from harness.errors import HarnessError

FIELD, BOX = 28, 20
NOISE_FLOOR = 0.2  # ink below this fraction of the strongest is paper texture, shadow or JPEG noise


def read_image(path: Path) -> Image.Image:
    """Decode an image file (PNG, JPEG or any format Pillow reads); one clear error otherwise."""
    try:
        with Image.open(path) as image:
            image.load()
            return ImageOps.exif_transpose(image)  # phone photos store their rotation in EXIF
    except FileNotFoundError:
        raise HarnessError(f"{path}: file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise HarnessError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None


def ink_of(image: Image.Image) -> np.ndarray:
    """Ink strength per pixel in [0, 1], whatever the polarity. A picture with transparency
    (a drawing app's canvas) has its strokes in the alpha channel; otherwise the paper is the
    grey level most common along the border, and ink is how far a pixel is from it."""
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        alpha = np.asarray(image.convert("RGBA"), dtype=np.float64)[..., 3] / 255.0
        if alpha.min() < 1.0:
            return alpha
    grey = np.asarray(image.convert("L"), dtype=np.float64) / 255.0
    border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
    paper = float(np.median(border))
    return np.clip(paper - grey if paper > 0.5 else grey - paper, 0.0, None)


def fit_box(ink: np.ndarray) -> np.ndarray:
    """Crop to the ink's bounding box and scale, aspect ratio kept, so the longer side is 20 pixels."""
    rows, columns = np.nonzero(ink.any(axis=1))[0], np.nonzero(ink.any(axis=0))[0]
    crop = ink[rows[0] : rows[-1] + 1, columns[0] : columns[-1] + 1]
    scale = BOX / max(crop.shape)
    size = (max(1, round(crop.shape[1] * scale)), max(1, round(crop.shape[0] * scale)))
    # Area averaging when shrinking is the anti-aliasing that gave MNIST its grey edges.
    resample = Image.Resampling.BOX if scale < 1 else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(crop.astype(np.float32)).resize(size, resample), dtype=np.float64)


def centre_by_mass(digit: np.ndarray) -> np.ndarray:
    """Place the digit in the 28x28 field with its centre of mass at (14, 14), as in MNIST
    (whose test digits' centres of mass average 14.0 in pixel-index coordinates)."""
    rows, columns = np.indices(digit.shape)
    mass = digit.sum()
    top = round(FIELD / 2 - (rows * digit).sum() / mass)
    left = round(FIELD / 2 - (columns * digit).sum() / mass)
    field = np.zeros((FIELD, FIELD))
    # A lopsided digit may reach past the field's edge: clip it there.
    r0, c0 = max(top, 0), max(left, 0)
    r1, c1 = min(top + digit.shape[0], FIELD), min(left + digit.shape[1], FIELD)
    field[r0:r1, c0:c1] = digit[r0 - top : r1 - top, c0 - left : c1 - left]
    return field


def mnist_style(image: Image.Image, name: str = "image") -> np.ndarray:
    """uint8 [28, 28]: the picture's digit as MNIST would hold it."""
    ink = ink_of(image)
    if ink.max() < 0.05:
        raise HarnessError(f"{name}: no digit found (the picture is blank: every pixel is within 5% of the background)")
    ink = np.clip((ink / ink.max() - NOISE_FLOOR) / (1 - NOISE_FLOOR), 0.0, 1.0)
    field = centre_by_mass(fit_box(ink))
    return np.round(255 * np.clip(field / field.max(), 0.0, 1.0)).astype(np.uint8)


def load_digit(path: Path) -> np.ndarray:
    """An image file's digit as a uint8 [28, 28] MNIST-style image."""
    return mnist_style(read_image(Path(path)), str(path))
