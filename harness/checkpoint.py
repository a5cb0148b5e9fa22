"""Checkpoints in RUN_DIR/checkpoints/: written atomically by rank 0, verified on load.

A checkpoint is two files: `step-NNNNNNNN.pt` (the training state, torch.save) and
`step-NNNNNNNN.json` (its SHA-256, size, epoch and step). The .pt is written first
(temporary file, fsync, rename) and the .json after it, so the .json is the commit
marker: a crash mid-write leaves no .json, and a .pt that was damaged later fails
its SHA-256 check. Loading falls back to the newest checkpoint that verifies.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from pathlib import Path

import torch

from harness.atomic import fsync_dir, torch_bytes, write_bytes_atomic, write_json_atomic
from harness.config import changed_fields
from harness.errors import HarnessError

log = logging.getLogger("harness")

CHECKPOINT_DIR = "checkpoints"


def save_checkpoint(run_dir: Path, state: dict, step: int, epoch: int, keep: int) -> Path:
    """Write the state for `step`, then delete all but the newest `keep` checkpoints."""
    directory = Path(run_dir) / CHECKPOINT_DIR
    payload = torch_bytes(state)
    path = directory / f"step-{step:08d}.pt"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(path, payload)
        meta = {"file": path.name, "sha256": hashlib.sha256(payload).hexdigest(), "bytes": len(payload), "step": step, "epoch": epoch}
        write_json_atomic(path.with_suffix(".json"), meta)
        fsync_dir(directory)
    except OSError as e:
        path.unlink(missing_ok=True)  # no marker was written, or it is being removed with its payload
        path.with_suffix(".json").unlink(missing_ok=True)
        raise HarnessError(f"{path}: could not write checkpoint ({e.strerror or e}); the previous checkpoints are intact") from None
    for old in list_checkpoints(run_dir)[keep:]:
        old.with_suffix(".pt").unlink(missing_ok=True)
        old.unlink(missing_ok=True)
    return path


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Commit markers (.json), newest first."""
    return sorted((Path(run_dir) / CHECKPOINT_DIR).glob("step-*.json"), reverse=True)


def load_verified(marker_or_pt: Path) -> dict:
    """Load one checkpoint, checking it against its marker; HarnessError if it does not verify."""
    marker = Path(marker_or_pt).with_suffix(".json")
    path = marker.with_suffix(".pt")
    try:
        meta = json.loads(marker.read_text())
        payload = path.read_bytes()
    except (OSError, json.JSONDecodeError) as e:
        raise HarnessError(f"{path}: unreadable checkpoint ({e})") from None
    if len(payload) != meta["bytes"] or hashlib.sha256(payload).hexdigest() != meta["sha256"]:
        raise HarnessError(f"{path}: checkpoint is truncated or corrupt (size or SHA-256 differs from {marker.name})")
    # map_location: tensors stay on the CPU whatever device wrote them; load_state_dict
    # then copies them to this rank's device.
    return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)


def load_newest_valid(run_dir: Path) -> tuple[Path, dict] | None:
    """The newest checkpoint that verifies, warning about each newer one that does not."""
    for marker in list_checkpoints(run_dir):
        try:
            return marker.with_suffix(".pt"), load_verified(marker)
        except HarnessError as e:
            log.warning(f"skipping checkpoint: {e}")
    return None


def checkpoint_to_resume(ctx, run_dir: Path, resume: str, config) -> tuple[Path, dict] | None:
    """The checkpoint a run continues from: `resume` is auto (the newest valid one in
    RUN_DIR), never, or a path. Every rank must find the same one, and it must have been
    written with the same data, model and optimizer settings."""
    found = None
    if resume == "auto":
        found = load_newest_valid(run_dir)
    elif resume != "never":
        found = (Path(resume), load_verified(Path(resume)))
    # Every rank must resume from the same checkpoint (RUN_DIR on a shared filesystem).
    steps = [s[0] for s in ctx.gather([found[1]["loop"]["step"] if found else -1])]
    if len(set(steps)) > 1:
        raise HarnessError(f"{run_dir}: ranks found different checkpoints (steps {steps}); RUN_DIR must be on a filesystem every node shares")
    if not found:
        return None
    path, state = found
    changed = changed_fields(state["config"], config)
    if changed:
        raise HarnessError(
            f"{path}: was written with a different {', '.join('--' + c.replace('_', '-') for c in changed)}; "
            "resuming would mix two experiments (use a new --run-dir, or --resume never there)"
        )
    if state["world_size"] != ctx.world_size:
        log.warning(f"resuming a world-size-{state['world_size']} run with world size {ctx.world_size}: the global batches are the same, results equal up to float summation order")
    return found
