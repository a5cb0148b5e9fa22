"""Bad input: one clear error naming the file and the problem, exit status 2, nothing damaged.

Most cases call `harness.cli.main` in-process (the function `python -m harness`
runs; an exception other than HarnessError would escape it and fail the test,
so "no traceback" is checked too). A few run the real command as a subprocess.
"""

from __future__ import annotations

import errno
import gzip
import io
import json
import os
import struct
import tracemalloc
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_one_error, cli, csv_row, idx_bytes, run_cli, snapshot, write_csv_source, write_idx, write_manifest, write_source
from PIL import Image

from harness.data.idx import read_idx
from harness.digit_image import load_digit
from harness.errors import HarnessError


# --- helpers ---------------------------------------------------------------------------------------


def pack_refused(capsys, tmp_path: Path, source: Path, *fragments: str) -> str:
    """`harness pack` of a bad source: one error, no output dir, no temporary dir, source untouched."""
    before = snapshot(source)
    out = tmp_path / "out"
    rc, stdout, err = cli(capsys, "pack", "--source", source, "--out", out)
    line = assert_one_error(rc, err, *fragments)
    assert not out.exists(), "a refused pack must not create the output directory"
    assert not list(tmp_path.glob(".out.packing-*")), "temporary pack directory left behind"
    assert snapshot(source) == before
    assert "wrote" not in stdout
    return line


# --- IDX sources ---------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gzip"])
def test_wrong_idx_magic(tmp_path, capsys, gz):
    source = write_source(tmp_path / "src", gz=gz)
    name = "train-images-idx3-ubyte" + (".gz" if gz else "")
    # A labels header (0x00000801) where an images header (0x00000803) belongs.
    write_idx(source / name, np.zeros((200, 28, 28)), gz, magic=b"\x00\x00\x08\x01")
    line = pack_refused(capsys, tmp_path, source, name, "magic number 2049", "expected 2051")
    assert str(source / name) in line


def test_wrong_magic_with_garbage_file(tmp_path, capsys):
    source = write_source(tmp_path / "src", gz=False)
    (source / "t10k-labels-idx1-ubyte").write_bytes(b"PK\x03\x04 this is a zip file, not IDX" * 3)
    pack_refused(capsys, tmp_path, source, "t10k-labels-idx1-ubyte", "bad IDX magic number")


def test_truncated_raw_idx(tmp_path, capsys):
    source = write_source(tmp_path / "src", gz=False)
    path = source / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-1000])
    pack_refused(capsys, tmp_path, source, "train-images-idx3-ubyte", "truncated", "200x28x28")


def test_truncated_gzip_stream(tmp_path, capsys):
    source = write_source(tmp_path / "src", gz=True)
    path = source / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    pack_refused(capsys, tmp_path, source, "train-images-idx3-ubyte.gz", "gzip data is corrupt or truncated")


def test_complete_gzip_of_truncated_idx(tmp_path, capsys):
    """A valid gzip stream whose IDX content is short is caught by the size check."""
    source = write_source(tmp_path / "src", gz=True)
    path = source / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-7]))
    pack_refused(capsys, tmp_path, source, "t10k-labels-idx1-ubyte.gz", "truncated")


def test_gzip_that_expands_past_its_header_is_not_expanded(tmp_path, capsys):
    """50 labels, then 256 MiB of zeros in a 260 kB file: refused after the 50 bytes its
    header promised plus one, not after decompressing everything (the old reader did)."""
    source = write_source(tmp_path / "src", gz=True)
    path = source / "t10k-labels-idx1-ubyte.gz"
    zeros = gzip.compress(bytes(1 << 20), compresslevel=9, mtime=0)  # one gzip member: 1 MiB of zeros in ~1 kB
    path.write_bytes(idx_bytes(np.zeros(50), gz=True) + zeros * 256)
    tracemalloc.start()
    try:
        pack_refused(capsys, tmp_path, source, "t10k-labels-idx1-ubyte.gz", "trailing bytes", "50 (58 bytes in all)")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 32 << 20, f"{peak / 2**20:.0f} MiB allocated while reading"


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gzip"])
def test_idx_header_promising_more_than_the_limit(tmp_path, capsys, gz):
    """Four uint32 dimensions can promise 2^96 bytes (past int64, where numpy's product
    wraps around): refused from the header, before any data is read."""
    source = write_source(tmp_path / "src", gz=gz)
    name = "train-images-idx3-ubyte" + (".gz" if gz else "")
    header = bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in (2**32 - 1, 2**32 - 1, 2**32 - 1))
    (source / name).write_bytes(gzip.compress(header + bytes(784)) if gz else header + bytes(784))
    # Packing streams the file, so no size limit applies: the image shape is what is wrong.
    pack_refused(capsys, tmp_path, source, name, "images are 4294967295x4294967295; expected 28x28")
    # Read whole (read_idx: library and bench code), the size it promises is refused first.
    with pytest.raises(HarnessError, match="4294967295x4294967295x4294967295 .* more than the 1073741824 this reader accepts"):
        read_idx(source / name, 3)


def test_image_label_count_mismatch(tmp_path, capsys):
    source = write_source(tmp_path / "src", gz=False)
    write_idx(source / "train-labels-idx1-ubyte", np.zeros(199))
    pack_refused(capsys, tmp_path, source, "train-images-idx3-ubyte", "200 images", "train-labels-idx1-ubyte", "199 labels")


def test_idx_label_out_of_range(tmp_path, capsys):
    source = write_source(tmp_path / "src", gz=True)
    labels = np.arange(50) % 10
    labels[17] = 10
    write_idx(source / "t10k-labels-idx1-ubyte.gz", labels, gz=True)
    pack_refused(capsys, tmp_path, source, "t10k-labels-idx1-ubyte.gz", "label 10 at index 17", "outside 0..9")


def test_images_not_28x28(tmp_path, capsys):
    source = write_source(tmp_path / "src", gz=False)
    write_idx(source / "train-images-idx3-ubyte", np.zeros((200, 28, 27)))
    pack_refused(capsys, tmp_path, source, "train-images-idx3-ubyte", "28x27", "expected 28x28")


def test_missing_labels_file(tmp_path, capsys):
    source = write_source(tmp_path / "src", gz=True)
    (source / "train-labels-idx1-ubyte.gz").unlink()
    pack_refused(capsys, tmp_path, source, "train", "no train labels")


def test_raw_and_gzip_copies_are_ambiguous(tmp_path, capsys):
    source = write_source(tmp_path / "src", gz=True)
    write_source(source, gz=False)
    pack_refused(capsys, tmp_path, source, "ambiguous", "train-images-idx3-ubyte, train-images-idx3-ubyte.gz")


# --- CSV sources ---------------------------------------------------------------------------------


@pytest.mark.parametrize("header", [True, False], ids=["header", "no-header"])
def test_csv_row_with_wrong_field_count(tmp_path, capsys, header):
    rows = [csv_row(1), csv_row(2), csv_row(3, [0] * 783), csv_row(4)]
    source = write_csv_source(tmp_path / "src", rows, header)
    line_no = 3 + int(header)  # file line numbers, header row included
    pack_refused(capsys, tmp_path, source, "mnist_train.csv", f"line {line_no} has 784 fields", "expected 785")


@pytest.mark.parametrize("bad,shown", [("1.5", "'1.5'"), ("abc", "'abc'"), ("", "''"), ("\u0663", "'\\xd9\\xa3'")],
                         ids=["float", "word", "empty", "arabic-indic-digit"])
def test_csv_non_integer_field(tmp_path, capsys, bad, shown):
    """A byte that is not ASCII is shown escaped once (it was '\\\\xd9', escaped twice)."""
    pixels = [0] * 784
    pixels[100] = bad
    source = write_csv_source(tmp_path / "src", [csv_row(1), csv_row(2, pixels)])  # header on line 1; label is field 1
    pack_refused(capsys, tmp_path, source, "mnist_train.csv", f"line 3, field 102 ({shown}) is not an integer")


@pytest.mark.parametrize("label", [10, -1])
def test_csv_label_out_of_range(tmp_path, capsys, label):
    """Named by its file line (the header is line 1), as an editor shows it, not by its
    index among the samples."""
    source = write_csv_source(tmp_path / "src", [csv_row(1), csv_row(2), csv_row(label)])
    pack_refused(capsys, tmp_path, source, "mnist_train.csv", f"line 4, field 1 ({label}) is a label outside 0..9")


def test_csv_pixel_out_of_range(tmp_path, capsys):
    pixels = [0] * 784
    pixels[5] = 256
    source = write_csv_source(tmp_path / "src", [csv_row(1), csv_row(2, pixels)], header=False)
    pack_refused(capsys, tmp_path, source, "mnist_train.csv", "line 2, field 7 (256) is a pixel value outside 0..255")


def test_csv_integer_beyond_64_bits(tmp_path, capsys):
    """numpy's parser names it by its data row from 0 (after the header): the file line here."""
    pixels = [0] * 784
    pixels[0] = 10**23
    source = write_csv_source(tmp_path / "src", [csv_row(1), csv_row(2, pixels)])
    pack_refused(capsys, tmp_path, source, "mnist_train.csv", f"line 3, field 2 ({10**23}) is not a 64-bit integer")


# --- the real command --------------------------------------------------------------------------------


def test_cli_subprocess_bad_source_exit_2_without_traceback(tmp_path):
    source = write_source(tmp_path / "src", gz=False)
    (source / "train-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08")  # 3 bytes: not even a header
    result = run_cli("pack", "--source", source, "--out", tmp_path / "out", timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "train-labels-idx1-ubyte" in lines[0] and "too short for an IDX header" in lines[0]
    assert not (tmp_path / "out").exists()


# --- shards ------------------------------------------------------------------------------------------


def test_missing_shard(shards, capsys):
    (shards / "train-000001.tar").unlink()
    before = snapshot(shards)
    rc, _, err = cli(capsys, "show", "--shards", shards, "--index", "0")
    assert_one_error(rc, err, "train-000001.tar", "missing")
    assert snapshot(shards) == before


def test_corrupted_shard_same_size_show(shards, capsys):
    path = shards / "train-000002.tar"
    data = bytearray(path.read_bytes())
    size, at = len(data), len(data) // 3
    data[at : at + 16] = bytes(b ^ 0xFF for b in data[at : at + 16])  # inside the image data
    path.write_bytes(bytes(data))
    assert path.stat().st_size == size
    before = snapshot(shards)
    rc, _, err = cli(capsys, "show", "--shards", shards, "--index", "0")
    assert_one_error(rc, err, "train-000002.tar", "SHA-256", "corrupt")
    assert snapshot(shards) == before


def test_truncated_shard_show(shards, capsys):
    path = shards / "train-000000.tar"
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[:-512])
    rc, _, err = cli(capsys, "show", "--shards", shards, "--split", "train", "--index", "5")
    assert_one_error(rc, err, "train-000000.tar", f"{size - 512} bytes", f"records {size}", "truncated")


@pytest.mark.parametrize("name", ["train-000001.tar", "test-000000.tar"])
def test_corrupted_shard_detected_by_train(shards, tmp_path, name):
    """`harness train` refuses a shard whose bytes changed, a training or a test shard
    (hashed on different paths: every rank its share of the training shards; rank 0 the
    test split as it loads it), before any training."""
    path = shards / name
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle] ^= 0xFF
    path.write_bytes(bytes(data))
    result = run_cli(
        "train", "--shards", shards, "--run-dir", tmp_path / "run", "--device", "cpu", "--epochs", "1", "--batch-size", "20", timeout=120
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    assert name in errors[0] and "SHA-256" in errors[0]
    run_dir = tmp_path / "run"  # refused before the first step: nothing of a run's results there
    assert not any((run_dir / name).exists() for name in ("summary.json", "metrics.jsonl", "checkpoints"))
    assert "before training: " not in result.stdout and "epoch 1/1" not in result.stdout


def test_corrupted_shard_detected_by_show_subprocess(shards):
    path = shards / "test-000000.tar"
    path.write_bytes(path.read_bytes()[:1024])
    result = run_cli("show", "--shards", shards, "--split", "test", "--index", "0", timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "test-000000.tar" in lines[0] and "1024 bytes" in lines[0]


def test_missing_manifest(shards, capsys):
    (shards / "manifest.json").unlink()
    rc, _, err = cli(capsys, "show", "--shards", shards, "--index", "0")
    assert_one_error(rc, err, str(shards / "manifest.json"), "manifest not found")


def test_a_directory_where_the_manifest_or_a_shard_belongs_is_called_one(shards, capsys):
    """Both were reported missing: a user looking for the file found it there."""
    import json

    shard = shards / json.loads((shards / "manifest.json").read_text())["splits"]["test"]["shards"][0]["name"]
    shard.unlink()
    shard.mkdir()
    rc, _, err = cli(capsys, "show", "--shards", shards, "--split", "test", "--index", "0")
    assert_one_error(rc, err, f"{shard}: shard listed in manifest.json is a directory, not a file")
    (shards / "manifest.json").unlink()
    (shards / "manifest.json").mkdir()
    rc, _, err = cli(capsys, "show", "--shards", shards, "--index", "0")
    assert_one_error(rc, err, f"{shards / 'manifest.json'}: is a directory, not a file; a shard set's manifest is a JSON file")


def test_shard_directory_missing(tmp_path, capsys):
    rc, _, err = cli(capsys, "show", "--shards", tmp_path / "nowhere", "--index", "0")
    assert_one_error(rc, err, "nowhere", "not found")


def test_shards_that_name_a_file_or_an_unknown_url_scheme(shards, capsys):
    """The manifest itself, and an s3:// URL, used to be "shard directory not found" (the
    URL shown as `s3:/bucket`, as a path)."""
    rc, _, err = cli(capsys, "show", "--shards", shards / "manifest.json", "--index", "0")
    assert_one_error(rc, err, f"{shards / 'manifest.json'}: is a file; --shards names the shard directory")
    rc, _, err = cli(capsys, "show", "--shards", "s3://bucket/mnist/", "--index", "0")
    assert_one_error(rc, err, "--shards s3://bucket/mnist/: no reader for s3:// locations", "https://, http://,", "file:// URL", "'pipe:aws s3 cp s3://BUCKET/PATH/{name} -'")


def test_manifest_not_json(shards, capsys):
    (shards / "manifest.json").write_text('{"format_version": 1, "splits": ')
    rc, _, err = cli(capsys, "show", "--shards", shards, "--index", "0")
    assert_one_error(rc, err, "manifest.json", "not valid JSON")


# --- output directory ----------------------------------------------------------------------------


def test_pack_refuses_directory_holding_shards(shards, tmp_path, capsys):
    before = snapshot(shards)
    source = write_source(tmp_path / "other", n_train=30, n_test=10)
    rc, stdout, err = cli(capsys, "pack", "--source", source, "--out", shards, "--shard-size", "10", "--block-size", "10")
    assert_one_error(rc, err, str(shards), "already holds shards", "manifest.json")
    assert snapshot(shards) == before  # same files, byte-identical: nothing replaced or added
    assert not list(tmp_path.glob(".shards.packing-*"))


def test_pack_refuses_directory_with_leftover_tar_files(shards, tmp_path, capsys):
    """Tar files without a manifest (an interrupted pack) are not silently overwritten either."""
    (shards / "manifest.json").unlink()
    before = snapshot(shards)
    rc, _, err = cli(capsys, "pack", "--source", tmp_path / "src", "--out", shards)
    assert_one_error(rc, err, str(shards), "tar files but no manifest.json")
    assert snapshot(shards) == before


def test_pack_refuses_output_path_that_is_a_file(tmp_path, capsys):
    target = tmp_path / "shards"
    target.write_text("precious")
    rc, _, err = cli(capsys, "pack", "--source", write_source(tmp_path / "src"), "--out", target)
    assert_one_error(rc, err, str(target), "not a directory")
    assert target.read_text() == "precious"


@pytest.mark.parametrize("shard_size,block_size,problem", [(250, 100, "must be a multiple of"), (0, 100, "must be positive")])
def test_pack_refuses_bad_sizes(tmp_path, capsys, shard_size, block_size, problem):
    rc, _, err = cli(
        capsys, "pack", "--source", write_source(tmp_path / "src"), "--out", tmp_path / "out",
        "--shard-size", shard_size, "--block-size", block_size,
    )
    assert_one_error(rc, err, "--shard-size", problem)
    assert not (tmp_path / "out").exists()


def test_missing_source_directory(tmp_path, capsys):
    rc, _, err = cli(capsys, "pack", "--source", tmp_path / "absent", "--out", tmp_path / "out")
    assert_one_error(rc, err, "absent", "source directory not found")
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"")  # one of the files, given for their directory
    rc, _, err = cli(capsys, "pack", "--source", tmp_path / "train-images-idx3-ubyte.gz", "--out", tmp_path / "out")
    assert_one_error(rc, err, "train-images-idx3-ubyte.gz", "not a directory; --source names the directory that holds the IDX or CSV files")


def test_empty_source_directory(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    rc, _, err = cli(capsys, "pack", "--source", tmp_path / "empty", "--out", tmp_path / "out")
    assert_one_error(rc, err, "empty", "no train split found")


# --- inputs the reviews found to escape as tracebacks or to take unbounded memory --------------------


def edited_manifest(shards: Path, edit) -> None:
    """Apply `edit` to the shard set's manifest.json and write it back."""
    manifest = json.loads((shards / "manifest.json").read_text())
    edit(manifest)
    write_manifest(shards, manifest)


@pytest.mark.parametrize("field,value,where", [("image_shape", [28.0, 28.0], "image_shape["), ("num_classes", 10.0, "num_classes")])
def test_manifest_float_where_an_integer_belongs(shards, capsys, field, value, where):
    """JSON Schema's `const` compares as Python does (28.0 == 28): a float shape passed it and
    reached numpy's reshape as a TypeError."""
    edited_manifest(shards, lambda manifest: manifest.update({field: value}))
    rc, _, err = cli(capsys, "show", "--shards", shards, "--split", "test", "--index", "3")
    assert_one_error(rc, err, "manifest.json", where, "is not of type 'integer'")


def test_manifest_count_its_shard_bytes_cannot_hold(shards, capsys):
    """A million samples in blocks of 1 declared for a 50-image shard of ~50 kB: refused from
    the manifest, before a reader lays out a million blocks (2**31 of them took ~200 GB)."""
    def inflate(manifest):
        test = manifest["splits"]["test"]
        test["samples"] = test["shards"][0]["samples"] = 10**6
        test["block_size"] = 1
    edited_manifest(shards, inflate)
    tracemalloc.start()
    try:
        rc, _, err = cli(capsys, "show", "--shards", shards, "--split", "test", "--index", "0")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert_one_error(rc, err, "manifest.json", "splits.test.shards[0].bytes", "is less than a shard of 1000000 images")
    assert peak < 32 << 20, f"{peak / 2**20:.0f} MiB allocated"  # 16 MiB of it: the manifest's read buffer


def test_lab_picture_is_one_error(tmp_path):
    """Pillow opens a LAB TIFF but cannot convert it to grey levels."""
    path = tmp_path / "lab.tif"
    picture = np.full((60, 60), 255, np.uint8)
    picture[10:50, 27:33] = 0
    Image.fromarray(picture).convert("RGB").convert("LAB").save(path)
    with pytest.raises(HarnessError, match=r"lab\.tif: a LAB picture, which cannot be converted to grey levels"):
        load_digit(path)


def test_png_with_truncated_exif_is_one_error(tmp_path):
    """An eXIf chunk of 11 bytes: Pillow's EXIF parser raises struct.error."""
    buffer = io.BytesIO()
    Image.fromarray(np.where(np.arange(1600).reshape(40, 40) % 40 // 5 == 4, 0, 255).astype(np.uint8)).save(buffer, "PNG")
    png, exif = buffer.getvalue(), b"Exif\x00\x00MM\x00*\x00"
    chunk = struct.pack(">I", len(exif)) + b"eXIf" + exif + struct.pack(">I", zlib.crc32(b"eXIf" + exif))
    at = png.index(b"IDAT") - 4
    path = tmp_path / "exif.png"
    path.write_bytes(png[:at] + chunk + png[at:])
    with pytest.raises(HarnessError, match=r"exif\.png: damaged EXIF data"):
        load_digit(path)


# An EXIF block whose one tag, the orientation, says its data (1,000 values) lies at offset
# 65,536, past the file's end: Pillow's parser warns "Tag data larger than file" and skips it.
EXIF_ORIENTATION_PAST_THE_END = b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x01" + struct.pack(">HHII", 274, 3, 1000, 1 << 16) + bytes(4)


@pytest.mark.parametrize("suffix", ["jpg", "png"])
def test_a_picture_whose_orientation_pillow_skips_is_one_error(tmp_path, suffix):
    """Pillow skipped the tag with a warning, printed beside the prediction (exit 0), and
    the picture was read as it lies, on its side perhaps. A JPEG's EXIF is parsed as it
    opens, a PNG's when it is turned upright: both are one error."""
    picture = Image.fromarray(np.where(np.arange(1600).reshape(40, 40) % 40 // 5 == 4, 0, 255).astype(np.uint8))
    path = tmp_path / f"digit.{suffix}"
    picture.save(path, exif=EXIF_ORIENTATION_PAST_THE_END)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning either
        with pytest.raises(HarnessError, match=rf"^{path}: damaged EXIF data \(Tag data larger than file. Skipping tag 274\); save the picture without it$"):
            load_digit(path)


GOOD_METRICS = '{"epoch": 1, "train_loss": 0.5, "val_loss": 0.4, "val_accuracy": 0.9}\n'


@pytest.mark.parametrize("line,fragment", [
    ("[" * 100000 + "]" * 100000, "not a JSON object (nested too deeply)"),
    ('{"epoch": 1, "train_loss": 1' + "0" * 5000 + ', "val_loss": 0.4, "val_accuracy": 0.9}', "an integer of 5001 digits"),
    ('{"epoch": 1' + "0" * 400 + ', "train_loss": 0.5, "val_loss": 0.4, "val_accuracy": 0.9}', "an integer of 401 digits"),
    ('{"epoch": 10000000000, "train_loss": 0.5, "val_loss": 0.4, "val_accuracy": 0.9}', "epoch: 10000000000 is greater than the maximum"),
    ('{"epoch": 1, "train_loss": 1e300, "val_loss": -1e300, "val_accuracy": 0.9}', "train_loss: 1e+300 is beyond float32's range"),
], ids=["deep", "5000-digits", "epoch-10**400", "epoch-10**10", "loss-1e300"])
def test_report_metrics_lines_that_raised(tmp_path, capsys, line, fragment):
    """Lines that passed (or got past) report's checks and then raised RecursionError,
    ValueError (int's digit limit) or OverflowError (matplotlib's axis)."""
    (tmp_path / "metrics.jsonl").write_text(GOOD_METRICS + line + "\n")
    rc, _, err = cli(capsys, "report", tmp_path)
    assert_one_error(rc, err, f"{tmp_path / 'metrics.jsonl'}: line 2: {fragment}")
    assert not (tmp_path / "report").exists()


@pytest.mark.parametrize("state,fragment", [
    ({"w": torch.zeros(3)}, "holds no 4-D (conv) or 2-D (linear) weight"),
    ({"w": torch.zeros(3, 5)}, "first 2-D weight is 3x5"),
    # 1.6M elements on one float of storage (the review's 4096x4096 took 1.9 GB, then asked for 4.5 GB).
    ({"conv": torch.zeros(1).expand(256, 256, 5, 5)}, "1638400 elements in a storage of 4 bytes"),
    ({"conv": torch.zeros(4, 256, 3, 3)}, "682 inches high"),
], ids=["no-2d-or-4d", "not-784-inputs", "expanded", "too-tall"])
def test_report_model_it_cannot_draw(tmp_path, capsys, state, fragment):
    (tmp_path / "metrics.jsonl").write_text(GOOD_METRICS)
    torch.save(state, tmp_path / "model.pt")
    rc, _, err = cli(capsys, "report", tmp_path)
    assert_one_error(rc, err, str(tmp_path / "model.pt"), fragment)


def test_report_where_a_file_is_in_the_way_is_one_error(tmp_path, capsys):
    """An error the operating system reports for a file (here a directory where a picture's
    temporary file goes; a read-only or full disk alike) is one line naming the file and
    the system's reason, with status 1: it used to be a traceback. A file named `report`,
    where the pictures' folder goes, is found before that, with a line that says so."""
    (tmp_path / "metrics.jsonl").write_text(GOOD_METRICS)
    (tmp_path / "report").write_text("notes\n")
    rc, out, err = cli(capsys, "report", tmp_path)
    assert (rc, err) == (2, f"error: {tmp_path / 'report'}: is a file where the pictures go; move it\n"), err
    assert (tmp_path / "report").read_text() == "notes\n"
    (tmp_path / "report").unlink()
    in_the_way = tmp_path / "report" / f".training_curves.png.tmp-{os.getpid()}"  # atomic.temporary_path's name, in this process
    in_the_way.mkdir(parents=True)
    rc, out, err = cli(capsys, "report", tmp_path)
    assert (rc, err) == (1, f"error: {in_the_way}: Is a directory\n"), err


def test_system_errors_without_a_file_are_one_line_and_others_are_not_hidden(capsys):
    """A failed write names no file (ENOSPC from a full disk): the system's reason alone.
    An OSError that is not the system's (no errno) is a bug, shown in full."""
    from harness.errors import run_guarded

    def disk_full(args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    assert run_guarded(disk_full, None) == 1
    assert capsys.readouterr().err == "error: No space left on device\n"

    def bug(args):
        raise OSError("not the system's")

    with pytest.raises(OSError, match="not the system's"):
        run_guarded(bug, None)


def test_pack_refuses_images_all_one_value(tmp_path, capsys):
    """Their pixel std of 0 is one every reader of the shard set refuses: refused before packing."""
    source = write_source(tmp_path / "src", n_train=30, n_test=10)
    write_idx(source / "train-images-idx3-ubyte.gz", np.full((30, 28, 28), 7), gz=True)
    pack_refused(capsys, tmp_path, source, "train-images-idx3-ubyte.gz", "every pixel of every training image is 7", "std of 0")
