"""Crafted shard sets: nothing in them runs, nothing outside their directory is read, and
nothing but the block format is decoded.

Whoever can write a shard directory can also write its manifest, so every crafted shard
here is resealed (`reseal`: the manifest's sizes and SHA-256s made to match again) and
the checks under test are the ones after the hash check. Each test also checks that the
input files are left as they were and that a payload did not run.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import Payload, assert_one_error, cli, npy_bytes, reseal, run_cli, snapshot, tar_members, write_manifest, write_source, write_tar

from harness.data.pack import pack
from harness.data.sources import load_source
from harness.data.stream import MacroBatchStream, ShardSplit
from harness.errors import HarnessError


def manifest_of(shards: Path) -> dict:
    return json.loads((shards / "manifest.json").read_text())


def edit_members(path: Path, edit) -> None:
    """Rewrite a shard with `edit(members)`'s members, then reseal its directory."""
    write_tar(path, edit(tar_members(path)))
    reseal(path.parent)


def replace_member(path: Path, name: str, payload: bytes) -> None:
    edit_members(path, lambda members: [(n, payload if n == name else p) for n, p in members])


def refused(capsys, shards: Path, *fragments: str, args: tuple = ("--index", "0"), payload: Path | None = None) -> str:
    """`harness show` on the crafted set: one error line with every fragment, input untouched,
    and the `payload` marker file (if any) not created."""
    before = snapshot(shards.parent)
    rc, _, err = cli(capsys, "show", "--shards", shards, *args)
    assert payload is None or not payload.exists(), "a member of the shard ran code"
    line = assert_one_error(rc, err, *fragments)
    assert snapshot(shards.parent) == before
    return line


# --- members that would run code -------------------------------------------------------------------


def pickled(payload: Payload, suffix: str) -> bytes:
    if suffix == "pth":  # torch.save pickles it inside a zip: torch.load(weights_only=False) runs it
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        return buffer.getvalue()
    return pickle.dumps(payload)


@pytest.mark.parametrize("suffix", ["pickle", "pkl", "pyd", "pth"])
def test_crafted_pickle_member_is_refused_and_not_run(shards, tmp_path, capsys, suffix):
    marker = tmp_path / "payload-ran"
    member = f"train-00000000.payload.{suffix}"
    edit_members(shards / "train-000000.tar", lambda members: members[:3] + [(member, pickled(Payload(marker), suffix))] + members[3:])
    refused(capsys, shards, "train-000000.tar", member, payload=marker)


def test_object_array_npy_is_refused_and_not_run(shards, tmp_path, capsys):
    """An .npy holding Python objects needs pickle to load: refused, never unpickled."""
    marker = tmp_path / "payload-ran"
    crafted = np.empty(20, dtype=object)
    crafted[:] = [Payload(marker)] * 20
    replace_member(shards / "train-000000.tar", "train-00000000.labels.npy", npy_bytes(crafted, allow_pickle=True))
    refused(capsys, shards, "train-000000.tar", "train-00000000.labels.npy", "dtype", payload=marker)


def test_pipe_manifest_entry_does_not_run_its_command(shards, capsys, monkeypatch):
    """A shard named `pipe:touch PWNED`, read from the current directory (`--shards .`),
    would make webdataset run `touch PWNED` in a shell."""
    os.rename(shards / "train-000000.tar", shards / "pipe:touch PWNED")
    manifest = manifest_of(shards)
    manifest["splits"]["train"]["shards"][0]["name"] = "pipe:touch PWNED"
    write_manifest(shards, manifest)
    monkeypatch.chdir(shards)
    before = snapshot(shards)
    try:
        rc, _, err = cli(capsys, "show", "--shards", ".", "--index", "0")
    finally:
        assert not (shards / "PWNED").exists(), "the manifest entry ran a shell command"
    assert_one_error(rc, err, "manifest.json", "splits.train.shards[0].name", "pipe:touch PWNED")
    assert snapshot(shards) == before


@pytest.mark.parametrize("name", ["sh{0,1}ards", "sh::ards", "sh${HOME}ards", "pipe:cat", "sh[0]ards"])
def test_directory_names_are_not_reinterpreted(tmp_path, capsys, monkeypatch, name):
    """Braces, `::`, `${VAR}` and `pipe:` in a shard directory's name are just characters."""
    pack(load_source(write_source(tmp_path / "src")), tmp_path / name, shard_size=80, block_size=20)
    expected = ShardSplit(tmp_path / name, "train").load_all()
    monkeypatch.chdir(tmp_path)
    for shards in (tmp_path / name, Path(name)):  # absolute, and relative to the working directory
        rc, out, err = cli(capsys, "show", "--shards", shards, "--index", "199")
        assert rc == 0, err
        assert out.startswith(f"train[199]  label {int(expected[1][199])}")


# --- the manifest ---------------------------------------------------------------------------------------


def outside_shard(shards: Path, tmp_path: Path) -> str:
    """A real shard moved out of the directory; the manifest is made to point at it."""
    outside = tmp_path / "outside.tar"
    os.rename(shards / "train-000000.tar", outside)
    return str(outside)


@pytest.mark.parametrize(
    "field,value,fragment",
    [
        ("splits.train.shards.0.name", "../outside.tar", "does not match"),
        ("splits.train.shards.0.name", "OUTSIDE", "does not match"),
        ("splits.train.shards.0.name", "train-000001.tar", "'train-000000.tar' was expected"),
        ("splits.train.shards.0.name", "test-000000.tar", "'train-000000.tar' was expected"),
        ("splits.train.shards.0.name", "train-000000.tar/", "does not match"),
        ("image_shape", [32, 32], "[28, 28] was expected"),
        ("image_shape", [28, 28, 3], "[28, 28] was expected"),
        ("num_classes", 11, "10 was expected"),
        ("train_stats.std", 0, "less than the minimum"),
        ("train_stats.std", -0.3, "less than the minimum"),
        ("train_stats.mean", 1.5, "greater than the maximum"),
        ("train_stats.mean", "0.13", "is not of type 'number'"),
        ("train_stats.pixel_mean", [0.1] * 783, "is too short"),
        ("train_stats.pixel_mean.5", None, "is not of type 'number'"),
        ("splits.train.samples", 201, "the shards hold 200"),
        ("splits.train.samples", 0, "less than the minimum"),
        ("splits.train.samples", True, "is not of type 'integer'"),
        ("splits.train.block_size", 0, "less than the minimum"),
        ("splits.train.block_size", 20.5, "is not of type 'integer'"),
        ("splits.train.shards.1.samples", -80, "less than the minimum"),
        ("splits.train.shards.0.bytes", 10**12, "more than a shard of 80 images can be"),
        ("splits.train.shards.0.sha256", "x" * 64, "does not match"),
        ("splits.train.shards.0.extra", 1, "'extra' was unexpected"),
        ("splits.train.shards", [], "should be non-empty"),
        ("splits.test", None, "is not of type 'object'"),
        ("format_version", 2, "format_version is 2"),
    ],
)
def test_manifest_field_out_of_range(shards, tmp_path, capsys, field, value, fragment):
    manifest = manifest_of(shards)
    *parents, last = field.split(".")
    target = manifest
    for key in parents:
        target = target[int(key)] if isinstance(target, list) else target[key]
    target[int(last) if isinstance(target, list) else last] = value
    write_manifest(shards, manifest)
    where = ".".join(parents) + (f"[{last}]" if last.isdigit() else f".{last}" if parents else last)
    where = where.replace(".0.", "[0].").replace(".1.", "[1].").replace(".5", "[5]")
    line = refused(capsys, shards, "manifest.json", fragment)
    if fragment != "format_version is 2" and "was unexpected" not in fragment:
        assert where in line, (where, line)


def test_manifest_path_outside_the_directory_is_refused(shards, tmp_path, capsys):
    """`../x` and absolute names are refused before anything is opened, even when the file
    they name is a real shard with the recorded size and hash."""
    outside = outside_shard(shards, tmp_path)
    for name in ("../outside.tar", outside):
        manifest = manifest_of(shards)
        manifest["splits"]["train"]["shards"][0]["name"] = name
        write_manifest(shards, manifest)
        refused(capsys, shards, "manifest.json", "splits.train.shards[0].name", "does not match")


@pytest.mark.parametrize(
    "text,fragment",
    [
        ('{"format_version": 1, "train_stats": {"mean": NaN}}', "NaN is not a JSON number"),
        ('{"format_version": 1, "format_version": 1}', "duplicate key 'format_version'"),
        ('[1, 2]', "is not of type 'object'"),
        ('{"format_version": 1, "x": ' + "[" * 100000 + "]" * 100000 + "}", "nested too deeply"),
        ('{"format_version": 1, "splits": ', "not valid JSON"),
        ("\xff\xfe{}", "not valid JSON"),
    ],
    ids=["nan", "duplicate-key", "array", "deep", "truncated", "not-utf8"],
)
def test_manifest_text_that_is_not_a_manifest(shards, capsys, text, fragment):
    (shards / "manifest.json").write_bytes(text.encode("latin-1"))
    refused(capsys, shards, "manifest.json", fragment)


def test_oversized_manifest_is_not_read(shards, capsys):
    with open(shards / "manifest.json", "ab") as f:
        f.truncate(64 << 20)  # sparse: 64 MiB of zeros on disk costs nothing
    refused(capsys, shards, "manifest.json", "larger than")


def test_std_zero_stops_training_with_one_error(shards, tmp_path):
    """Through the real command: the normaliser would divide by zero."""
    manifest = manifest_of(shards)
    manifest["train_stats"]["std"] = 0.0
    write_manifest(shards, manifest)
    result = run_cli("train", "--shards", shards, "--run-dir", tmp_path / "run", "--device", "cpu", "--epochs", "1", "--batch-size", "20", timeout=180)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "manifest.json" in errors[0] and "train_stats.std" in errors[0], result.stderr
    assert not (tmp_path / "run" / "summary.json").exists()


# --- blocks: counts, shapes, dtypes, members ----------------------------------------------------------


def block_payloads(count: int, first: int = 0, split: str = "train") -> dict[str, bytes]:
    return {
        "images.npy": npy_bytes(np.zeros((count, 28, 28), np.uint8)),
        "labels.npy": npy_bytes(np.zeros(count, np.uint8)),
        "meta.json": json.dumps({"split": split, "first": first, "count": count}).encode(),
    }


def npy_with_header(header: bytes) -> bytes:
    """An .npy (format 1.0) with `header` as its header text, then the data of 20 images."""
    header += b" " * (63 - (10 + len(header)) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + bytes(20 * 784)


@pytest.mark.parametrize(
    "kind,payload,fragment",
    [
        ("images.npy", npy_bytes(np.zeros((19, 28, 28), np.uint8)), "shape (19, 28, 28)"),
        ("images.npy", npy_bytes(np.zeros((20, 28, 27), np.uint8)), "shape (20, 28, 27)"),
        ("images.npy", npy_bytes(np.zeros((20, 28, 28), np.int16)), "dtype int16"),
        ("images.npy", npy_bytes(np.zeros((20, 28, 28), np.int64)), "125568 bytes"),
        ("images.npy", npy_bytes(np.zeros((20, 28, 28), np.uint8))[:-1], "data bytes"),
        ("images.npy", npy_bytes(np.zeros((20, 28, 28), np.uint8)) + b"\0", "data bytes"),
        ("images.npy", npy_bytes(np.asfortranarray(np.arange(20 * 784).reshape(20, 28, 28).astype(np.uint8))), "Fortran"),
        ("images.npy", b"PK\x03\x04 not an npy", "not a valid .npy array"),
        ("images.npy", npy_with_header(b"{'descr': '|u1', 'fortran_order': False, 'shape': (20, 28, 28"), "not a valid .npy array"),
        ("images.npy", npy_with_header(b"{'descr': 'O', 'fortran_order': False, 'shape': (20, 28, 28), }"), "dtype object"),
        ("labels.npy", npy_bytes(np.full(20, 10, np.uint8)), "label 10"),
        ("labels.npy", npy_bytes(np.zeros(21, np.uint8)), "shape (21,)"),
        ("labels.npy", npy_bytes(np.zeros(20, np.float32)), "dtype float32"),
        ("meta.json", b'{"split": "train", "first": 20, "count": 20}', "first"),
        ("meta.json", b'{"split": "test", "first": 0, "count": 20}', "split"),
        ("meta.json", b'{"split": "train", "first": 0, "count": 19}', "count"),
        ("meta.json", b'{"split": "train", "first": 0, "count": 20, "x": 1}', "'x' was unexpected"),
        ("meta.json", b'{"split": "train", "first": 0, "count": NaN}', "NaN"),
        ("meta.json", b"\x80 not json", "not valid JSON"),
    ],
)
def test_crafted_block_member_is_refused(shards, capsys, kind, payload, fragment):
    replace_member(shards / "train-000000.tar", f"train-00000000.{kind}", payload)
    refused(capsys, shards, "train-000000.tar", f"train-00000000.{kind}", fragment)


def test_every_block_is_checked_not_only_the_first(shards, capsys):
    replace_member(shards / "train-000001.tar", "train-00000140.labels.npy", npy_bytes(np.full(20, 255, np.uint8)))
    refused(capsys, shards, "train-000001.tar", "train-00000140.labels.npy", "label 255", args=("--index", "90"))


def test_shard_with_a_block_missing_is_refused(shards, capsys):
    """Fewer images than the manifest says: the missing rows are never trained on."""
    edit_members(shards / "train-000001.tar", lambda members: members[:-3])
    refused(capsys, shards, "train-000001.tar", "3 blocks", "manifest.json", "4", args=("--index", "90"))


def test_shard_with_an_extra_block_is_refused(shards, capsys):
    extra = block_payloads(20, first=80)
    edit_members(shards / "train-000000.tar", lambda members: members + [(f"train-00000080.{k}", p) for k, p in extra.items()])
    refused(capsys, shards, "train-000000.tar", "train-00000080", "more blocks than")


def test_blocks_out_of_order_are_refused(shards, capsys):
    edit_members(shards / "train-000000.tar", lambda members: members[3:6] + members[:3] + members[6:])
    refused(capsys, shards, "train-000000.tar", "train-00000020", "train-00000000")


@pytest.mark.parametrize(
    "members,fragment",
    [
        (lambda m: m[:2] + m[3:], "lacks member 'meta.json'"),
        (lambda m: m[:1] + m[:1] + m[1:], "twice"),
        (lambda m: [("README", b"hello")] + m, "'README'"),
        (lambda m: [("train-00000000.images.npy.gz", b"x")] + m, "'train-00000000.images.npy.gz'"),
        (lambda m: [("../train-00000000.meta.json", b"{}")] + m, "'../train-00000000.meta.json'"),
        (lambda m: [("test-00000000.meta.json", m[2][1])] + m, "'test-00000000.meta.json'"),
    ],
    ids=["missing", "duplicate", "stray-file", "compressed-member", "parent-path", "other-split"],
)
def test_members_outside_the_block_format(shards, capsys, members, fragment):
    edit_members(shards / "train-000000.tar", members)
    refused(capsys, shards, "train-000000.tar", fragment)


@pytest.mark.parametrize("kind", ["symlink", "directory", "hardlink"])
def test_member_that_is_not_a_regular_file(shards, capsys, kind):
    path = shards / "train-000000.tar"
    members = tar_members(path)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo("train-00000000.images.npy")
        info.type = {"symlink": tarfile.SYMTYPE, "directory": tarfile.DIRTYPE, "hardlink": tarfile.LNKTYPE}[kind]
        info.linkname = "/etc/passwd"
        tar.addfile(info)
        for name, payload in members[1:]:
            entry = tarfile.TarInfo(name)
            entry.size = len(payload)
            tar.addfile(entry, io.BytesIO(payload))
    reseal(shards)
    refused(capsys, shards, "train-000000.tar", "train-00000000.images.npy", "not a regular file")


@pytest.mark.parametrize("mode", ["w:gz", "w:bz2", "w:xz"])
def test_compressed_shard_is_refused(shards, capsys, mode):
    """The packer writes plain tars; a compressed one could expand without bound."""
    path = shards / "train-000000.tar"
    members = tar_members(path)
    with tarfile.open(path, mode) as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    reseal(shards)
    refused(capsys, shards, "train-000000.tar", "not a plain (uncompressed) tar file")


def test_oversized_member_is_not_read(shards, capsys):
    """A member larger than its block can be is refused from its header, before it is read."""
    big = npy_bytes(np.zeros((20, 28, 28), np.uint8)) + bytes(20000)  # within the shard-size bound
    replace_member(shards / "train-000000.tar", "train-00000000.images.npy", big)
    refused(capsys, shards, "train-000000.tar", "train-00000000.images.npy", "bytes")


@pytest.mark.parametrize("resident", [True, False])
def test_a_macro_batch_that_cannot_be_filled_is_an_error(shards, resident):
    """The stream's last line of defence: a plan that yields fewer images than a
    macro-batch holds (here one block short) is an error, never uninitialised rows."""
    stream = MacroBatchStream(ShardSplit(shards, "train"), 20, 200, seed=0, device=torch.device("cpu"))
    stream.resident = resident
    plan = stream._epoch_plan
    stream._epoch_plan = lambda epoch, skip: list(plan(epoch, skip))[:-1]
    with pytest.raises(HarnessError, match=r"hold fewer images than manifest.json says \(a macro-batch of 200 got 180\)"):
        list(stream.epoch(0))


def test_intact_shards_read_exactly_what_was_packed(tmp_path):
    """The strict reader decodes the packer's shards to the packed arrays, bit for bit."""
    dataset = load_source(write_source(tmp_path / "src", n_train=230))
    pack(dataset, tmp_path / "shards", shard_size=90, block_size=30)
    images, labels = ShardSplit(tmp_path / "shards", "train").load_all()
    np.testing.assert_array_equal(images, dataset.splits["train"].images)
    np.testing.assert_array_equal(labels, dataset.splits["train"].labels)


def test_a_pax_header_claiming_terabytes_is_refused_without_allocating_them(shards, capsys):
    """A tar header is read through a reader capped at the file's end: a pax header that
    claims 2**44 bytes is one error naming the shard, not a MemoryError."""
    path = shards / "train-000000.tar"
    header = tarfile.TarInfo("././@PaxHeader")
    header.type, header.size = tarfile.XHDTYPE, 2**44
    path.write_bytes(header.tobuf(tarfile.GNU_FORMAT) + path.read_bytes())  # GNU: a size past USTAR's 8 GiB
    reseal(shards)
    rc, _, err = cli(capsys, "show", "--shards", shards, "--index", "0")
    assert_one_error(rc, err, "train-000000.tar")


# --- run directories from someone else: `harness predict` and `harness report` ----------------------


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> Path:
    """A finished 2-epoch MLP run on the small shard set (seconds)."""
    base = tmp_path_factory.mktemp("small-run")
    shards = base / "shards"
    pack(load_source(write_source(base / "src")), shards, shard_size=80, block_size=20)
    result = run_cli("train", "--model", "mlp", "--hidden", "16", "--batch-size", "20", "--epochs", "2", "--device", "cpu",
                     "--threads", "1", "--shards", shards, "--run-dir", base / "run")
    assert result.returncode == 0, result.stderr[-2000:]
    return base / "run"


def edit_json(path: Path, edit) -> None:
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))


def with_config(**changes):
    return lambda summary: {**summary, "config": {**summary["config"], **changes}}


@pytest.mark.parametrize("edit,fragments", [
    (with_config(hidden=[-1]), ("summary.json: its config: --hidden -1: every layer needs at least 1 unit",)),
    (with_config(model="foo"), ("summary.json: its config: --model 'foo' is not one of",)),
    (with_config(normalize="bogus"), ("summary.json: its config: --normalize 'bogus'",)),
    (with_config(lr="0.1"), ("summary.json: config.lr is '0.1', not of type float",)),
    (lambda summary: [1], ("summary.json: [1] is not of type 'object'",)),
    (lambda summary: {k: v for k, v in summary.items() if k != "config"}, ("summary.json: 'config' is a required property",)),
    # Weights of 16 hidden units; a config of 10 million would have built a 31 GB model before the mismatch showed.
    (with_config(hidden=[10_000_000]), ("model.pt: weights do not fit the mlp model of its config",
                                        "expected a torch.float32 tensor of shape (10000000, 784)")),
], ids=["negative-layer", "unknown-model", "unknown-normalisation", "lr-as-text", "not-a-mapping", "no-config", "huge-layer"])
def test_predict_checks_a_runs_config_before_building_its_model(small_run, tmp_path, capsys, edit, fragments):
    """A run directory's summary.json says which model its weights fit; a crafted one is one
    error naming the file and field, before anything of its size is allocated."""
    run_dir = tmp_path / "run"
    shutil.copytree(small_run, run_dir)
    edit_json(run_dir / "summary.json", edit)
    before = snapshot(run_dir)
    rc, _, err = cli(capsys, "predict", run_dir, "--shards", small_run.parent / "shards", "--index", "0")
    assert_one_error(rc, err, *fragments)
    assert snapshot(run_dir) == before


@pytest.mark.parametrize("name,text,fragment", [
    ("metrics.jsonl", '{"epoch": 1}\n', "metrics.jsonl: line 1: 'train_loss' is a required property"),
    ("metrics.jsonl", "[1, 2]\n", "metrics.jsonl: line 1: [1, 2] is not of type 'object'"),
    ("metrics.jsonl", '{"epoch": 1, "train_loss": 1, "val_loss": 1, "val_accuracy": 7}\n', "line 1: val_accuracy: 7 is greater than the maximum of 1"),
    ("test_report.json", '{"set": "test"}', "test_report.json: 'confusion' is a required property"),
    ("test_report.json", '{"confusion": [[1, 2], [3, 4]]}', "test_report.json: confusion: [[1, 2], [3, 4]] is too short"),
    ("summary.json", "[1]", "summary.json: [1] is not of type 'object'"),
], ids=["metrics-line-fields", "metrics-line-array", "metrics-accuracy", "report-no-confusion", "report-small-confusion", "summary-array"])
def test_report_checks_a_runs_files_before_drawing(small_run, tmp_path, capsys, name, text, fragment):
    run_dir = tmp_path / "run"
    shutil.copytree(small_run, run_dir)
    (run_dir / name).write_text(text)
    before = snapshot(run_dir)
    rc, _, err = cli(capsys, "report", run_dir)
    assert_one_error(rc, err, fragment)
    assert snapshot(run_dir) == before  # the pictures already there are not redrawn from it
