"""A picture of a handwritten digit → a 28x28 MNIST-style image.

MNIST was made by scaling each digit, aspect ratio kept, to fit a 20x20 box (with
anti-aliasing, hence the grey levels), then placing it in a 28x28 field so that its
centre of mass is at the centre: light ink (255) on a dark (0) background. Pictures
of any size, colour or greyscale, dark ink on light paper or light on dark, go
through the same steps here.

The steps work on one 8-bit band: the alpha channel of a picture with transparency, else
its grey levels (16-bit, 32-bit and float greys are scaled to 0..255 first: see `greys`).
A picture longer than MAX_SIDE pixels is box-averaged down to that size (a big JPEG is
decoded smaller to begin with) before anything is expanded to floats, so what a file can
make this take is what Pillow needs to decode it, at most 4 bytes a pixel up to Pillow's
decompression-bomb limit (~179 MP), plus at most 5 bytes a pixel to take the band out.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from harness.errors import HarnessError
from harness.validation import one_line, open_regular_file

FIELD, BOX = 28, 20
NOISE_FLOOR = 0.2  # ink below this fraction of the strongest is paper texture, shadow or JPEG noise
# The digit ends up at most 20 pixels on its long side (BOX). Reduced to 2048 pixels on its long
# side, a picture whose digit spans even 1/100 of it still gives that digit 20 pixels, so the
# reduction loses nothing the 20x20 box keeps; the work after it is at most 2048x2048 = 4.2 MP
# (34 MB a float64 array) whatever the picture's size.
MAX_SIDE = 2048

# Formats Pillow opens that predict does not: it renders an EPS file by running
# Ghostscript on the file's PostScript, which is code from the file.
NOT_READ = {"EPS": "Pillow renders it by running Ghostscript on the file's PostScript, which is code from the file"}
EPS_STARTS = (b"%!PS", b"\xc5\xd0\xd3\xc6")  # PostScript text, and the DOS EPS binary header


def read_image(path: Path) -> Image.Image:
    """Decode an image file (PNG, JPEG or any format Pillow reads, EPS aside); one clear error otherwise."""
    try:
        file = open_regular_file(path)  # open() of a FIFO would wait for a writer for ever
    except FileNotFoundError:
        raise HarnessError(f"{path}: file not found") from None
    except OSError as e:
        raise HarnessError(f"{path}: cannot be read ({e.strerror})") from None  # "not a regular file": a FIFO, a directory
    try:
        with file, warnings.catch_warnings():
            # Pillow warns past half its pixel limit (89 MP: a 108 MP phone photo); the size is
            # handled below (a JPEG decodes smaller), and a warning is not a line of our output.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            # Pillow's EXIF (TIFF tag) parser warns and skips a tag whose data lies past the
            # file's end, the orientation's too (a JPEG's EXIF is parsed as it opens): the
            # picture would be read as it lies, perhaps on its side, with the warning printed
            # beside its prediction. Such a file is damaged: an error, below.
            warnings.filterwarnings("error", module=r"PIL\.TiffImagePlugin")
            Image.init()  # its plugins, so that OPEN lists what this Pillow build opens
            with Image.open(file, formats=[f for f in Image.OPEN if f not in NOT_READ]) as image:
                if max(image.size) > MAX_SIDE:
                    image.draft(None, (MAX_SIDE, MAX_SIDE))  # a big JPEG decodes at 1/2, 1/4 or 1/8 scale
                image.load()
                check_grey_conversion(image, path)
                transpose_by_exif(image, path)
                return image
    except MemoryError:
        raise HarnessError(f"{path}: not enough memory to decode the image") from None
    except UserWarning as e:  # only the EXIF parser's are raised
        raise exif_damaged(path, one_line(e)) from None
    except UnidentifiedImageError:  # Pillow's message names the open file by its descriptor, "name=3"
        if file_starts_with(path, EPS_STARTS):
            raise HarnessError(f"{path}: an EPS file, which predict does not read ({NOT_READ['EPS']})") from None
        raise HarnessError(f"{path}: not a readable image (Pillow recognises no image format in it)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise HarnessError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None


def file_starts_with(path: Path, starts: tuple[bytes, ...]) -> bool:
    try:
        with open_regular_file(path) as file:
            return file.read(max(map(len, starts))).startswith(starts)
    except OSError:
        return False


def check_grey_conversion(image: Image.Image, path: Path) -> None:
    """Refuse a picture whose mode Pillow opens but cannot convert as `ink_band` and `greys`
    do (LAB, La), here, where the file can be named. Tried on a 1x1 picture of the mode: no
    copy of the picture itself."""
    probe = Image.new(image.mode, (1, 1))
    try:
        probe.convert("L")
        if "transparency" in image.info:
            probe.convert("RGBA")
    except ValueError as e:
        raise HarnessError(f"{path}: a {image.mode} picture, which cannot be converted to grey levels ({e})") from None


def transpose_by_exif(image: Image.Image, path: Path) -> None:
    """Turn the picture upright as its EXIF orientation says (phone photos store their
    rotation there); in place: no copy of a picture without one."""
    try:
        ImageOps.exif_transpose(image, in_place=True)
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 (Pillow's EXIF parser on untrusted bytes: struct.error, KeyError, TypeError...)
        raise exif_damaged(path, one_line(e) or type(e).__name__) from None


def exif_damaged(path: Path, reason: str) -> HarnessError:
    return HarnessError(f"{path}: damaged EXIF data ({reason}); save the picture without it")


def shrink(image: Image.Image) -> Image.Image:
    """Box-average (Pillow's reduce) by the least integer factor that brings the long side
    to MAX_SIDE pixels or fewer; a picture already that small is returned as it is."""
    factor = -(-max(image.size) // MAX_SIDE)
    if factor == 1:
        return image
    if image.mode.startswith("I;16"):  # reduce refuses 16-bit; resize's box filter is the same average
        return image.resize((-(-image.width // factor), -(-image.height // factor)), Image.Resampling.BOX)
    return image.reduce(factor)


class NonFinitePixels(ValueError):
    """A floating-point picture holds NaN or infinite values (Pillow's extrema skip NaN)."""


def greys(image: Image.Image) -> Image.Image:
    """The picture's grey levels as an 8-bit (L) image, shrunk. Pillow's convert("L") clips
    deeper greys at 255, so those are scaled here, by the full range their values follow so
    that such a picture is exactly as light or dark as its 8-bit version: 0..65535 for 16-bit
    (I;16), and for 32-bit integers (I) within it (Pillow's mode for 16-bit PGM); 0..1 for
    floats (F) within it. 8-bit levels v8 come back exactly (round(v / 257) of v = 257 * v8,
    even with noise of up to 128 added; round(255 * v) of v = v8 / 255). Values outside those
    ranges follow none, so they are scaled by the picture's own darkest..lightest; that
    re-quantises them, which can change the digit as any other re-quantisation (a JPEG) can.
    A uniform picture stays blank."""
    if image.mode.startswith("I;16"):
        low, high = 0, 65535
    elif image.mode in ("I", "F"):
        low, high = image.getextrema()
        full = 1 if image.mode == "F" else 65535
        if low >= 0 and high <= full:
            low, high = 0, full
    else:
        return shrink(image.convert("L"))
    levels = np.asarray(shrink(image), dtype=np.float64)
    if not np.isfinite(levels).all():  # a box average with a NaN or infinite pixel in it is one too
        raise NonFinitePixels
    scale = 255 / (high - low) if high > low else 0.0
    return Image.fromarray(np.round((levels - low) * scale).astype(np.uint8), "L")


def ink_band(image: Image.Image) -> tuple[Image.Image, bool]:
    """The 8-bit band that holds the ink, shrunk, and whether it is the alpha channel: a
    picture with transparency (a drawing app's canvas) has its strokes there, unless it is
    opaque throughout; otherwise the grey levels."""
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        alpha = image.getchannel("A") if image.mode in ("RGBA", "LA", "PA") else image.convert("RGBA").getchannel("A")
        if alpha.getextrema()[0] < 255:
            return shrink(alpha), True
    return greys(image), False


def ink_of(image: Image.Image) -> np.ndarray:
    """Ink strength per pixel in [0, 1], whatever the polarity: the alpha channel of a
    picture with transparency; otherwise the paper is the grey level most common along the
    border, and ink is how far a pixel is from it. Float64, as always: float32 changed the
    result of up to 6% of ordinary test pictures (by up to 25 grey levels for a JPEG), and the
    band is at most MAX_SIDE x MAX_SIDE, so float64 costs at most 17 MB more an array."""
    band, is_alpha = ink_band(image)
    levels = np.asarray(band, dtype=np.float64)
    levels /= 255.0
    if is_alpha:
        return levels
    border = np.concatenate([levels[0], levels[-1], levels[:, 0], levels[:, -1]])
    paper = float(np.median(border))
    ink = np.subtract(paper, levels, out=levels) if paper > 0.5 else np.subtract(levels, paper, out=levels)
    return np.clip(ink, 0.0, None, out=ink)


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
    try:
        return _mnist_style(image, name)
    except MemoryError:
        raise HarnessError(f"{name}: not enough memory to convert the {image.width}x{image.height} picture") from None
    except NonFinitePixels:
        raise HarnessError(f"{name}: a floating-point picture holding NaN or infinite values, which are no grey level") from None


def _mnist_style(image: Image.Image, name: str) -> np.ndarray:
    ink = ink_of(image)
    if ink.max() < 0.05:
        raise HarnessError(f"{name}: no digit found (the picture is blank: every pixel is within 5% of the background)")
    ink = np.clip((ink / ink.max() - NOISE_FLOOR) / (1 - NOISE_FLOOR), 0.0, 1.0)
    field = centre_by_mass(fit_box(ink))
    return np.round(255 * np.clip(field / field.max(), 0.0, 1.0)).astype(np.uint8)


def load_digit(path: Path) -> np.ndarray:
    """An image file's digit as a uint8 [28, 28] MNIST-style image."""
    return mnist_style(read_image(Path(path)), str(path))
