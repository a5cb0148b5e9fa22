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
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (Payload, assert_one_error, cli, csv_row, npy_bytes, reseal, run_cli, snapshot, tar_members, tiny_training_objects,
                     write_csv_source, write_idx, write_manifest, write_source, write_tar)

from harness import checkpoint as ckpt
from harness import predict as predict_command
from harness.config import config_from_saved
from harness.data.idx import read_idx
from harness.data.pack import pack
from harness.data.sources import load_source
from harness.data.stream import MacroBatchStream, ShardSplit
from harness.errors import HarnessError
from harness.models import build_model
from harness.run_files import TEST_REPORT_SCHEMA, read_run_json
from harness.train import position_problem


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
    (with_config(hidden=[10_000_000]), ("model.pt: weights do not fit the mlp model of summary.json's config",
                                        "expected a torch.float32 tensor of shape (10000000, 784)")),
    (with_config(hidden=[1] * 1001), ("summary.json: its config has 1001 hidden layers; predict builds at most 1000",)),
], ids=["negative-layer", "unknown-model", "unknown-normalisation", "lr-as-text", "not-a-mapping", "no-config", "huge-layer", "many-layers"])
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
    # NaN passes the schema's bounds (every comparison with it is false); report drew "best nan%"
    ("metrics.jsonl", '{"epoch": 1, "train_loss": NaN, "val_loss": NaN, "val_accuracy": NaN}\n', "line 1: val_accuracy: nan is not a fraction from 0 to 1"),
    ("summary.json", '{"before_training": {"test_loss": 2.3, "test_accuracy": NaN}}',
     "summary.json: before_training.test_accuracy: nan is not a fraction from 0 to 1"),
], ids=["metrics-line-fields", "metrics-line-array", "metrics-accuracy", "report-no-confusion", "report-small-confusion", "summary-array",
        "metrics-nan-accuracy", "summary-nan-accuracy"])
def test_report_checks_a_runs_files_before_drawing(small_run, tmp_path, capsys, name, text, fragment):
    run_dir = tmp_path / "run"
    shutil.copytree(small_run, run_dir)
    (run_dir / name).write_text(text)
    before = snapshot(run_dir)
    rc, _, err = cli(capsys, "report", run_dir)
    assert_one_error(rc, err, fragment)
    assert snapshot(run_dir) == before  # the pictures already there are not redrawn from it


# --- checkpoints from someone else: `harness predict` and `harness train --resume auto` -------------
#
# Whoever crafts a checkpoint also writes its marker, with the payload's true size and SHA-256
# (`crafted_checkpoint`): the checks under test are the ones after the hash check.


def crafted_checkpoint(run_dir: Path, state, step: int) -> Path:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return ckpt.write_checkpoint(run_dir, buffer.getvalue(), step, epoch=0, keep=10)


def tiny_state(step: int) -> dict:
    """What Trainer.state_dict() holds, for helpers.tiny_training_objects."""
    model, optimizer, scheduler = tiny_training_objects()
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "loop": {"step": step, "epoch": 0, "last_metrics": {}, "before_training": {}},
            "rng": {"torch": [torch.get_rng_state()], "cuda": []}, "config": {"lr": 0.1}, "world_size": 1}


def resume_auto_step(run_dir: Path, caplog, skipped: Path) -> int:
    """The step `--resume auto` continues from (the newest checkpoint that loads and fits this
    run's objects), checking that it warned about `skipped` by name."""
    model, optimizer, scheduler = tiny_training_objects()

    def fits(state: dict, path: Path) -> None:
        problem = ckpt.state_mismatch(state, model, optimizer, scheduler, tiny_state(0)["loop"])
        if problem:
            raise HarnessError(f"{path}: does not fit this run's model and optimizer ({problem})")

    with caplog.at_level("WARNING", logger="harness"):
        found = ckpt.load_newest_valid(run_dir, fits)
    assert any("skipping checkpoint" in r.message and skipped.name in r.message for r in caplog.records), caplog.text
    return found[1]["loop"]["step"]


def torch_zip(pickle_bytes: bytes, compress_type: int = zipfile.ZIP_STORED) -> bytes:
    """A zip laid out as torch.save writes one, around `pickle_bytes`."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data.pkl", pickle_bytes, compress_type=compress_type)
        archive.writestr("archive/byteorder", b"little")
        archive.writestr("archive/version", b"3\n")
    return buffer.getvalue()


def write_raw_checkpoint(run_dir: Path, payload: bytes, step: int) -> Path:
    return ckpt.write_checkpoint(run_dir, payload, step, epoch=0, keep=10)


def holding_itself() -> list:
    value = []
    value.append(value)
    return value


def shared(levels: int, width: int) -> list:
    """`levels` of x = [x] * width: width**levels paths through a few bytes of pickle."""
    value = [None]
    for _ in range(levels):
        value = [value] * width
    return value


CRAFTED_CONTENTS = {  # id: (edit of a state, whether loading it fails: the others fail to fit this run)
    "step-tensor": (lambda s: s["loop"].update(step=torch.tensor([2, 2])), True),
    "config-holds-itself": (lambda s: s["config"].update(x=holding_itself()), True),
    "config-64-shared-levels": (lambda s: s["config"].update(x=shared(64, 2)), True),
    "config-15-wide-shared-levels": (lambda s: s["config"].update(x=shared(15, 10)), True),
    "last-metrics-64-shared-levels": (lambda s: s["loop"].update(last_metrics={"x": shared(64, 2)}), True),
    "stats-64-shared-levels": (lambda s: s.update(normalization_stats={"mean": shared(64, 2)}), True),
    "before-training-tensor": (lambda s: s["loop"].update(before_training=torch.tensor([1.0, 2.0])), False),
}


@pytest.mark.timeout(60)  # the shared levels made them hang
@pytest.mark.parametrize("name", CRAFTED_CONTENTS)
def test_crafted_checkpoint_contents_are_skipped_with_a_warning(tmp_path, caplog, capsys, name):
    """Tensors where numbers belong (no truth value) and containers that hold themselves or
    share one container many times over (unbounded walks) are what torch.load(weights_only=True)
    allows: `--resume auto` skips such a checkpoint for the one before, `harness predict`
    names it in one error."""
    edit, fails_to_load = CRAFTED_CONTENTS[name]
    crafted_checkpoint(tmp_path, tiny_state(1), 1)
    state = tiny_state(2)
    edit(state)
    pt = crafted_checkpoint(tmp_path, state, 2)
    assert resume_auto_step(tmp_path, caplog, pt) == 1
    if fails_to_load:
        rc, _, err = cli(capsys, "predict", pt, tmp_path / "digit.png")
        assert_one_error(rc, err, str(pt))


LAYOUT = types.SimpleNamespace(steps_per_epoch=25, macro_steps=10, macro_batches_per_epoch=3,  # macro-batches of 10, 10 and 5 steps
                                steps_in=lambda index: min(10, 25 - 10 * index))


@pytest.mark.parametrize(("edit", "fragment"), [
    ({"macro": -1}, "loop.macro: -1; an epoch here has macro-batches 0 to 2"),
    ({"macro": 3}, "loop.macro: 3; an epoch here has macro-batches 0 to 2"),
    ({"step_in_macro": -3}, "loop.step_in_macro: -3; macro-batch 1 here has steps 0 to 9"),
    ({"macro": 2, "step_in_macro": 5, "step": 75}, "loop.step_in_macro: 5; macro-batch 2 here has steps 0 to 4"),
    ({"epoch": 10**15}, "loop.step: 63; the position (epoch 1000000000000000, macro 1, step_in_macro 3) is step 25000000000000013 (25 steps an epoch)"),
    ({"epoch": -1, "step": -12}, "loop.epoch: -1; not an epoch"),
    ({"epoch_steps": 14}, "loop.epoch_steps: 14; the epoch's position is 13 steps in"),
])
def test_a_checkpoints_loop_position_must_be_one_of_this_runs_steps(edit, fragment):
    """A crafted position trained from rows outside a block (a negative macro-batch), divided
    by zero (a negative step), wrote an epoch's line with no steps in it (a macro-batch past
    the epoch's), or finished a run untrained (an epoch 10^15 in): the audit's cases. Each
    is named now; a position a run writes (epoch 3, macro-batch 1, step 3: step 63) fits."""
    position = {"epoch": 2, "macro": 1, "step_in_macro": 3, "step": 63, "epoch_steps": 13}
    assert position_problem(position, LAYOUT) is None
    assert position_problem({**position, "epoch_steps": 0}, LAYOUT) is None  # the steps its windows counted: at most the position's
    assert position_problem({**position, **edit}, LAYOUT) == fragment


def test_a_crafted_loop_position_is_one_error_naming_the_checkpoint(quick_shards, tmp_path):
    """End to end, through the checks a resumed run makes: a checkpoint of this run's with
    its macro-batch set to -1 (marker resealed) is one error naming the file and the field."""
    source = tmp_path / "source"
    train = ("--preset", "lenet", "--shards", quick_shards, "--device", "cpu", "--max-steps", "20", "--checkpoint-every", "10")
    assert run_cli("train", *train, "--run-dir", source).returncode == 0
    state = torch.load(source / "checkpoints" / "step-00000020.pt", weights_only=True)
    state["loop"]["macro"] = -1
    pt = crafted_checkpoint(tmp_path / "crafted", state, 20)
    result = run_cli("train", *train, "--max-steps", "30", "--run-dir", tmp_path / "run", "--resume", pt)
    assert_one_error(result.returncode, result.stderr, str(pt), "loop.macro: -1; an epoch here has macro-batches 0 to 0")


def test_a_checkpoint_or_model_that_would_run_code_is_refused_without_torchs_advice(small_run, tmp_path, caplog, capsys):
    """A checkpoint (its marker matching) and a model.pt that, unpickled, would create a file:
    `--resume auto` skips the checkpoint, `harness predict` refuses both in one line, and
    nothing runs. torch's refusal advises loading the file with weights_only=False "if you
    trust the source", which would run it; the harness's message says what was refused and
    leaves that advice out."""
    ran = tmp_path / "payload-ran"
    crafted_checkpoint(tmp_path, tiny_state(1), 1)
    state = tiny_state(2)
    state["model"]["payload"] = Payload(ran)
    pt = crafted_checkpoint(tmp_path, state, 2)
    assert resume_auto_step(tmp_path, caplog, pt) == 1
    model = tmp_path / "copy" / "model.pt"
    model.parent.mkdir()
    (model.parent / "summary.json").write_bytes((small_run / "summary.json").read_bytes())
    model.write_bytes(pickled(Payload(ran), "pth"))
    for path in (pt, model):
        rc, _, err = cli(capsys, "predict", path, tmp_path / "digit.png")
        line = assert_one_error(rc, err, str(path), "UnpicklingError", "only tensors and plain data are loaded")
        assert "weights_only" not in line and "trust" not in line, line
    assert "weights_only" not in caplog.text and not ran.exists(), "a file's content ran"


def deep_tuple_key(depth: int) -> bytes:
    """A checkpoint's zip whose pickle is {((...(),...),): 1}, `depth` tuples deep."""
    return torch_zip(b"\x80\x02}" + b")" + b"\x85" * depth + b"K\x01s.")


def test_a_key_of_deeply_nested_tuples_is_skipped(tmp_path, caplog):
    """str() of a key 5000 tuples deep raised RecursionError."""
    crafted_checkpoint(tmp_path, tiny_state(1), 1)
    pt = write_raw_checkpoint(tmp_path, deep_tuple_key(5000), 2)
    assert resume_auto_step(tmp_path, caplog, pt) == 1
    assert "nests tuples more than 100 deep" in caplog.text


def test_a_million_nested_tuples_are_refused_before_torch_load(tmp_path):
    """Hashing a key a million tuples deep (1 MB of pickle) crashed the interpreter inside
    torch.load (a segmentation fault; in a process of its own here for that reason)."""
    pt = write_raw_checkpoint(tmp_path, deep_tuple_key(1_000_000), 2)
    result = run_cli("predict", pt, tmp_path / "digit.png", timeout=120)
    assert_one_error(result.returncode, result.stderr, str(pt), "nests tuples more than 100 deep")


def beyond_the_file(payload: bytes) -> bytes:
    """`payload` with its central directory's first entry claiming 2 GiB (stored)."""
    entry = payload.index(b"PK\x01\x02")
    sizes = (2**31).to_bytes(4, "little") * 2  # compressed and uncompressed size
    return payload[: entry + 20] + sizes + payload[entry + 28 :]


@pytest.mark.parametrize("bomb,fragment", [
    (lambda: torch_zip(b"\x80\x02}q\x00." + bytes(64 << 20), zipfile.ZIP_DEFLATED), "record 'archive/data.pkl' is compressed"),
    (lambda: beyond_the_file(torch_zip(b"\x80\x02}q\x00.")), "its records claim 2147483"),
], ids=["deflated", "sizes-beyond-the-file"])
def test_a_checkpoint_zip_is_checked_before_torch_load_inflates_it(small_run, tmp_path, caplog, capsys, bomb, fragment):
    """torch.load reads each record of the zip whole into memory: a 64 MB record deflated to
    64 KB (1.5 GB from 1.5 MB took 3.3 GB), or one that claims more than the file holds.
    torch.save stores its records uncompressed, so a compressed one is refused, for a
    checkpoint and for the model.pt that `harness report` draws."""
    crafted_checkpoint(tmp_path, tiny_state(1), 1)
    pt = write_raw_checkpoint(tmp_path, bomb(), 2)
    assert resume_auto_step(tmp_path, caplog, pt) == 1
    assert fragment in caplog.text
    run_dir = tmp_path / "run"
    shutil.copytree(small_run, run_dir)
    (run_dir / "model.pt").write_bytes(bomb())
    rc, _, err = cli(capsys, "report", run_dir)
    assert_one_error(rc, err, "model.pt", fragment)


def run_state(small_run: Path) -> dict:
    return ckpt.load_verified(ckpt.list_checkpoints(small_run)[0])


@pytest.mark.parametrize("marker", [True, False], ids=["checkpoint", "loose-file"])
@pytest.mark.parametrize("field", ["mean", "std", "pixel_mean"])
def test_nan_normalization_statistics_are_refused(small_run, tmp_path, capsys, field, marker):
    """JSON cannot hold NaN, a pickle can, and NaN passes every bound of the statistics'
    schema (any comparison with it is false): predict printed probability nan for every class."""
    state = run_state(small_run)
    stats = {"mean": 0.13, "std": 0.31, "pixel_mean": [0.1] * 784}
    stats[field] = [0.1] * 783 + [float("nan")] if field == "pixel_mean" else float("nan")
    normalize = "unit_minus_pixel_mean" if field == "pixel_mean" else "standardize"
    state = {**state, "config": {**state["config"], "normalize": normalize}, "normalization_stats": stats}
    if marker:
        pt = crafted_checkpoint(tmp_path, state, state["loop"]["step"])
    else:
        pt = tmp_path / "crafted.pt"
        torch.save(state, pt)
    rc, _, err = cli(capsys, "predict", pt, "--shards", small_run.parent / "shards", "--index", "0")
    assert_one_error(rc, err, str(pt), f"normalization_stats.{field}", "nan is not a finite number")


def test_predict_refuses_weights_whose_storage_does_not_hold_them(small_run, tmp_path, capsys):
    """Expanded (stride-0) tensors of any shape fit in a few bytes: a 3.5 KB checkpoint whose
    config has a hidden layer of 2**31 units passed the shape check, then building its model
    asked for 6.7 TB."""
    state = run_state(small_run)
    config = {**state["config"], "hidden": [2**31]}
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in build_model(config_from_saved(config, "crafted")).state_dict().items()}
    state = {**state, "config": config, "model": {k: torch.zeros(1).expand(shape) for k, shape in shapes.items()}}
    pt = crafted_checkpoint(tmp_path, state, state["loop"]["step"])
    assert pt.stat().st_size < 100_000  # the run's optimizer state; each weight tensor 4 bytes
    rc, _, err = cli(capsys, "predict", pt, "--shards", small_run.parent / "shards", "--index", "0")
    assert_one_error(rc, err, str(pt), "weights do not fit", "storage holds 4 of its 6734508720128 bytes")


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_weights_that_are_not_finite_are_refused_by_predict_and_report(small_run, tmp_path, capsys, value):
    """A run never saves them (it refuses a non-finite state before a checkpoint): predict
    printed `probability nan` and exit 0, and `--json` printed NaN, which is not JSON;
    report drew them."""
    run_dir = tmp_path / "run"
    shutil.copytree(small_run, run_dir)
    shutil.rmtree(run_dir / "checkpoints")
    weights = torch.load(run_dir / "model.pt", weights_only=True)
    first = next(iter(weights))
    weights[first].view(-1)[5] = value
    torch.save(weights, run_dir / "model.pt")
    rc, out, err = cli(capsys, "predict", run_dir, "--shards", small_run.parent / "shards", "--index", "0", "--json")
    assert_one_error(rc, err, str(run_dir / "model.pt"), f"weights {first} hold NaN or infinite values")
    assert out == ""
    rc, _, err = cli(capsys, "report", run_dir)
    assert_one_error(rc, err, "model.pt", "hold NaN or infinite values")


def test_predict_does_not_render_postscript(small_run, tmp_path, capsys, monkeypatch):
    """Pillow opens EPS files by running Ghostscript on their PostScript, which is code from
    the file: where gs was installed, predict got as far as calling it (and ended in a
    traceback). predict opens every other format Pillow opens."""
    from PIL import EpsImagePlugin

    calls = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *args, **kwargs: calls.append(args))
    monkeypatch.setattr(EpsImagePlugin, "has_ghostscript", lambda: True)
    eps = tmp_path / "digit.eps"
    eps.write_text("%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 28 28\n0 0 moveto 28 28 lineto stroke\nshowpage\n%%EOF\n")
    rc, _, err = cli(capsys, "predict", small_run, eps)
    assert_one_error(rc, err, str(eps), "an EPS file, which predict does not read (Pillow renders it by running Ghostscript")
    assert calls == []


def test_predict_builds_models_of_a_bounded_size(small_run, capsys, monkeypatch):
    """Weights that fill the file as their config asks are refused past MAX_PARAMETERS too:
    here, a bound lowered below the small run's 12,730."""
    monkeypatch.setattr(predict_command, "MAX_PARAMETERS", 12_729)
    rc, _, err = cli(capsys, "predict", small_run, "--shards", small_run.parent / "shards", "--index", "0")
    assert_one_error(rc, err, "summary.json: its config's mlp model has 12,730 parameters; predict builds at most 12,729")


@pytest.mark.timeout(60)  # open() of the FIFO waited for a writer forever
def test_a_checkpoint_marker_that_is_a_fifo_is_skipped(small_run, tmp_path, caplog, capsys):
    """A copied or unpacked run directory can hold a FIFO where a marker belongs: it is not
    opened for reading (which blocks until something writes), and the checkpoint before it is used."""
    run_dir = tmp_path / "run"
    shutil.copytree(small_run, run_dir)
    (run_dir / "model.pt").unlink()  # predict then takes the newest valid checkpoint, as --resume auto does
    fifo = run_dir / "checkpoints" / "step-99999999.json"
    os.mkfifo(fifo)
    with caplog.at_level("WARNING", logger="harness"):
        rc, out, err = cli(capsys, "predict", run_dir, "--shards", small_run.parent / "shards", "--index", "0")
    assert rc == 0, err
    assert out.startswith("test[0]: ")
    assert f"{fifo}: unreadable checkpoint marker (not a regular file)" in caplog.text


def edit_manifest(shards: Path, edit) -> None:
    manifest = json.loads((shards / "manifest.json").read_text())
    edit(manifest)
    write_manifest(shards, manifest)


def test_manifest_mean_that_is_not_the_average_of_pixel_mean_is_refused(shards, capsys):
    """A manifest whose train mean is not the average of its per-pixel means is refused."""
    edit_manifest(shards, lambda m: m["train_stats"].update(mean=round(m["train_stats"]["mean"] + 0.01, 8)))
    rc, _, err = cli(capsys, "show", "--shards", shards, "--index", "0")
    assert_one_error(rc, err, "manifest.json", "train_stats.mean", "is not the average of pixel_mean")


def test_manifest_block_size_past_what_a_reader_decodes_is_refused(shards, capsys):
    """A block size past what a reader decodes in memory (MAX_BLOCK_SIZE) is refused by that field's name."""
    edit_manifest(shards, lambda m: m["splits"]["test"].update(block_size=100_001))
    rc, _, err = cli(capsys, "show", "--shards", shards, "--split", "test", "--index", "0")
    assert_one_error(rc, err, "manifest.json", "splits.test.block_size", "greater than the maximum")


@pytest.mark.parametrize("edit", [lambda p: p + b"\0", lambda p: p[:-1]], ids=["one-more", "one-less"])
def test_labels_npy_whose_data_is_not_its_headers_length_is_refused(shards, capsys, edit):
    """A labels .npy one byte longer or shorter than its header says is one error (it would be a ValueError traceback)."""
    path = shards / "train-000000.tar"
    payload = edit(npy_bytes(np.zeros(20, np.uint8)))
    write_tar(path, [(n, payload if n == "train-00000000.labels.npy" else p) for n, p in tar_members(path)])
    reseal(shards)
    rc, _, err = cli(capsys, "show", "--shards", shards, "--index", "0")
    assert_one_error(rc, err, "train-000000.tar", "train-00000000.labels.npy", "data bytes")


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gzip"])
def test_read_idx_refuses_trailing_and_missing_bytes(tmp_path, gz):
    """The whole-file IDX reader (library and bench code) refuses trailing and missing bytes, as the streaming one does."""
    import gzip

    path = tmp_path / ("labels.gz" if gz else "labels")
    write_idx(path, np.arange(10) % 10, gz)
    data = gzip.decompress(path.read_bytes()) if gz else path.read_bytes()
    for changed, fragment in ((data + b"\0", "has trailing bytes"), (data[:-1], "truncated")):
        path.write_bytes(gzip.compress(changed) if gz else changed)
        with pytest.raises(HarnessError, match=fragment):
            read_idx(path, 1)


@pytest.mark.parametrize("bad,column", [("\x0b7", 102), ("7#x", 785)], ids=["vertical-tab", "comment-mark"])
def test_csv_fields_numpy_alone_would_accept_are_refused(tmp_path, capsys, bad, column):
    """Fields numpy alone would take are refused: numpy strips
    \\v and treats # as a comment, so both rows were packed as if they said 7."""
    pixels = [0] * 784
    pixels[column - 2] = bad
    source = write_csv_source(tmp_path / "src", [csv_row(1), csv_row(2, pixels)])
    rc, _, err = cli(capsys, "pack", "--source", source, "--out", tmp_path / "out")
    assert_one_error(rc, err, "mnist_train.csv", f"line 3, field {column}", "is not an integer")
    assert not (tmp_path / "out").exists()


def test_test_report_with_a_negative_count_is_refused(tmp_path):
    """A test report with a negative confusion count is refused (it would be drawn)."""
    confusion = np.eye(10, dtype=int).tolist()
    confusion[0][1] = -5
    (tmp_path / "test_report.json").write_text(json.dumps({"confusion": confusion}))
    with pytest.raises(HarnessError, match=r"test_report.json: confusion\[0\]\[1\]: -5 is less than the minimum of 0"):
        read_run_json(tmp_path / "test_report.json", TEST_REPORT_SCHEMA, "test report")


@pytest.mark.parametrize("index", [-1, 50])
def test_an_index_outside_the_split_is_refused(shards, capsys, index):
    """--index outside the split is refused, below it too (-1 would classify the last image
    as test[-1]), by predict and show alike."""
    names, images, labels, errors = predict_command.shard_images(shards, "test", [index, 3])
    _, all_labels = ShardSplit(shards, "test").load_all()
    assert (names, labels, len(images)) == (["test[3]"], [int(all_labels[3])], 1)  # the index inside is still read
    assert errors == [{"input": f"test[{index}]", "error": f"{shards}: --index {index} is outside the test split's 50 images"}]
    rc, _, err = cli(capsys, "show", "--shards", shards, "--split", "test", "--index", str(index))
    assert_one_error(rc, err, f"{shards}: --index {index} is outside the test split's 50 images")
