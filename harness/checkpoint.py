"""Checkpoints in RUN_DIR/checkpoints/: written atomically by rank 0, verified on load.

A checkpoint is two files: `step-NNNNNNNN.pt` (the training state, torch.save) and
`step-NNNNNNNN.json` (its SHA-256, size, epoch and step). The .pt is written first
(temporary file, fsync, rename) and the .json after it, so the .json is the commit
marker: a crash mid-write leaves no .json, and a .pt that was damaged later fails
its SHA-256 check. Loading falls back to the newest checkpoint that verifies.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import logging
import math
import os
import pickle
import pickletools
import re
import reprlib
import time
import warnings
import zipfile
from pathlib import Path

import torch

from harness.atomic import fsync_dir, torch_bytes, write_bytes_atomic, write_json_atomic
from harness.config import changed_fields
from harness.data.manifest import STATS_SCHEMA
from harness.errors import HarnessError, SystemRefused
from harness.validation import first_violation, one_line, open_regular_file, plain_data_problem, printable, read_json_file

log = logging.getLogger("harness")

CHECKPOINT_DIR = "checkpoints"


def save_checkpoint(run_dir: Path, state: dict, step: int, epoch: int, keep: int) -> Path:
    """Write the state for `step`, then delete all but the newest `keep` checkpoints. Rank 0
    runs it on its background writer (harness.background), on a copy of the state."""
    return write_checkpoint(run_dir, torch_bytes(state), step, epoch, keep)


def write_checkpoint(run_dir: Path, payload: bytes, step: int, epoch: int, keep: int) -> Path:
    """Write `payload` (a state serialised by torch_bytes) as the checkpoint of `step`, then
    delete all but the newest `keep` checkpoints up to it.

    A committed checkpoint is never replaced: between the two renames the old marker would
    not match the new payload, and a failed write would take the good one with it. The
    loop checkpoints a step at most once, and a resumed run sets aside the checkpoints
    past its start (`set_aside_checkpoints_after`), so only a second run writing into the
    same RUN_DIR meets this."""
    directory = Path(run_dir) / CHECKPOINT_DIR
    path = directory / f"step-{step:08d}.pt"
    if path.with_suffix(".json").exists():
        raise HarnessError(f"{path}: a checkpoint of step {step} exists already and is kept; is another run writing to {run_dir}?")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(path, payload)
        meta = {"file": path.name, "sha256": hashlib.sha256(payload).hexdigest(), "bytes": len(payload), "step": step, "epoch": epoch}
        write_json_atomic(path.with_suffix(".json"), meta)
        fsync_dir(directory)
    except OSError as e:
        path.unlink(missing_ok=True)  # no marker was written, or it is being removed with its payload
        path.with_suffix(".json").unlink(missing_ok=True)
        raise SystemRefused(f"{path}: could not write checkpoint ({e.strerror or e}); the previous checkpoints are intact") from None
    older = [marker for marker in list_checkpoints(run_dir) if marker_step(marker) < step]
    for old in older[keep - 1 :]:
        old.with_suffix(".pt").unlink(missing_ok=True)
        old.unlink(missing_ok=True)
    return path


def set_aside_checkpoints_after(run_dir: Path, step: int, start: str = "") -> Path | None:
    """Move the checkpoints of steps after `step`, the one a run starts from (0: a fresh
    start, or one from another run's checkpoint), into checkpoints/set-aside-TIME/, and say
    so (`start`: how this run starts, for that line). They are from a run this one does
    not continue: damaged ones the resume skipped, or newer ones when --resume named an
    older checkpoint. Left in place, they would outrank the new checkpoints (resume and
    pruning go by step number); moved, nothing is lost. Returns that folder, or None."""
    directory = Path(run_dir) / CHECKPOINT_DIR
    later = [p for p in directory.glob("step-*") if (m := CHECKPOINT_NAME.fullmatch(p.name)) and int(m["step"]) > step]
    if not later:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = directory / f"set-aside-{stamp}"
    try:
        for n in itertools.count(1):  # a folder of its own, even when two starts share a second
            try:
                aside.mkdir()
                break
            except FileExistsError:
                aside = directory / f"set-aside-{stamp}-{n}"
        for path in later:
            path.rename(aside / path.name)
        fsync_dir(directory)
    except OSError as e:
        raise HarnessError(f"{aside}: could not set aside the checkpoints after step {step} ({e.strerror or e})") from None
    names = sorted({p.with_suffix("").name for p in later})
    start = start or (f"continues from step {step}" if step else "starts afresh")
    log.warning(f"moved checkpoint(s) {', '.join(names)} to {aside}: this run {start}, not from them")
    return aside


MARKER_NAME = re.compile(r"step-(?P<step>[0-9]{1,18})\.json")
CHECKPOINT_NAME = re.compile(r"step-(?P<step>[0-9]{1,18})\.(json|pt)")  # a marker or a payload
MARKER_MAX_BYTES = 65536  # a marker is ~150 bytes
MAX_CHECKPOINT_BYTES = 1 << 40  # far above any model here; only keeps the number sane
MARKER_SCHEMA = {
    "type": "object",
    "properties": {
        "file": {"type": "string"},
        "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
        "bytes": {"type": "integer", "minimum": 1, "maximum": MAX_CHECKPOINT_BYTES},
        "step": {"type": "integer", "minimum": 0},
        "epoch": {"type": "integer", "minimum": 0},
    },
    "required": ["file", "sha256", "bytes", "step", "epoch"],
}
# What every checkpoint holds at its top level (Trainer.state_dict); `fits` checks the rest.
STATE_KEYS = {"model", "optimizer", "scheduler", "loop", "rng", "config", "world_size"}
# Held by checkpoints written since it was added, absent from older ones (which still resume).
# normalization_stats: what `harness predict` normalises with; shard_set_sha256: the data
# (manifest.shard_set_sha256), which a resumed run must share.
OPTIONAL_STATE_KEYS = {"normalization_stats", "shard_set_sha256"}
# torch.save's own tuples nest 3 deep (a tensor's size in its rebuild arguments). Hashing a
# tuple (a dict key) recurses through the tuples in it with no recursion limit: a key of a
# million nested tuples, 1 MB of pickle, crashes the interpreter inside torch.load.
MAX_TUPLE_NESTING = 100
TUPLE_OPCODES = {"TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "EMPTY_TUPLE"}


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Commit markers (.json), newest (highest step number) first. Ordered by the number,
    not the text: step-100000000 comes after step-99999999. Other names are not ours."""
    markers = [p for p in (Path(run_dir) / CHECKPOINT_DIR).glob("step-*.json") if MARKER_NAME.fullmatch(p.name)]
    return sorted(markers, key=marker_step, reverse=True)


def marker_step(marker: Path) -> int:
    return int(MARKER_NAME.fullmatch(marker.name)["step"])


def read_marker(marker: Path) -> dict:
    """A commit marker, checked: the fields it must have, and that it is about its own .pt."""
    meta = read_json_file(marker, MARKER_MAX_BYTES, "checkpoint marker")
    problem = first_violation(MARKER_SCHEMA, meta)
    if problem:
        raise HarnessError(f"{marker}: malformed checkpoint marker ({problem})")
    named = MARKER_NAME.fullmatch(marker.name)
    if meta["file"] != marker.with_suffix(".pt").name or (named and int(named["step"]) != meta["step"]):
        raise HarnessError(f"{marker}: marker is about {meta['file']!r}, step {meta['step']}, not about its own name")
    return meta


def load_verified(marker_or_pt: Path) -> dict:
    """Load one checkpoint, checking it against its marker; HarnessError naming it if it is
    unreadable, does not verify, cannot be loaded or does not hold a training state."""
    marker = Path(marker_or_pt).with_suffix(".json")
    path = marker.with_suffix(".pt")
    meta = read_marker(marker)
    try:
        with open_regular_file(path) as f:
            size = os.fstat(f.fileno()).st_size
            if size != meta["bytes"]:  # before reading: a marker's size is the most that is read
                raise HarnessError(f"{path}: checkpoint is truncated or corrupt ({size} bytes; {marker.name} records {meta['bytes']})")
            payload = f.read(size + 1)
    except OSError as e:
        raise HarnessError(f"{path}: unreadable checkpoint ({e.strerror or e})") from None
    if len(payload) != meta["bytes"] or hashlib.sha256(payload).hexdigest() != meta["sha256"]:
        raise HarnessError(f"{path}: checkpoint is truncated or corrupt (size or SHA-256 differs from {marker.name})")
    state = _unpickle(payload, path)
    _check_top_level(state, meta, path)
    return state


def _unpickle(payload: bytes, path: Path) -> dict:
    """A payload that matches its marker yet does not load was crafted or written by
    something else; whatever torch raises for it, it is that file's problem."""
    try:
        return load_tensors_only(io.BytesIO(payload))
    except Exception as e:  # noqa: BLE001 (untrusted bytes: any failure means "not a checkpoint")
        raise HarnessError(f"{path}: not a loadable checkpoint ({type(e).__name__}: {one_line(e)})") from None


def load_tensors_only(source):
    """torch.load with weights_only=True (tensors and plain containers; nothing from the file
    is called), onto the CPU whatever device wrote it: load_state_dict then copies the
    tensors to this rank's device. `source`: a path (read only if it is a regular file) or
    an open binary file. ValueError for one that torch.load could not read in memory
    bounded by its size (archive_problem). torch's warnings about a file's quirks (a
    crafted one's pickle protocol 4, ...) are silenced: the caller reports a file that
    fails as one error."""
    opened = open_regular_file(source) if isinstance(source, (str, os.PathLike)) else contextlib.nullcontext(source)
    with opened as archive:
        problem = archive_problem(archive)
        if problem:
            raise ValueError(problem)
        archive.seek(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                return torch.load(archive, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as e:
                raise pickle.UnpicklingError(f"{weights_only_reason(e)}; only tensors and plain data are loaded") from None


# torch's refusal also advises loading the file with weights_only=False, "if you trust
# the source": that runs what the file holds, and a checkpoint may come from anyone.
TORCH_ADVICE = ("weights_only", "Weights only load failed", "trust", "torch.load")


def weights_only_reason(error: pickle.UnpicklingError) -> str:
    """What torch.load(weights_only=True) refused in a file (a global it does not allow, an
    opcode), without torch's advice, and with the file's control characters (a crafted
    global's name is the file's text) escaped."""
    for line in str(error).splitlines():
        line = line.strip().removeprefix("WeightsUnpickler error:").split(". Please use")[0].strip().rstrip(".")
        if line and not any(advice in line for advice in TORCH_ADVICE):
            return one_line(printable(line))
    return "content other than tensors and plain data"


def archive_problem(archive) -> str | None:
    """Why the open binary file `archive` is not a zip archive as torch.save writes one, as
    its central directory (read with zipfile) and pickle tell before torch.load reads it;
    None if it is one. torch.save stores its records uncompressed, and torch.load reads
    each record whole into memory: a compressed one could inflate a megabyte to gigabytes,
    so only stored records that together fit in the file are read."""
    size = archive.seek(0, os.SEEK_END)
    archive.seek(0)
    if archive.read(4) != b"PK\x03\x04":  # what torch.load goes by: anything else it reads in its legacy format
        return "not a zip archive (torch.save writes one)"
    with zipfile.ZipFile(archive) as zipped:
        records = zipped.infolist()
        compressed = next((r for r in records if r.compress_type != zipfile.ZIP_STORED or r.compress_size != r.file_size), None)
        if compressed:
            return f"record {one_line(repr(compressed.filename))} is compressed; torch.save stores its records uncompressed"
        claimed = sum(r.file_size for r in records)
        if claimed > size:
            return f"its records claim {claimed} bytes, more than the file's {size}"
        pickles = [r for r in records if r.filename.endswith("data.pkl")]
        deep = next((r for r in pickles if tuples_nest_deeper(zipped.read(r), MAX_TUPLE_NESTING)), None)
    return f"{deep.filename} nests tuples more than {MAX_TUPLE_NESTING} deep" if deep else None


def tuples_nest_deeper(pickle_bytes: bytes, limit: int) -> bool:
    """Whether the pickle builds a tuple nested more than `limit` deep, found from its opcodes
    without unpickling it. Only tuples count: other containers hash by identity or not at
    all. A memoised value keeps the depth it was stored with (a tuple cannot change)."""
    stack, marks, memo = [], [], {}
    for opcode, arg, _ in pickletools.genops(pickle_bytes):
        if opcode.name == "MARK":
            marks.append(len(stack))
            continue
        if opcode.name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
            memo[len(memo) if arg is None else arg] = stack[-1] if stack else 0
            continue
        popped = []
        if pickletools.markobject in opcode.stack_before:  # the items above the last mark
            start = marks.pop() if marks else 0
            popped, stack[start:] = stack[start:], []
        below = len([s for s in opcode.stack_before if s not in (pickletools.markobject, pickletools.stackslice)])
        if below:
            popped, stack[-below:] = popped + stack[-below:], []
        depth = _pushed_depth(opcode.name, arg, popped, memo)
        if depth > limit:
            return True
        stack += [depth] * len(opcode.stack_after)
    return False


def _pushed_depth(name: str, arg, popped: list[int], memo: dict) -> int:
    """How deeply tuples nest in what opcode `name` pushes, from the depths it `popped`."""
    if name in TUPLE_OPCODES:
        return 1 + max(popped, default=0)
    if name in ("GET", "BINGET", "LONG_BINGET"):
        return memo.get(arg, 0)
    return max(popped, default=0) if name == "DUP" else 0


def _check_top_level(state, meta: dict, path: Path) -> None:
    problem = _top_level_problem(state, meta)
    if problem:
        raise HarnessError(f"{path}: {problem}")


def _top_level_problem(state, meta: dict) -> str | None:
    """The first way `state` is not a training state of the marker's step; None if it is one.
    Types are checked exactly before anything is compared or printed: a crafted file's
    tensor has no truth value, and its containers can hold themselves (plain_data_problem)."""
    if type(state) is not dict or not all(type(k) is str for k in state) or not STATE_KEYS <= set(state) <= STATE_KEYS | OPTIONAL_STATE_KEYS:
        held = _key_names(state) if type(state) is dict else f"a {type(state).__name__}"
        return f"does not hold a training state (holds {held}; expected {sorted(STATE_KEYS)})"
    if "normalization_stats" in state:
        problem = stats_problem(state["normalization_stats"])
        if problem:
            return problem
    digest = state.get("shard_set_sha256")
    if digest is not None and not (type(digest) is str and re.fullmatch("[0-9a-f]{64}", digest)):
        return f"shard_set_sha256: {reprlib.repr(digest)} is not a SHA-256 in hex"
    loop, config, world = state["loop"], state["config"], state["world_size"]
    problem = plain_data_problem(loop, "loop") or (None if type(loop) is dict else "loop: not a mapping")
    if problem or type(loop.get("step")) is not int or loop["step"] != meta["step"]:
        return problem or f"loop.step is not the marker's step {meta['step']}"
    problem = plain_data_problem(config, "config") or (None if type(config) is dict else "config: not a mapping")
    if problem:
        return problem
    if type(world) is not int or world < 1:
        return f"world_size {reprlib.repr(world)} is not a positive integer"
    return None


def stats_problem(stats, required=()) -> str | None:
    """Why the normalisation statistics a checkpoint or run records are not usable, as
    `normalization_stats.field: problem`; None if they are. They are checked as a
    manifest's are, and for NaN besides: JSON cannot hold it, a pickle can, and it passes
    every bound (any comparison with NaN is false); predict would print probability nan."""
    schema = {"properties": {"normalization_stats": {**STATS_SCHEMA, "required": list(required)}}}
    problem = plain_data_problem(stats, "normalization_stats") or first_violation(schema, {"normalization_stats": stats})
    if problem:
        return problem
    values = [("mean", stats.get("mean")), ("std", stats.get("std")), *((f"pixel_mean[{i}]", v) for i, v in enumerate(stats.get("pixel_mean", [])))]
    return next((f"normalization_stats.{name}: {value} is not a finite number" for name, value in values if value is not None and not math.isfinite(value)), None)


class DifferentExperiment(HarnessError):
    """A checkpoint that verifies but was written with other data, model or optimizer
    settings: the run is refused, not continued from an older checkpoint or from scratch."""


def load_newest_valid(run_dir: Path, fits=None) -> tuple[Path, dict] | None:
    """The newest checkpoint that verifies (and, given `fits`, a function that raises
    HarnessError for a state this run cannot use, fits); each newer one that does not is
    skipped with a warning naming it, but a DifferentExperiment from `fits` is raised: the
    run is refused."""
    for marker in list_checkpoints(run_dir):
        try:
            state = load_verified(marker)
            if fits:
                fits(state, marker.with_suffix(".pt"))
            return marker.with_suffix(".pt"), state
        except DifferentExperiment:
            raise
        except HarnessError as e:
            log.warning(f"skipping checkpoint: {e}")
    return None


def checkpoint_to_resume(ctx, run_dir: Path, resume: str, config, shard_set: str | None = None, fits=None) -> tuple[Path, dict] | None:
    """The checkpoint a run continues from: `resume` is auto (the newest valid one in
    RUN_DIR), never, or a path. Every rank must find the same one, and it must have been
    written with the same data (`shard_set`: manifest.shard_set_sha256), model and
    optimizer settings; `fits(state, path)` raises HarnessError for a state this run's
    model and optimizer cannot take."""

    def usable(state: dict, path: Path) -> None:
        refuse_other_experiment(state, path, config, shard_set)
        if fits:
            fits(state, path)

    found = None
    if resume == "auto":
        found = load_newest_valid(run_dir, usable)
    elif resume != "never":
        if Path(resume).is_dir():
            raise HarnessError(f"--resume {resume}: is a directory (give auto, never, or a checkpoint's step-N.pt)")
        if not Path(resume).is_file():
            raise HarnessError(f"--resume {resume}: no such checkpoint file (give auto, never, or a checkpoint's step-N.pt)")
        if not Path(resume).with_suffix(".json").exists():
            raise HarnessError(
                f"--resume {resume}: not a checkpoint: it has no marker {Path(resume).with_suffix('.json').name} beside it "
                "(a run's checkpoints are RUN_DIR/checkpoints/step-N.pt; its model.pt holds the final weights only)"
            )
        found = (Path(resume), load_verified(Path(resume)))
        usable(found[1], found[0])
    # Every rank must resume from the same checkpoint (RUN_DIR on a shared filesystem).
    steps = [s[0] for s in ctx.gather([found[1]["loop"]["step"] if found else -1])]
    if len(set(steps)) > 1:
        raise HarnessError(f"{run_dir}: ranks found different checkpoints (steps {steps}); RUN_DIR must be on a filesystem every node shares")
    if not found:
        return None
    path, state = found
    if state["world_size"] != ctx.world_size and ctx.is_main:  # every rank found the same checkpoint: one line, not one per rank
        log.warning(f"resuming a world-size-{state['world_size']} run with world size {ctx.world_size}: the global batches are the same, results equal up to float summation order")
    return found


def refuse_other_experiment(state: dict, path: Path, config, shard_set: str | None = None) -> None:
    """DifferentExperiment if the checkpoint was written with other settings or another shard
    set (one written before checkpoints recorded theirs is taken as this one)."""
    changed = ["--" + c.replace("_", "-") for c in changed_fields(state["config"], config)]
    if shard_set and state.get("shard_set_sha256", shard_set) != shard_set:
        changed.append("shard set (--shards: other images, or packed with another --block-size or --shard-size)")
    if changed:
        raise DifferentExperiment(
            f"{path}: was written with a different {', '.join(changed)}; "
            "resuming would mix two experiments: train with the new settings in a new --run-dir"
        )


# --- does a loaded state fit this run? ------------------------------------------------------------


def state_mismatch(state: dict, model, optimizer, scheduler, loop: dict) -> str | None:
    """Where a checkpoint's state does not fit this run's model, optimizer, schedule and
    loop, as `field: problem`; None if it fits. Checked before anything is loaded: a
    state that loads halfway would leave the run half restored, and load_state_dict of a
    schedule takes any keys it is given."""
    template = {"model": model.state_dict(), "scheduler": scheduler.state_dict(), "loop": loop_template(state["loop"], loop)}
    if not isinstance(template["loop"]["last_metrics"], dict):
        return "loop.last_metrics: not a mapping"
    return (
        structure_mismatch({k: state[k] for k in template}, template, "")
        or optimizer_mismatch(state["optimizer"], optimizer)
        or rng_mismatch(state["rng"])
    )


def loop_template(saved: dict, loop: dict) -> dict:
    """What a saved loop state must look like, from this run's: `last_metrics` holds whatever
    metrics were logged; `before_training` the test loss and accuracy of the initial weights,
    or nothing yet; a loop saved before `before_training` existed may lack it."""
    template = {**loop, "last_metrics": saved.get("last_metrics")}
    if "before_training" not in saved:
        template.pop("before_training", None)
    elif not (type(saved["before_training"]) is dict and not saved["before_training"]):  # not {}: the figures (a tensor has no truth value)
        template["before_training"] = {"test_loss": 0.0, "test_accuracy": 0.0}
    return template


def structure_mismatch(value, template, where: str) -> str | None:
    """Where `value` differs from `template` in structure: dict keys, sequence lengths, tensor
    shapes and dtypes, kinds of scalar, and tensors whose storage holds their elements. None
    if nowhere."""
    if isinstance(template, torch.Tensor):
        if isinstance(value, torch.Tensor) and value.shape == template.shape and value.dtype == template.dtype:
            return _storage_problem(value, where)
        return f"{where}: {_describe(value)}; expected a {template.dtype} tensor of shape {tuple(template.shape)}"
    if isinstance(template, dict):
        if not isinstance(value, dict) or set(value) != set(template):
            return f"{where or 'state'}: keys {_describe(value)}; expected {one_line(sorted(map(str, template)))}"
        return next((m for k in template if (m := structure_mismatch(value[k], template[k], f"{where}.{k}".lstrip(".")))), None)
    if isinstance(template, (list, tuple)):
        if not isinstance(value, (list, tuple)) or len(value) != len(template):
            return f"{where}: {_describe(value)}; expected a sequence of {len(template)}"
        return next((m for i, (v, t) in enumerate(zip(value, template)) if (m := structure_mismatch(v, t, f"{where}[{i}]"))), None)
    return None if _same_kind(value, template) else f"{where}: {_describe(value)}; expected a {type(template).__name__}"


def _storage_problem(tensor: torch.Tensor, where: str) -> str | None:
    """A tensor that is not dense, or whose storage is smaller than its elements: expanded
    (stride 0), a few bytes of a file hold a tensor of any shape, which passes a shape check
    and then makes a model of that shape as large as it likes."""
    if tensor.layout != torch.strided:
        return f"{where}: a {tensor.layout} tensor; expected a dense one"
    held, needed = tensor.untyped_storage().nbytes(), tensor.numel() * tensor.element_size()
    if held < needed:
        return f"{where}: a tensor of shape {tuple(tensor.shape)} whose storage holds {held} of its {needed} bytes (expanded?)"
    return None


def _same_kind(value, template) -> bool:
    if template is None or isinstance(template, bool):  # flags such as `fused` differ between devices
        return value is None or isinstance(value, bool)
    if isinstance(template, int):  # steps and counts reach range() and format strings
        return type(value) is int
    if isinstance(template, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return type(value) is type(template)


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    if isinstance(value, dict):
        return _key_names(value)
    return f"a {type(value).__name__}" + (f" of {len(value)}" if isinstance(value, (list, tuple)) else "")


def _key_names(mapping: dict) -> str:
    """A mapping's keys for a message: a crafted key can be a long or deeply nested tuple."""
    return one_line(sorted(k if type(k) is str else reprlib.repr(k) for k in mapping))


def optimizer_mismatch(saved, optimizer) -> str | None:
    """The optimizer's state: the same parameter groups, and per-parameter buffers shaped as
    their parameters (torch would only notice at the next step, mid-training)."""
    current = optimizer.state_dict()
    if not isinstance(saved, dict) or set(saved) != {"state", "param_groups"}:
        return f"optimizer: keys {_describe(saved)}; expected ['param_groups', 'state']"
    problem = structure_mismatch(saved["param_groups"], current["param_groups"], "optimizer.param_groups")
    if problem or [g["params"] for g in saved["param_groups"]] != [g["params"] for g in current["param_groups"]]:
        return problem or "optimizer.param_groups: the parameters are numbered differently"
    params = [p.detach() for group in optimizer.param_groups for p in group["params"]]
    if not isinstance(saved["state"], dict):
        return f"optimizer.state: {_describe(saved['state'])}; expected a mapping"
    for key, entry in saved["state"].items():
        if type(key) is not int or not 0 <= key < len(params) or not isinstance(entry, dict) or set(entry) - {"momentum_buffer"}:
            return f"optimizer.state[{one_line(repr(key))}]: not the state of one of the {len(params)} parameters"
        if entry.get("momentum_buffer") is not None:
            problem = structure_mismatch(entry["momentum_buffer"], params[key], f"optimizer.state[{key}].momentum_buffer")
            if problem:
                return problem
    return None


def rng_mismatch(rng) -> str | None:
    """Per-rank generator states: CPU ones shaped like this process's, GPU ones bytes."""
    if not isinstance(rng, dict) or set(rng) != {"torch", "cuda"}:
        return f"rng: keys {_describe(rng)}; expected ['cuda', 'torch']"
    cpu = [rng["torch"]] if isinstance(rng["torch"], torch.Tensor) else rng["torch"]  # a single state: an older checkpoint
    template = torch.get_rng_state()
    if not isinstance(cpu, list) or not cpu or any(structure_mismatch(s, template, "") for s in cpu):
        return f"rng.torch: not a list of CPU generator states ({template.numel()} bytes each)"
    gpu = rng["cuda"]
    if not isinstance(gpu, list) or any(not isinstance(s, torch.Tensor) or s.dtype != torch.uint8 or s.dim() != 1 for s in gpu):
        return "rng.cuda: not a list of GPU generator states (byte tensors)"
    return None
