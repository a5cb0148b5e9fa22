"""Seeded mutation fuzzing of what the harness reads: IDX files, CSV files, manifests,
shards and checkpoint markers. Shared by tests/test_fuzz.py (a CI-sized run) and
bench/fuzz_inputs.py (a larger one); `run_cases(kind, seeds, work)` is the whole API.

Each case copies a small valid input, mutates it (byte-level: bit flips, truncation,
insertions, interesting integers; and format-aware: IDX headers, CSV fields and line
breaks, JSON values, tar members, .npy headers, crafted pickles) and runs the harness's
own entry point on it: `harness pack` for sources, `harness show` plus a full read of
both splits for shard sets, `load_newest_valid` (what `--resume auto` does) for
checkpoints. The invariant, checked for every case:

- it is accepted, and what was read equals an independent decoding of the mutated input
  (tarfile + np.load(allow_pickle=False), gzip + struct, a plain CSV split; for a
  checkpoint, its marker's size, SHA-256 and step recomputed, and torch.load's state
  compared bit for bit): no unchecked byte is trained on; or
- it is refused with exactly one stderr line `error: ...` that names a file of the input
  (for checkpoints: a warning naming the skipped file, and the previous one is used);
- and never a Python traceback or any other exception, never more than CASE_TIMEOUT_S
  seconds, never a payload run (crafted pickles create a marker file if unpickled), never
  a change to the input files.
"""

from __future__ import annotations

import contextlib
import copy
import gzip
import hashlib
import io
import json
import logging
import pickle
import re
import shutil
import signal
import tarfile
import time
import types
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from helpers import Payload, npy_bytes, reseal, tar_members, tiny_training_objects, write_idx, write_tar

from harness import checkpoint as ckpt
from harness import errors as errors_module
from harness.cli import main as cli_main
from harness.data.pack import pack
from harness.data.sources import load_source
from harness.data.stream import ShardSplit
from harness.errors import HarnessError

KINDS = ("idx", "csv", "manifest", "shards", "markers")
CASE_TIMEOUT_S = 20
INTERESTING_INTS = [0, 1, -1, 2, 10, 27, 28, 29, 255, 256, 65535, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63, 10**30]
INTERESTING_VALUES = [
    *INTERESTING_INTS, 0.5, -0.0, 1e-300, 1e308, 3.5, "", "x" * 5000, "../x", "/etc/passwd", "pipe:touch PWNED",
    "{0,1}", "${HOME}", "a::b", "train-000000.tar", "test-000000.tar", "train-000001.tar", None, True, False, [], {},
    [28, 28], [28, 28, 1], {"a": 1},
]
CSV_TOKENS = ["", " ", "-1", "+5", "256", "1e3", "0x10", "1.0", "nan", "9" * 30, ",", "\n", "\r", "\r\n", "\x0b", "\x0c",
              "\x1c", "\x85", "\u2028", "\x00", "\xff", "é", '"', "#", "label"]
TAR_NAMES = ["train-00000000.payload.pickle", "train-00000000.x.pth", "../train-00000000.meta.json", "README",
             "train-00000000.images.npy", "train-00000020.images.npy", "test-00000000.labels.npy", "train-0000000.meta.json",
             "train-00000000.IMAGES.NPY", "/abs/train-00000000.meta.json", "train-00000000.images.npy/"]


@dataclass
class Outcome:
    kind: str
    seed: int
    verdict: str  # accepted | refused_by_name | refused_other | failure
    detail: str = ""


@dataclass
class Tally:
    counts: dict = field(default_factory=dict)
    failures: list = field(default_factory=list)

    def add(self, outcome: Outcome) -> None:
        self.counts[outcome.verdict] = self.counts.get(outcome.verdict, 0) + 1
        if outcome.verdict in ("failure", "refused_other"):
            self.failures.append(outcome)


# --- byte-level mutations ----------------------------------------------------------------------------


def mutate_bytes(rng: np.random.Generator, data: bytes, focus: int | None = None) -> bytes:
    """1-3 random edits; `focus` (a length) makes the edits land in data[:focus] half the time."""
    data = bytearray(data)
    for _ in range(int(rng.integers(1, 4))):
        span = focus if focus and rng.random() < 0.5 else len(data)
        at = int(rng.integers(0, max(span, 1)))
        op = int(rng.integers(0, 7))
        if op == 0 and data:
            data[min(at, len(data) - 1)] ^= 1 << int(rng.integers(0, 8))
        elif op == 1 and data:
            data[min(at, len(data) - 1)] = int(rng.choice([0, 0x7F, 0x80, 0xFF, 0x20, 0x0A]))
        elif op == 2:
            del data[at:]
        elif op == 3:
            data[at:at] = rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8).tobytes()
        elif op == 4:
            del data[at : at + int(rng.integers(1, 512))]
        elif op == 5:
            data[at:at] = data[at : at + int(rng.integers(1, 2048))]
        else:
            value = int(rng.choice(INTERESTING_INTS)) % 2**32
            data[at : at + 4] = value.to_bytes(4, str(rng.choice(["big", "little"])))
    return bytes(data)


def mutate_json(rng: np.random.Generator, document):
    """A copy of `document` with one value replaced, one key removed or added."""
    document = copy.deepcopy(document)
    parent, key = _random_slot(rng, document)
    if parent is None:
        return rng.choice(np.array(INTERESTING_VALUES, dtype=object))
    op = int(rng.integers(0, 4))
    if op == 0 and isinstance(parent, dict):
        del parent[key]
    elif op == 1 and isinstance(parent, dict):
        parent[str(rng.choice(["extra", "split", "first", "count", "samples", "__proto__"]))] = 1
    elif op == 2 and isinstance(parent[key], (int, float)) and not isinstance(parent[key], bool):
        parent[key] = parent[key] + int(rng.choice([-1, 1, 1000, -1000]))
    else:
        parent[key] = copy.deepcopy(INTERESTING_VALUES[int(rng.integers(0, len(INTERESTING_VALUES)))])
    return document


def _random_slot(rng, document):
    """(container, key) of a random value inside `document`, or (None, None) for the root."""
    slots, stack = [], [document]
    while stack:
        node = stack.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
        for key, value in items:
            slots.append((node, key))
            if isinstance(value, (dict, list)) and len(slots) < 5000:
                stack.append(value)
    if not slots or rng.random() < 0.02:
        return None, None
    return slots[int(rng.integers(0, len(slots)))]


def json_text(rng, document) -> bytes:
    text = json.dumps(document, indent=1).encode()
    return mutate_bytes(rng, text) if rng.random() < 0.3 else text


# --- the seed inputs -----------------------------------------------------------------------------------


def dataset_arrays(seed: int = 0, n_train: int = 60, n_test: int = 20):
    rng = np.random.default_rng(seed)
    return {
        "train": (rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8), rng.integers(0, 10, n_train, dtype=np.uint8)),
        "t10k": (rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8), rng.integers(0, 10, n_test, dtype=np.uint8)),
    }


def make_idx_source(directory: Path) -> Path:
    directory.mkdir(parents=True)
    for prefix, (images, labels) in dataset_arrays().items():
        write_idx(directory / f"{prefix}-images-idx3-ubyte.gz", images, gz=True)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte", labels, gz=False)
    return directory


def make_csv_source(directory: Path) -> Path:
    directory.mkdir(parents=True)
    header = ",".join(["label"] + [f"pixel{i}" for i in range(784)])
    for name, (images, labels) in zip(("mnist_train.csv", "mnist_test.csv"), dataset_arrays(n_train=8, n_test=4).values()):
        rows = [",".join(map(str, [int(label), *image.reshape(-1).tolist()])) for image, label in zip(images, labels)]
        (directory / name).write_text("\n".join([header, *rows]) + "\n")
    return directory


def make_shards(directory: Path, source: Path) -> Path:
    pack(load_source(source), directory, shard_size=40, block_size=20)
    return directory


def make_run_dir(directory: Path) -> Path:
    model, optimizer, scheduler = tiny_training_objects()
    for step in (1, 2):
        ckpt.save_checkpoint(directory, tiny_state(model, optimizer, scheduler, step), step=step, epoch=0, keep=5)
    return directory


def tiny_state(model, optimizer, scheduler, step: int) -> dict:
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "loop": {"step": step, "epoch": 0, "last_metrics": {}}, "rng": {"torch": [torch.get_rng_state()], "cuda": []},
            "config": {"lr": 0.1}, "world_size": 1}


class Seeds:
    """The valid inputs every case starts from, built once in `work`."""

    def __init__(self, work: Path):
        self.work = Path(work)
        self.idx = make_idx_source(self.work / "seed-idx")
        self.csv = make_csv_source(self.work / "seed-csv")
        self.shards = make_shards(self.work / "seed-shards", self.idx)
        self.run_dir = make_run_dir(self.work / "seed-run")
        self.packed = {split: ShardSplit(self.shards, split).load_all() for split in ("train", "test")}


# --- the oracle: run the harness, classify what happened -------------------------------------------------------


def run_cli(*args) -> tuple[int, str]:
    """`harness ARGS` in this process: (exit status, stderr). An exception escaping it is a
    traceback. run_guarded's gc.collect (there for a failed run's DDP process group) is
    skipped: in a process that has imported torch it takes 0.2 s, 90% of a case here."""
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out), _no_gc_collect():
        rc = cli_main([str(a) for a in args])
    return rc, err.getvalue()


@contextlib.contextmanager
def _no_gc_collect():
    real = errors_module.gc
    errors_module.gc = types.SimpleNamespace(collect=lambda: 0)
    try:
        yield
    finally:
        errors_module.gc = real


def refusal(rc: int, err: str, input_dir: Path, mutated: Path) -> str:
    """The verdict for a non-zero exit: one `error:` line naming a file of the input."""
    lines = err.strip().splitlines()
    if rc != 2 or len(lines) != 1 or not lines[0].startswith("error: "):
        return f"failure: exit {rc}, stderr {err[-500:]!r}"
    if mutated.name in lines[0] or str(input_dir) in lines[0]:
        return "refused_by_name"
    return f"refused_other: {lines[0][:300]}"


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


# --- sources: IDX and CSV ------------------------------------------------------------------------------


def mutate_idx(rng, directory: Path) -> Path:
    path = sorted(directory.iterdir())[int(rng.integers(0, 4))]
    data = path.read_bytes()
    if path.suffix == ".gz" and rng.random() < 0.7:  # mutate the content, recompress: the IDX parser sees it
        path.write_bytes(gzip.compress(mutate_bytes(rng, gzip.decompress(data), focus=16), mtime=0))
    elif rng.random() < 0.1:  # a gzip bomb: the valid content, then a lot of zeros
        path.write_bytes(data + gzip.compress(bytes(1 << 24), compresslevel=1))
    else:
        path.write_bytes(mutate_bytes(rng, data, focus=16))
    return path


def mutate_csv(rng, directory: Path) -> Path:
    path = sorted(directory.iterdir())[int(rng.integers(0, 2))]
    text = path.read_bytes().decode("latin-1")
    lines = text.split("\n")
    for _ in range(int(rng.integers(1, 3))):
        line_no = int(rng.integers(0, len(lines)))
        fields = lines[line_no].split(",")
        op = int(rng.integers(0, 5))
        if op == 0:
            fields[int(rng.integers(0, len(fields)))] = str(rng.choice(CSV_TOKENS))
        elif op == 1:
            at = int(rng.integers(0, len(lines[line_no]) + 1))
            lines[line_no] = lines[line_no][:at] + str(rng.choice(CSV_TOKENS)) + lines[line_no][at:]
            continue
        elif op == 2:
            del lines[line_no]
            continue
        elif op == 3:
            lines.insert(line_no, lines[line_no])
            continue
        else:
            del fields[int(rng.integers(0, len(fields)))]
        lines[line_no] = ",".join(fields)
    data = "\n".join(lines).encode("utf-8" if rng.random() < 0.5 else "latin-1", errors="replace")
    path.write_bytes(mutate_bytes(rng, data) if rng.random() < 0.2 else data)
    return path


def reference_idx(directory: Path) -> dict | None:
    """The source decoded independently (whole-file gzip, struct-free header parse); None if
    it is not a valid pair of IDX splits as the format defines them."""
    arrays = {}
    for prefix, split in (("train", "train"), ("t10k", "test")):
        images = _reference_idx_file(directory, f"{prefix}-images-idx3-ubyte", 3)
        labels = _reference_idx_file(directory, f"{prefix}-labels-idx1-ubyte", 1)
        if images is None or labels is None or images.shape[1:] != (28, 28) or len(images) != len(labels) or not len(labels) or labels.max() > 9:
            return None
        arrays[split] = (images, labels)
    return arrays


def _reference_idx_file(directory: Path, stem: str, ndim: int):
    paths = [p for p in (directory / stem, directory / f"{stem}.gz") if p.is_file()]
    if len(paths) != 1:
        return None
    data = paths[0].read_bytes()
    try:
        data = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
    except Exception:  # noqa: BLE001 (any failure: not valid)
        return None
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    if data[:4] != bytes([0, 0, 8, ndim]) or len(data) != 4 + 4 * ndim + int(np.prod(dims, dtype=object)):
        return None
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def reference_csv(directory: Path) -> dict | None:
    """The CSV source parsed by the format's definition (harness/data/csv_source.py's
    docstring), with Python's re and int instead of numpy."""
    arrays = {}
    for name, split in (("mnist_train.csv", "train"), ("mnist_test.csv", "test")):
        lines = [line.removesuffix(b"\r") for line in (directory / name).read_bytes().split(b"\n")]
        first = lines[0].split(b",") if lines else []
        if len(first) == 785 and not any(re.fullmatch(rb"[ \t]*[+-]?[0-9]+[ \t]*", field) for field in first):  # a header
            lines = lines[1:]
        rows = [line.split(b",") for line in lines if line.strip(b" \t")]
        if not rows or any(len(r) != 785 or not all(re.fullmatch(rb"[ \t]*[+-]?[0-9]+[ \t]*", f) for f in r) for r in rows):
            return None
        table = np.array([[int(f) for f in row] for row in rows], dtype=object)
        if table[:, 1:].min() < 0 or table[:, 1:].max() > 255 or table[:, 0].min() < 0 or table[:, 0].max() > 9:
            return None
        arrays[split] = (table[:, 1:].astype(np.uint8).reshape(-1, 28, 28), table[:, 0].astype(np.uint8))
    return arrays


def check_source(kind: str, seeds: Seeds, case_dir: Path, rng) -> str:
    source = case_dir / "src"
    shutil.copytree(seeds.idx if kind == "idx" else seeds.csv, source)
    mutated = (mutate_idx if kind == "idx" else mutate_csv)(rng, source)
    reference = (reference_idx if kind == "idx" else reference_csv)(source)
    before, out = snapshot(source), case_dir / "out"
    rc, err = run_cli("pack", "--source", source, "--out", out, "--shard-size", "40", "--block-size", "20")
    if snapshot(source) != before:
        return "failure: the input files changed"
    if rc != 0:
        verdict = refusal(rc, err, source, mutated)
        if verdict == "refused_by_name" and reference is not None:
            return f"refused_other: a valid source was refused: {err.strip()[:300]}"
        return verdict
    if reference is None:
        return "failure: accepted a source that is not valid by the format's definition"
    return compare_packed(out, reference)


def compare_packed(shards: Path, reference: dict) -> str:
    for split, (images, labels) in reference.items():
        got_images, got_labels = ShardSplit(shards, split).load_all()
        if not (np.array_equal(got_images, images) and np.array_equal(got_labels, labels)):
            return f"failure: the {split} split read back differs from the source's own bytes"
    return "accepted"


# --- shard sets: the manifest and the shards -------------------------------------------------------------------


def mutate_manifest(rng, shards: Path) -> Path:
    path = shards / "manifest.json"
    path.write_bytes(json_text(rng, mutate_json(rng, json.loads(path.read_text()))))
    return path


def mutate_shard(rng, shards: Path, marker: Path) -> Path:
    path = sorted(shards.glob("*.tar"))[int(rng.integers(0, 3))]
    if rng.random() < 0.3:
        path.write_bytes(mutate_bytes(rng, path.read_bytes(), focus=512))
    else:
        write_tar(path, mutate_members(rng, tar_members(path), marker))
    if rng.random() < 0.9:  # the manifest travels with the shards: make it match, so the reader sees the mutation
        reseal(shards)
    return path


def mutate_members(rng, members: list, marker: Path) -> list:
    members = list(members)
    at = int(rng.integers(0, len(members)))
    name, payload = members[at]
    op = int(rng.integers(0, 7))
    if op == 0:
        members[at] = (name, mutate_bytes(rng, payload, focus=128))
    elif op == 1:
        members[at] = (str(rng.choice(TAR_NAMES)), payload)
    elif op == 2:
        del members[at]
    elif op == 3:
        members.insert(int(rng.integers(0, len(members) + 1)), members[at])
    elif op == 4:
        members.insert(at, (str(rng.choice(TAR_NAMES[:2])), pickle.dumps(Payload(marker))))
    elif op == 5:
        members[at] = (name, random_npy(rng, marker))
    else:
        members[at], members[-1] = members[-1], members[at]
    return members


def random_npy(rng, marker: Path) -> bytes:
    if rng.random() < 0.15:
        crafted = np.empty(20, dtype=object)
        crafted[:] = [Payload(marker)] * 20
        return npy_bytes(crafted, allow_pickle=True)
    dtype = rng.choice(["uint8", "int8", "int16", "float32", "uint8", ">u2", "bool"])
    shape = [(20, 28, 28), (20,), (19, 28, 28), (21,), (20, 28, 27), (0,), (20, 784), ()][int(rng.integers(0, 8))]
    array = rng.integers(0, 12, shape).astype(dtype)
    return npy_bytes(np.asfortranarray(array) if rng.random() < 0.2 else array)


def reference_shards(shards: Path) -> dict | None:
    """Both splits decoded independently: tarfile, np.load(allow_pickle=False), json; None
    unless every block is three members, uint8, 28x28, labels 0..9, in index order."""
    try:
        manifest = json.loads((shards / "manifest.json").read_text())
        return {split: _reference_split(shards, manifest, split) for split in ("train", "test")}
    except Exception:  # noqa: BLE001 (anything wrong: not a valid shard set)
        return None


def _reference_split(shards: Path, manifest: dict, split: str):
    images, labels, expected_first = [], [], 0
    for shard in manifest["splits"][split]["shards"]:
        members = tar_members(shards / shard["name"])
        with tarfile.open(shards / shard["name"]) as tar:
            assert all(m.isreg() for m in tar)
        assert len(members) % 3 == 0
        for k in range(0, len(members), 3):
            block = dict(members[k : k + 3])
            key = f"{split}-{expected_first:08d}"
            assert sorted(block) == [f"{key}.images.npy", f"{key}.labels.npy", f"{key}.meta.json"]
            block_images = np.load(io.BytesIO(block[f"{key}.images.npy"]), allow_pickle=False)
            block_labels = np.load(io.BytesIO(block[f"{key}.labels.npy"]), allow_pickle=False)
            meta = json.loads(block[f"{key}.meta.json"])
            assert block_images.dtype == np.uint8 and block_images.shape == (len(block_labels), 28, 28) and block_labels.dtype == np.uint8
            assert meta == {"split": split, "first": expected_first, "count": len(block_labels)} and block_labels.max() <= 9
            images.append(block_images)
            labels.append(block_labels)
            expected_first += len(block_labels)
    assert expected_first == manifest["splits"][split]["samples"]
    return np.concatenate(images), np.concatenate(labels)


def check_shard_set(kind: str, seeds: Seeds, case_dir: Path, rng) -> str:
    shards, marker = case_dir / "shards", case_dir / "payload-ran"
    shutil.copytree(seeds.shards, shards)
    mutated = mutate_manifest(rng, shards) if kind == "manifest" else mutate_shard(rng, shards, marker)
    before = snapshot(shards)
    # `show` reads the shard that holds its index (train-000001 holds images 40..59); a
    # full read of both splits, as training does, follows when it succeeds.
    split, index = ("test", 0) if mutated.name.startswith("test") else ("train", 40 * int(mutated.name[-5:-4] == "1"))
    rc, err = run_cli("show", "--shards", shards, "--split", split, "--index", index)
    verdict = refusal(rc, err, shards, mutated) if rc else read_everything(shards, mutated)
    if marker.exists():
        return "failure: a crafted pickle ran"
    if snapshot(shards) != before:
        return "failure: the input files changed"
    if verdict == "accepted":
        reference = reference_shards(shards)
        if reference is None:
            return "failure: accepted a shard set that is not valid by the format's definition"
        return compare_packed(shards, {s: reference[s] for s in reference})
    return verdict


def read_everything(shards: Path, mutated: Path) -> str:
    """What training reads: both splits in full, and statistics it can divide by."""
    try:
        for split in ("train", "test"):
            ShardSplit(shards, split).load_all()
        stats = ShardSplit(shards, "test").manifest["train_stats"]
    except HarnessError as e:
        return refusal(2, f"error: {e}\n", shards, mutated)
    if not (np.isfinite(1.0 / (255.0 * np.float32(stats["std"]))) and np.isfinite(stats["mean"])):
        return "failure: accepted statistics that do not normalise"
    return "accepted"


# --- checkpoints ---------------------------------------------------------------------------------------


def mutate_checkpoint(rng, run_dir: Path) -> Path:
    marker = run_dir / "checkpoints" / "step-00000002.json"
    pt = marker.with_suffix(".pt")
    if rng.random() < 0.7:
        marker.write_bytes(json_text(rng, mutate_json(rng, json.loads(marker.read_text()))))
        return marker
    pt.write_bytes(mutate_bytes(rng, pt.read_bytes()) if rng.random() < 0.8 else pickle.dumps(Payload(run_dir / "payload-ran")))
    if rng.random() < 0.8:  # resealed: the bytes reach torch.load
        payload = pt.read_bytes()
        meta = json.loads(marker.read_text())
        marker.write_text(json.dumps({**meta, "bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}))
    return pt


def check_markers(kind: str, seeds: Seeds, case_dir: Path, rng) -> str:
    run_dir = case_dir / "run"
    shutil.copytree(seeds.run_dir, run_dir)
    mutated = mutate_checkpoint(rng, run_dir)
    before = snapshot(run_dir)
    model, optimizer, scheduler = tiny_training_objects()

    def fits(state, path):
        problem = ckpt.state_mismatch(state, model, optimizer, scheduler, {"step": 0, "epoch": 0, "last_metrics": {}})
        if problem:
            raise HarnessError(f"{path}: does not fit ({problem})")

    records = _ListHandler()
    logging.getLogger("harness").addHandler(records)
    try:
        found = ckpt.load_newest_valid(run_dir, fits)
    finally:
        logging.getLogger("harness").removeHandler(records)
    if (run_dir / "payload-ran").exists():
        return "failure: a crafted pickle ran"
    if snapshot(run_dir) != before:
        return "failure: the input files changed"
    if found is None:
        return "failure: no checkpoint was found, though step 1 is intact"
    step = found[1]["loop"]["step"]
    if step == 2:
        if records.messages:
            return f"failure: step 2 used after warnings {records.messages}"
        return independently_verified_checkpoint(run_dir / "checkpoints" / "step-00000002.json", found[1])
    named = [m for m in records.messages if "skipping checkpoint" in m and mutated.stem in m]
    return "refused_by_name" if step == 1 and named else f"refused_other: step {step}, warnings {records.messages}"


def independently_verified_checkpoint(marker: Path, loaded: dict) -> str:
    """"accepted" if the (mutated) marker is a well-formed record of its .pt's size, SHA-256
    and step, and `loaded` is what torch.load alone reads from that .pt; else the failure."""
    try:
        meta = json.loads(marker.read_bytes())
    except ValueError:
        return "failure: accepted a marker that is not JSON"
    payload = marker.with_suffix(".pt").read_bytes()
    expected = {"file": marker.with_suffix(".pt").name, "bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest(), "step": 2}
    if not isinstance(meta, dict) or any(meta.get(key) != value or type(meta.get(key)) is not type(value) for key, value in expected.items()):
        return f"failure: accepted a marker that does not record its checkpoint ({meta!r:.200})"
    if type(meta.get("epoch")) is not int or meta["epoch"] < 0:
        return f"failure: accepted a marker whose epoch is {meta.get('epoch')!r:.50}"
    decoded = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    difference = first_difference(decoded, loaded)
    return "accepted" if difference is None else f"failure: the loaded state differs from the file at {difference}"


def first_difference(a, b, where: str = "state") -> str | None:
    """Where two loaded states first differ (types, keys, values; tensors bit for bit), or None."""
    if type(a) is not type(b):
        return f"{where} ({type(a).__name__} against {type(b).__name__})"
    if isinstance(a, torch.Tensor):
        def as_bytes(t):  # bit for bit: a mutated value may be a NaN, which torch.equal finds unequal to itself
            return t.detach().contiguous().reshape(-1).view(torch.uint8)

        same = a.dtype == b.dtype and a.shape == b.shape and torch.equal(as_bytes(a), as_bytes(b))
        return None if same else where
    if isinstance(a, dict):
        if list(a) != list(b):
            return f"{where} (keys)"
        return next((d for k in a if (d := first_difference(a[k], b[k], f"{where}[{k!r}]"))), None)
    if isinstance(a, (list, tuple)):
        if len(a) != len(b):
            return f"{where} (length)"
        return next((d for i, (x, y) in enumerate(zip(a, b)) if (d := first_difference(x, y, f"{where}[{i}]"))), None)
    same = a == b or (isinstance(a, float) and a != a and b != b)  # NaN, as a mutated float may be
    return None if same else where


class _ListHandler(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


# --- running cases ----------------------------------------------------------------------------------------


CHECKS = {"idx": check_source, "csv": check_source, "manifest": check_shard_set, "shards": check_shard_set, "markers": check_markers}


class _Timeout(BaseException):
    """Raised by the alarm: a BaseException, so that no `except Exception` in the code under test swallows it."""


def _alarm(signum, frame):
    raise _Timeout()


def run_case(kind: str, seed: int, seeds: Seeds, work: Path) -> Outcome:
    """One mutated input of `kind`, from `seed`; its directory is removed afterwards."""
    case_dir = Path(work) / f"case-{kind}-{seed}"
    rng = np.random.default_rng([KINDS.index(kind), seed])
    # pytest-timeout's own alarm uses the same timer: it is put back, less the case's time
    # (and the case's alarm never outlasts it).
    outer = signal.getitimer(signal.ITIMER_REAL)[0]
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, min(CASE_TIMEOUT_S, outer) if outer else CASE_TIMEOUT_S)
    started = time.monotonic()
    try:
        verdict = CHECKS[kind](kind, seeds, case_dir, rng)
    except _Timeout:
        verdict = f"failure: no verdict within {CASE_TIMEOUT_S} s (a hang)"
    except Exception as e:  # noqa: BLE001 (an exception escaping the harness is what this looks for)
        verdict = f"failure: {type(e).__name__} escaped: {str(e)[:300]}"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer:
            signal.setitimer(signal.ITIMER_REAL, max(outer - (time.monotonic() - started), 0.001))
        shutil.rmtree(case_dir, ignore_errors=True)
    name, _, detail = verdict.partition(": ")
    return Outcome(kind, seed, name, detail)


def run_cases(kind: str, seeds_range, seeds: Seeds, work: Path, budget_s: float | None = None) -> Tally:
    """Run the cases of `kind` for each seed in `seeds_range` (stopping early when `budget_s` runs out)."""
    tally, started = Tally(), time.monotonic()
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for seed in seeds_range:
            if budget_s is not None and time.monotonic() - started > budget_s:
                break
            tally.add(run_case(kind, seed, seeds, work))
    finally:
        torch.set_num_threads(torch_threads)
    return tally
