"""The files of a run directory that `harness report`, `harness predict` and a resumed run
read back: summary.json, metrics.jsonl, test_report.json and saved weights, each checked
before use, since a run directory may come from someone else."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from harness.checkpoint import CHECKPOINT_DIR, load_tensors_only
from harness.config import FLOAT32_MAX
from harness.errors import HarnessError
from harness.run_lock import LOCK_NAME
from harness.validation import first_violation, missing_or_not_a_file, read_json_file

STOPPED = "stopped.json"  # a stopped run's record: {"step": N, "signal": "SIGTERM"}
# What a run directory holds, one or more of them from the run's start on (the lock and
# TensorBoard's event file first; a checkpoint, stopped.json, metrics.jsonl later).
RUN_FILES = (LOCK_NAME, "events.out.tfevents.*", "metrics.jsonl", "summary.json", "model.pt", "test_report.json", STOPPED, f"{CHECKPOINT_DIR}/")

def refuse_link(path: Path, what: str) -> None:
    """A run directory from someone else may hold a symbolic link where a run writes (`what`:
    what it writes there): writing would change what the link names. HarnessError naming it."""
    if path.is_symlink():
        raise HarnessError(f"{path}: is a symbolic link; a run {what} of its own, and would change what the link names: "
                           "put a real one there")


def holds_a_run(run_dir: Path) -> bool:
    """Whether `run_dir` holds any of RUN_FILES: a run's directory, finished or not."""
    return any(any(run_dir.glob(name.rstrip("/"))) for name in RUN_FILES)


RUN_JSON_MAX_BYTES = 64 << 20  # a summary or test report is a few kB, metrics.jsonl ~300 bytes an epoch
# Counts are drawn as floats (axis limits, colour scales): these bounds keep them finite,
# and far above any real run's (an epoch of MNIST takes seconds; a test set is 10,000 images).
MAX_EPOCH = 10**9
MAX_COUNT = 2**31 - 1
MAX_INT_DIGITS = 18  # of any integer in metrics.jsonl: all of them then fit an int64 and a float
NUMBER = {"type": "number"}
FRACTION = {"type": "number", "minimum": 0, "maximum": 1}
METRICS_LINE_SCHEMA = {
    "type": "object",
    "required": ["epoch", "train_loss", "val_loss", "val_accuracy"],
    "properties": {"epoch": {"type": "integer", "minimum": 1, "maximum": MAX_EPOCH}, "train_loss": NUMBER, "val_loss": NUMBER,
                   "val_accuracy": FRACTION},
}
REPORT_DIR = "report"  # the pictures of a run (harness.report)
PICTURES_GO = "writes its pictures in a directory"  # for refuse_link
SUMMARY_SCHEMA = {
    "type": "object",
    "properties": {"config": {"type": "object"}, "steps": {"type": "integer", "minimum": 0},
                   "before_training": {"type": "object", "properties": {"test_loss": NUMBER, "test_accuracy": FRACTION}}},
}
CLASSES = 10
TEST_REPORT_SCHEMA = {
    "type": "object",
    "required": ["confusion"],
    "properties": {"confusion": {"type": "array", "minItems": CLASSES, "maxItems": CLASSES, "items": {
        "type": "array", "minItems": CLASSES, "maxItems": CLASSES, "items": {"type": "integer", "minimum": 0, "maximum": MAX_COUNT}}}},
}

def read_run_json(path: Path, schema: dict, what: str) -> dict:
    """A run's JSON file, checked against `schema`; HarnessError naming the file and field.
    NaN and Infinity are read: Python's json writes a diverged loss so, in summary.json as
    in metrics.jsonl, and refusing them took a finished run for an unfinished one."""
    return check_run_json(path, read_json_file(path, RUN_JSON_MAX_BYTES, what, nonfinite_ok=True), schema)


def check_run_json(path: Path, value, schema: dict) -> dict:
    """`value`, read from `path`, checked against `schema`; HarnessError naming the file and field."""
    problem = first_violation(schema, value) or fraction_problem(value, schema)
    if problem:
        raise HarnessError(f"{path}: {problem}")
    return value


def read_metrics(run_dir: Path, whole_lines_only: bool = False) -> list[dict]:
    """RUN_DIR's metrics.jsonl, each line checked; [] without one (no epoch has ended yet).
    `whole_lines_only`: a last line without its newline (a crash or a full disk cut its
    write short) is left out, not refused."""
    path = run_dir / "metrics.jsonl"
    if not os.path.lexists(path):
        return []
    if not path.is_file():
        raise HarnessError(f"{path}: {missing_or_not_a_file(path)}; a run's metrics are a file of JSON lines")
    try:
        if path.stat().st_size > RUN_JSON_MAX_BYTES:
            raise HarnessError(f"{path}: larger than {RUN_JSON_MAX_BYTES} bytes; not a run's metrics")
        text = path.read_text()
        lines = text.splitlines()[: -1 if whole_lines_only and text and not text.endswith("\n") else None]
    except (OSError, UnicodeDecodeError) as e:
        raise HarnessError(f"{path}: unreadable ({getattr(e, 'strerror', None) or e})") from None
    metrics = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = parse_metrics_line(line)
        except ValueError as e:
            raise HarnessError(f"{path}: line {number}: {e}") from None
        problem = first_violation(METRICS_LINE_SCHEMA, entry) or fraction_problem(entry, METRICS_LINE_SCHEMA) or loss_problem(entry)
        if problem:
            raise HarnessError(f"{path}: line {number}: {problem}")
        metrics.append(entry)
    return metrics


def fraction_problem(value, schema: dict, field: str = "") -> str | None:
    """A NaN where `schema` has a FRACTION (an accuracy), which the schema passes (every
    comparison with NaN is false) and no run writes (an accuracy is a count's share); None
    if there is none. `value` conforms to `schema` otherwise."""
    if schema is FRACTION:
        return f"{field}: {value} is not a fraction from 0 to 1" if not math.isfinite(value) else None
    if isinstance(value, dict):
        for name, inner in schema.get("properties", {}).items():
            if name in value and (problem := fraction_problem(value[name], inner, f"{field}.{name}".lstrip("."))):
                return problem
    return None


def loss_problem(entry: dict) -> str | None:
    """A finite loss beyond float32's range, which no run writes (its losses are float32, or
    inf or NaN when it diverged) and which matplotlib's axis overflows on; None if none is."""
    for name in ("train_loss", "val_loss"):
        if math.isfinite(entry[name]) and abs(entry[name]) > FLOAT32_MAX:
            return f"{name}: {entry[name]:.4g} is beyond float32's range (a run's losses are float32, inf or NaN)"
    return None


def parse_metrics_line(line: str):
    """One line of metrics.jsonl, parsed; ValueError saying why it is not one. NaN and
    Infinity are allowed (a diverged loss is a metric too); deep nesting and long integers
    are not (Python would raise RecursionError, or ValueError past its int digit limit)."""
    try:
        return json.loads(line, parse_int=bounded_int)
    except json.JSONDecodeError as e:
        raise ValueError(f"not a JSON object ({e})") from None
    except RecursionError:
        raise ValueError("not a JSON object (nested too deeply)") from None


def bounded_int(digits: str) -> int:
    """A JSON integer of at most MAX_INT_DIGITS digits; json.loads's `parse_int` hook, which
    sees the digits before int() does."""
    length = len(digits.lstrip("-"))
    if length > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {length} digits; at most {MAX_INT_DIGITS} are read")
    return int(digits)


def load_torch_file(path: Path):
    """What torch.save wrote (tensors on the CPU, nothing but tensors and plain containers)."""
    try:
        return load_tensors_only(path)
    except Exception as e:  # torch raises many kinds for a damaged or foreign file
        raise HarnessError(f"{path}: not a saved model or checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})") from None


def model_state(saved, path: Path) -> dict:
    """The model's state dict in what `load_torch_file` read: a state dict, or a checkpoint's "model"."""
    state = saved.get("model", saved) if isinstance(saved, dict) else saved
    if not isinstance(state, dict) or not state or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise HarnessError(f"{path}: holds no model state dict")
    return state
