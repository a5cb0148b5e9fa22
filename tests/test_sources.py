"""Reading sources: IDX (gzip and raw, both naming styles), CSV (with and without header), real MNIST."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from helpers import MNIST_SHA256, MNIST_TEST_HISTOGRAM, MNIST_TRAIN_HISTOGRAM, assert_one_error, cli, write_idx

from harness.data.csv_source import read_csv
from harness.data.idx import read_idx
from harness.data.pack import pack
from harness.data.sources import load_source
from harness.data.stream import ShardSplit
from harness.errors import HarnessError


def random_split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n, dtype=np.uint8)


def write_idx_dataset(directory, n_train=300, n_test=120, gz=True, sep="-", seed=0):
    """A synthetic MNIST-like IDX source directory; returns {split: (images, labels)}."""
    directory.mkdir(parents=True, exist_ok=True)
    data = {"train": random_split(n_train, seed), "test": random_split(n_test, seed + 1)}
    ext = ".gz" if gz else ""
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images, labels = data[split]
        write_idx(directory / f"{prefix}-images{sep}idx3-ubyte{ext}", images, gz)
        write_idx(directory / f"{prefix}-labels{sep}idx1-ubyte{ext}", labels, gz)
    return data


def write_csv(path, images, labels, header: bool) -> None:
    lines = []
    if header:
        lines.append(",".join(["label"] + [f"pixel{i}" for i in range(784)]))
    for image, label in zip(images, labels):
        lines.append(",".join(map(str, [int(label), *image.reshape(-1).tolist()])))
    path.write_text("\n".join(lines) + "\n")


# --- IDX -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gzip"])
def test_read_idx_returns_the_array_written(tmp_path, gz):
    images, labels = random_split(37, seed=3)
    write_idx(tmp_path / "images", images, gz)
    write_idx(tmp_path / "labels", labels, gz)
    assert (tmp_path / "images").read_bytes()[:2] == (b"\x1f\x8b" if gz else b"\x00\x00")
    got_images, got_labels = read_idx(tmp_path / "images", 3), read_idx(tmp_path / "labels", 1)
    assert got_images.dtype == np.uint8 and got_images.shape == (37, 28, 28)
    assert got_labels.dtype == np.uint8 and got_labels.shape == (37,)
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gzip"])
@pytest.mark.parametrize("sep", ["-", "."], ids=["train-images-idx3-ubyte", "train-images.idx3-ubyte"])
def test_load_source_idx_both_naming_styles(tmp_path, gz, sep):
    source = tmp_path / "src"
    expected = write_idx_dataset(source, gz=gz, sep=sep, seed=11)
    dataset = load_source(source)
    assert dataset.kind == "idx"
    assert dataset.name == "src"
    assert set(dataset.splits) == {"train", "test"}
    for split, (images, labels) in expected.items():
        np.testing.assert_array_equal(dataset.splits[split].images, images)
        np.testing.assert_array_equal(dataset.splits[split].labels, labels)
        assert dataset.splits[split].images.dtype == np.uint8
    # Every file used is recorded with its checksum and size (they end up in the manifest).
    ext = ".gz" if gz else ""
    expected_names = {f"{p}-{k}{sep}idx{d}-ubyte{ext}" for p in ("train", "t10k") for k, d in (("images", 3), ("labels", 1))}
    assert set(dataset.files) == expected_names
    for name, info in dataset.files.items():
        content = (source / name).read_bytes()
        assert info == {"sha256": hashlib.sha256(content).hexdigest(), "bytes": len(content)}


def test_load_source_accepts_test_prefix_and_custom_name(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    train, test = random_split(50, 1), random_split(20, 2)
    write_idx(source / "train-images-idx3-ubyte", train[0])
    write_idx(source / "train-labels-idx1-ubyte", train[1])
    write_idx(source / "test-images-idx3-ubyte.gz", test[0], gz=True)
    write_idx(source / "test-labels-idx1-ubyte.gz", test[1], gz=True)
    dataset = load_source(source, name="my-digits")
    assert dataset.name == "my-digits"
    np.testing.assert_array_equal(dataset.splits["test"].images, test[0])
    np.testing.assert_array_equal(dataset.splits["test"].labels, test[1])


# --- CSV -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("header", [False, True], ids=["no-header", "header"])
def test_read_csv(tmp_path, header):
    images, labels = random_split(25, seed=5)
    path = tmp_path / "digits.csv"
    write_csv(path, images, labels, header)
    pixels, got_labels = read_csv(path)
    # The header row (when present) is not a sample; every data row is.
    assert pixels.shape == (25, 784) and pixels.dtype == np.uint8
    np.testing.assert_array_equal(pixels, images.reshape(25, 784))
    np.testing.assert_array_equal(got_labels, labels)


@pytest.mark.parametrize("newline", ["\n", "\r\n"], ids=["lf", "crlf"])
@pytest.mark.parametrize("bom", [False, True], ids=["no-bom", "bom"])
@pytest.mark.parametrize("header", [False, True], ids=["no-header", "header"])
def test_read_csv_with_byte_order_mark(tmp_path, header, bom, newline):
    """Some spreadsheet programs start a CSV with a UTF-8 byte order mark (and end lines in
    CRLF). The mark is not part of the first field: without a header, the first row is still
    an image (it was taken for a header, and lost); every variant reads the same."""
    images, labels = random_split(25, seed=6)
    path = tmp_path / "digits.csv"
    write_csv(path, images, labels, header)
    text = path.read_text().replace("\n", newline)
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode())
    pixels, got_labels = read_csv(path)
    assert pixels.shape == (25, 784) and got_labels.shape == (25,)
    np.testing.assert_array_equal(pixels, images.reshape(25, 784))
    np.testing.assert_array_equal(got_labels, labels)


@pytest.mark.parametrize("header", [False, True], ids=["no-header", "header"])
def test_csv_with_byte_order_mark_errors_name_the_editor_line(tmp_path, header):
    """Dropping the mark shifts no line number: a bad field is reported where an editor shows it."""
    images, labels = random_split(4, seed=9)
    path = tmp_path / "digits.csv"
    write_csv(path, images, labels, header)
    lines = path.read_text().splitlines()
    lines[2] = lines[2].replace(",", ",x", 1)  # line 3: field 2 becomes `x...`
    path.write_bytes(b"\xef\xbb\xbf" + "\n".join(lines).encode() + b"\n")
    with pytest.raises(HarnessError, match=r": line 3, field 2 \('x"):
        read_csv(path)


@pytest.mark.parametrize("header", [False, True], ids=["no-header", "header"])
def test_csv_header_is_the_first_line_that_is_not_blank(tmp_path, header):
    """Blank lines are skipped wherever they are, before a header too."""
    images, labels = random_split(5, seed=10)
    path = tmp_path / "digits.csv"
    write_csv(path, images, labels, header)
    path.write_text("\n \t\n" + path.read_text())
    pixels, got_labels = read_csv(path)
    np.testing.assert_array_equal(pixels, images.reshape(5, 784))
    np.testing.assert_array_equal(got_labels, labels)


@pytest.mark.parametrize(
    "first,problem",
    [("garbage,row", "line 1 has 2 fields; expected 785 (label and 784 pixels)"), ("x" + ",0" * 784, "line 1, field 1 ('x') is not an integer"),
     ("label" + ",0" * 784, "line 1, field 1 ('label') is not an integer")],
    ids=["two-words", "mistyped-label", "header-word-then-pixels"],
)
def test_a_bad_first_line_is_a_data_line_not_a_header(tmp_path, first, problem):
    """Only the first field was looked at: a first line that was not an integer there was
    dropped as a header, and a 300-image file packed 299 without a word. A header has a
    row's 785 fields and no integer among them; any other first line is data."""
    images, labels = random_split(300, seed=12)
    path = tmp_path / "mnist_train.csv"
    write_csv(path, images, labels, header=False)
    path.write_text("\n".join([first, *path.read_text().splitlines()[1:]]) + "\n")
    with pytest.raises(HarnessError) as raised:
        read_csv(path)
    assert str(raised.value) == f"{path}: {problem}"


@pytest.mark.parametrize("header", ["label," + ",".join(f"{r}x{c}" for r in range(1, 29) for c in range(1, 29)), ' "label" ' + ",px" * 784],
                         ids=["row-x-column", "quoted-and-spaced"])
def test_other_headers_are_headers(tmp_path, header):
    """A header by its look, whatever its names: 785 fields, none an integer."""
    images, labels = random_split(6, seed=13)
    path = tmp_path / "digits.csv"
    write_csv(path, images, labels, header=False)
    path.write_text(header + "\n" + path.read_text())
    pixels, got_labels = read_csv(path)
    np.testing.assert_array_equal(pixels, images.reshape(6, 784))
    np.testing.assert_array_equal(got_labels, labels)


@pytest.mark.parametrize("bad,shown", [("0\r", "'0\\r'"), (" 7x ", "' 7x '"), ("1" * 5000 + "x", "'" + "1" * 200 + "...'")],
                         ids=["carriage-return", "spaces", "long-field"])
def test_a_bad_field_is_shown_as_it_is(tmp_path, bad, shown):
    """Line 4 ending in `0\\r\\r\\n` (one \\r is a line end's): the field is `0\\r`, and was
    shown stripped, as the valid '0'. Long fields are cut, as other quoted values are."""
    images, labels = random_split(5, seed=14)
    path = tmp_path / "digits.csv"
    write_csv(path, images, labels, header=False)
    lines = path.read_text().splitlines()
    lines[3] = lines[3].rsplit(",", 1)[0] + "," + bad
    path.write_bytes("\r\n".join(lines).encode() + b"\r\n")
    with pytest.raises(HarnessError) as raised:
        read_csv(path)
    assert str(raised.value) == f"{path}: line 4, field 785 ({shown}) is not an integer"


@pytest.mark.parametrize(
    "header,names", [(True, ("mnist_train.csv", "mnist_test.csv")), (False, ("train.csv", "test.csv"))], ids=["mnist_-header", "plain-no-header"]
)
def test_load_source_csv(tmp_path, header, names):
    source = tmp_path / "csvsrc"
    source.mkdir()
    train, test = random_split(40, 7), random_split(15, 8)
    write_csv(source / names[0], *train, header)
    write_csv(source / names[1], *test, header)
    dataset = load_source(source)
    assert dataset.kind == "csv"
    for split, (images, labels) in (("train", train), ("test", test)):
        assert dataset.splits[split].images.shape == (len(labels), 28, 28)
        np.testing.assert_array_equal(dataset.splits[split].images, images)
        np.testing.assert_array_equal(dataset.splits[split].labels, labels)
    assert set(dataset.files) == set(names)


def test_csv_and_idx_sources_pack_to_identical_shards(tmp_path):
    """The same data read from IDX or CSV gives the same shard contents."""
    idx_dir, csv_dir = tmp_path / "idx", tmp_path / "csv"
    data = write_idx_dataset(idx_dir, n_train=120, n_test=30, seed=21)
    csv_dir.mkdir()
    write_csv(csv_dir / "mnist_train.csv", *data["train"], header=True)
    write_csv(csv_dir / "mnist_test.csv", *data["test"], header=True)
    a = pack(load_source(idx_dir, "same"), tmp_path / "a", shard_size=50, block_size=10)
    b = pack(load_source(csv_dir, "same"), tmp_path / "b", shard_size=50, block_size=10)
    assert a["splits"] == b["splits"]  # same shard names, sizes and SHA-256
    assert a["source"]["kind"] == "idx" and b["source"]["kind"] == "csv"


# --- a synthetic dataset with other content ---------------------------------------------------------


def test_synthetic_idx_dataset_packs_and_loads(tmp_path):
    source = tmp_path / "synthetic"
    data = write_idx_dataset(source, n_train=730, n_test=210, gz=False, seed=42)
    manifest = pack(load_source(source), tmp_path / "shards", shard_size=300, block_size=100)
    assert manifest["dataset"] == "synthetic"
    assert [s["samples"] for s in manifest["splits"]["train"]["shards"]] == [300, 300, 130]
    assert [s["samples"] for s in manifest["splits"]["test"]["shards"]] == [210]
    for split, (images, labels) in data.items():
        got_images, got_labels = ShardSplit(tmp_path / "shards", split).load_all()
        np.testing.assert_array_equal(got_images, images)
        np.testing.assert_array_equal(got_labels, labels)
    # Statistics come from this data, not from constants for MNIST.
    scaled = data["train"][0].astype(np.float64) / 255.0
    stats = manifest["train_stats"]
    assert stats["mean"] == pytest.approx(scaled.mean(), abs=1e-7)
    assert stats["std"] == pytest.approx(scaled.std(), abs=1e-7)
    assert abs(stats["mean"] - 0.1307) > 0.2  # uniform random pixels: mean near 0.5
    np.testing.assert_allclose(stats["pixel_mean"], scaled.reshape(730, -1).mean(axis=0), atol=1e-7)


# --- real MNIST ------------------------------------------------------------------------------------


def test_damage_deep_inside_a_gzip_idx_is_corrupt_gzip_data(mnist_dir, tmp_path, capsys):
    """Compressed bytes 2000-2003 of MNIST's train labels overwritten: gzip decompresses a
    whole buffer to give the header, so the damage is met there. It was reported as an
    `unreadable header`; the header is fine, the gzip data is corrupt."""
    source = tmp_path / "src"
    source.mkdir()
    for name in MNIST_SHA256:
        (source / name).write_bytes((mnist_dir / name).read_bytes())
    path = source / "train-labels-idx1-ubyte.gz"
    damaged = bytearray(path.read_bytes())
    damaged[2000:2004] = b"XXXX"
    path.write_bytes(damaged)
    rc, _, err = cli(capsys, "pack", "--source", source, "--out", tmp_path / "out")
    line = assert_one_error(rc, err, f"{path}: gzip data is corrupt or truncated (")
    assert "header" not in line and not (tmp_path / "out").exists()


def test_real_mnist_loads(mnist_dir):
    dataset = load_source(mnist_dir)
    train, test = dataset.splits["train"], dataset.splits["test"]
    assert dataset.kind == "idx"
    assert train.images.shape == (60000, 28, 28) and train.images.dtype == np.uint8
    assert test.images.shape == (10000, 28, 28) and test.images.dtype == np.uint8
    assert train.labels.shape == (60000,) and test.labels.shape == (10000,)
    assert np.bincount(train.labels, minlength=10).tolist() == MNIST_TRAIN_HISTOGRAM
    assert np.bincount(test.labels, minlength=10).tolist() == MNIST_TEST_HISTOGRAM
    assert int(train.labels[0]) == 5 and int(test.labels[0]) == 7
    # The recorded source checksums are those of the official files.
    assert {name: info["sha256"] for name, info in dataset.files.items()} == MNIST_SHA256
