"""harness.digit_image on pictures beyond the ordinary 8-bit ones (those are in test_results.py):
16-bit, 32-bit and float greys, a picture far larger than the digit needs, and running out of memory.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
from PIL import Image, ImageFile

from harness import digit_image
from harness.digit_image import load_digit
from harness.errors import HarnessError


@pytest.fixture(scope="module")
def digits(mnist_dir) -> np.ndarray:
    """The first 10 MNIST test digits."""
    images = gzip.decompress((mnist_dir / "t10k-images-idx3-ubyte.gz").read_bytes())
    return np.frombuffer(images, np.uint8, offset=16).reshape(-1, 28, 28)[:10]


def on_grey_paper(digit: np.ndarray) -> np.ndarray:
    """uint8 [260, 300]: the digit 8x larger, dark grey (30) on light grey paper (230), off centre."""
    strength = np.asarray(Image.fromarray(digit).resize((224, 224), Image.Resampling.BILINEAR), dtype=float) / 255
    picture = np.full((260, 300), 230.0)
    picture[20:244, 40:264] -= 200 * strength
    return np.round(picture).astype(np.uint8)


def test_deep_greys_give_the_8bit_digit(digits, tmp_path):
    """16-bit PNG, TIFF and PGM, float TIFF and 32-bit integer TIFF pictures give exactly the
    28x28 digit of their 8-bit version. 16-bit (I;16, and PGM's I) is scaled by 0..65535:
    round(v / 257) takes 257 * v8 back to v8, even with noise of up to 128 in v (a 16-bit
    scan's low byte). Float within 0..1 by 0..1. Values that follow no such range (a float
    picture of 0..4080, 32-bit integers of -7e6..-6.7e6) by their own darkest..lightest,
    which is exact here because the picture spans the whole 0..255 of its 8-bit version."""
    rng = np.random.default_rng(0)
    for i, digit in enumerate(digits):
        grey = on_grey_paper(digit)
        full_range = np.round((grey - grey.min()) * (255 / np.ptp(grey))).astype(np.uint8)
        for grey in (grey, full_range):
            Image.fromarray(grey).save(tmp_path / "8bit.png")
            expected = load_digit(tmp_path / "8bit.png")
            deep = 257 * grey.astype(np.int64)
            noisy = np.clip(deep + rng.integers(-128, 129, grey.shape), 0, 65535)
            Image.fromarray(noisy.astype(np.uint16)).save(tmp_path / "16bit.png")
            Image.fromarray(deep.astype(np.uint16)).save(tmp_path / "16bit.tif")
            Image.fromarray(deep.astype(np.uint16)).save(tmp_path / "16bit.pgm")
            Image.fromarray(grey.astype(np.float32) / 255).save(tmp_path / "float.tif")
            pictures = [("16bit.png", "I;16"), ("16bit.tif", "I;16"), ("16bit.pgm", "I"), ("float.tif", "F")]
            if grey is full_range:
                Image.fromarray(grey.astype(np.float32) * 16).save(tmp_path / "float-0-4080.tif")
                Image.fromarray((grey.astype(np.int32) * 1000 - 7_000_000), "I").save(tmp_path / "32bit.tif")
                pictures += [("float-0-4080.tif", "F"), ("32bit.tif", "I")]
            for name, mode in pictures:
                with Image.open(tmp_path / name) as image:
                    assert image.mode == mode, (name, image.mode)
                assert np.array_equal(load_digit(tmp_path / name), expected), (i, name)
    # A uniform deep picture is blank, as an 8-bit one is.
    Image.fromarray(np.full((50, 50), 40000, np.uint16)).save(tmp_path / "uniform.png")
    with pytest.raises(HarnessError, match="no digit found"):
        load_digit(tmp_path / "uniform.png")


PREPARE = """
import json, re, sys
import numpy as np
from harness.digit_image import load_digit
np.save(sys.argv[2], load_digit(sys.argv[1]))
# The peak resident memory of this program: VmHWM, not ru_maxrss, which on Linux keeps the
# peak of the (forked) test process this program replaced.
status = open("/proc/self/status").read()
print(json.dumps({"peak_mb": int(re.search(r"VmHWM:\\s*(\\d+) kB", status)[1]) / 1024}))
"""


def test_a_huge_picture_is_reduced_first(digits, tmp_path):
    """A 10000x10000 drawing with transparency (a 1 MB PNG) is prepared in a process peaking
    at 511 MB (measured; 400 MB of it is Pillow's decoded LA picture), not the 4.2 GB it took
    when it was expanded to float64 RGBA at full size, and gives exactly the digit of the same
    drawing at 2000x2000: each of its 5x5 blocks is one pixel of that, which a box average by
    5 takes back exactly."""
    canvas = np.zeros((2000, 2000, 2), np.uint8)  # black strokes, alpha = ink
    canvas[300:1700, 300:1700, 1] = np.asarray(Image.fromarray(digits[0]).resize((1400, 1400), Image.Resampling.BILINEAR))
    small = Image.fromarray(canvas, "LA")
    small.save(tmp_path / "small.png")
    small.resize((10000, 10000), Image.Resampling.NEAREST).save(tmp_path / "huge.png", compress_level=1)
    result = subprocess.run(
        [sys.executable, "-c", PREPARE, str(tmp_path / "huge.png"), str(tmp_path / "huge.npy")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    peak = json.loads(result.stdout)["peak_mb"]
    assert peak < 700, peak
    huge = np.load(tmp_path / "huge.npy")
    assert np.array_equal(huge, load_digit(tmp_path / "small.png"))
    assert huge.max() == 255


def test_out_of_memory_is_one_clear_error(digits, tmp_path, monkeypatch):
    """Running out of memory while decoding or converting a picture, or a picture past Pillow's
    decompression-bomb limit, is one HarnessError naming the file, as other bad input is."""
    path = tmp_path / "digit.png"
    Image.fromarray(255 - on_grey_paper(digits[0])).save(path)

    def no_memory(*args, **kwargs):
        raise MemoryError

    with monkeypatch.context() as patch:
        patch.setattr(ImageFile.ImageFile, "load", no_memory)
        with pytest.raises(HarnessError, match=f"^{path}: not enough memory to decode the image$"):
            load_digit(path)
    with monkeypatch.context() as patch:
        patch.setattr(digit_image, "ink_of", no_memory)
        with pytest.raises(HarnessError, match=f"^{path}: not enough memory to convert the 300x260 picture$"):
            load_digit(path)
    with monkeypatch.context() as patch:
        patch.setattr(Image, "MAX_IMAGE_PIXELS", 30_000)  # 300x260 is past twice this: an error, not a warning
        with pytest.raises(HarnessError, match=f"^{path}: not a readable image \\(DecompressionBombError: "):
            load_digit(path)
    assert load_digit(path).max() == 255  # the picture itself is fine


def test_pillows_warning_for_a_big_picture_is_not_printed(digits, tmp_path, monkeypatch, recwarn):
    """Past half Pillow's pixel limit (89 MP: a 108 MP phone photo) Pillow warns, and the
    warning with its source line came out before predict's output. The picture is read
    (its size is handled: a JPEG decodes smaller), and nothing is warned."""
    path = tmp_path / "digit.png"
    Image.fromarray(255 - on_grey_paper(digits[0])).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50_000)  # 300x260 is past this, not past twice this
    assert load_digit(path).max() == 255
    assert [str(w.message) for w in recwarn] == []


@pytest.mark.timeout(60)  # open() of the FIFO waited for a writer for ever
def test_a_fifo_or_a_directory_given_as_a_picture_is_one_error(tmp_path):
    fifo, directory = tmp_path / "fifo.png", tmp_path / "dir.png"
    os.mkfifo(fifo)
    directory.mkdir()
    for path in (fifo, directory):
        with pytest.raises(HarnessError, match=f"^{path}: cannot be read \\(not a regular file\\)$"):
            load_digit(path)


def test_an_opaque_rgba_picture_is_read_by_its_grey_levels(tmp_path):
    """A picture with an alpha channel that is opaque throughout (a screenshot) is read by
    its grey levels, as without the channel: read by its alpha, it had 'no digit'."""
    from harness.digit_image import load_digit

    canvas = np.full((100, 100, 4), 255, np.uint8)
    canvas[30:70, 45:55, :3] = 0  # a black bar (a "1") on white, alpha 255 everywhere
    Image.fromarray(canvas, "RGBA").save(tmp_path / "opaque.png")
    Image.fromarray(canvas[..., :3], "RGB").save(tmp_path / "rgb.png")
    assert np.array_equal(load_digit(tmp_path / "opaque.png"), load_digit(tmp_path / "rgb.png"))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "minus-inf"])
def test_a_float_picture_with_a_pixel_that_is_not_finite_is_one_error(tmp_path, value):
    """One NaN or infinite pixel in a float TIFF of a clear digit gave numpy's warnings and
    "no digit found (the picture is blank...)"; Pillow's extrema skip a NaN mid-picture."""
    pixels = np.zeros((40, 40), np.float32)
    pixels[10:30, 18:22] = 1.0
    pixels[20, 5] = value
    path = tmp_path / "digit.tif"
    Image.fromarray(pixels, "F").save(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no numpy warning on the way
        with pytest.raises(HarnessError, match=r"digit.tif: a floating-point picture holding NaN or infinite values, which are no grey level$"):
            load_digit(path)


@pytest.mark.parametrize("suffix", [".tga", ".ico", ".pcx"])
def test_formats_beyond_png_and_jpeg_are_read(tmp_path, suffix):
    """predict refuses EPS alone (Pillow runs Ghostscript on it); a first fix allowed a short
    list of formats and refused others Pillow reads, such as these."""
    pixels = np.zeros((28, 28), np.uint8)
    pixels[6:22, 12:16] = 255
    path = tmp_path / f"digit{suffix}"
    Image.fromarray(pixels).save(path)
    assert load_digit(path).max() == 255
