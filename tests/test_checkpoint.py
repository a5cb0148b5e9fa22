"""Checkpoint files: written atomically, verified, pruned and set aside, and read with a
fallback to the previous one; rank 0 writing them (or its event file) slowly does not
fail the job."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from helpers import SMALL_RUN, Payload, checkpointed_run, checksum, lock_held_by_another_process, run, scalar_events, summary, tiny_training_objects, train_command, train_ok, write_source

from harness import checkpoint as ckpt
from harness.atomic import write_bytes_atomic
from harness.data.pack import pack
from harness.data.sources import load_source
from harness.errors import HarnessError
from harness.run_outputs import prepare_run_dir


def test_truncated_newest_checkpoint_falls_back_to_the_previous(quick_shards, tmp_path, reference):
    run_dir = tmp_path / "run"
    result = run(checkpointed_run(quick_shards, run_dir, "--max-steps", "150", "--keep-checkpoints", "5"))
    assert result.returncode == 0, result.stderr[-3000:]
    newest = ckpt.list_checkpoints(run_dir)[0].with_suffix(".pt")
    assert newest.name == "step-00000150.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    result = run(checkpointed_run(quick_shards, run_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipping checkpoint" in result.stdout + result.stderr and "step-00000150.pt" in result.stdout + result.stderr
    assert "step 100)" in result.stdout
    assert checksum(run_dir) == reference[1]
    # The damaged step 150 was moved aside, not left to outrank (and prune) the new ones.
    (aside,) = (run_dir / "checkpoints").glob("set-aside-*")
    assert sorted(p.name for p in aside.iterdir()) == ["step-00000150.json", "step-00000150.pt"]
    assert [p.name for p in ckpt.list_checkpoints(run_dir)] == ["step-00000300.json", "step-00000250.json", "step-00000200.json"]


def test_flipped_byte_is_caught_by_the_sha256(tmp_path):
    state = {"model": {"w": torch.arange(1000.0)}, "loop": {"step": 7}}
    ckpt.save_checkpoint(tmp_path, state, step=7, epoch=0, keep=3)
    path = tmp_path / "checkpoints" / "step-00000007.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside tensor data: torch.load alone would not notice
    path.write_bytes(bytes(data))
    with pytest.raises(HarnessError, match="truncated or corrupt"):
        ckpt.load_verified(path)
    assert ckpt.load_newest_valid(tmp_path) is None


def save_steps(run_dir: Path, *steps: int) -> None:
    for step in steps:
        ckpt.save_checkpoint(run_dir, small_state(step), step=step, epoch=0, keep=10)


def small_state(step: int) -> dict:
    """What Trainer.state_dict() holds, in miniature."""
    return {"model": {"w": torch.full((3,), float(step))}, "optimizer": {"state": {}, "param_groups": []}, "scheduler": {},
            "loop": {"step": step}, "rng": {"torch": [torch.get_rng_state()], "cuda": []}, "config": {"lr": 0.1}, "world_size": 1}


def reseal_marker(marker: Path, **changes) -> None:
    """Make a marker match its (crafted) .pt again, then apply `changes` (None deletes a key)."""
    payload = marker.with_suffix(".pt").read_bytes()
    meta = {**json.loads(marker.read_text()), "bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest(), **changes}
    marker.write_text(json.dumps({k: v for k, v in meta.items() if v is not None}))


def newest_valid_step(run_dir: Path, caplog, skipped: str) -> int:
    """The step load_newest_valid falls back to, checking it warned about `skipped` by name."""
    with caplog.at_level("WARNING", logger="harness"):
        found = ckpt.load_newest_valid(run_dir)
    assert any("skipping checkpoint" in r.message and skipped in r.message for r in caplog.records), caplog.text
    return found[1]["loop"]["step"]


@pytest.mark.parametrize(
    "text",
    ["", "{", "[]", "null", '{"file": "step-00000002.pt"}', "NaN", "[" * 100000 + "]" * 100000, "\x00" * 70000],
    ids=["empty", "truncated", "array", "null", "keys-missing", "nan", "deep", "oversized"],
)
def test_unreadable_marker_falls_back_to_the_previous_checkpoint(tmp_path, caplog, text):
    save_steps(tmp_path, 1, 2)
    marker = tmp_path / "checkpoints" / "step-00000002.json"
    marker.write_text(text)
    assert newest_valid_step(tmp_path, caplog, "step-00000002.json") == 1
    assert marker.read_text() == text  # a skipped checkpoint is left as it was


@pytest.mark.parametrize(
    "changes",
    [{"bytes": None}, {"sha256": None}, {"step": None}, {"file": None}, {"epoch": None}, {"bytes": -1}, {"bytes": 2**60},
     {"bytes": "12"}, {"step": 2.0}, {"step": True}, {"epoch": True}, {"sha256": "X" * 64}, {"file": "step-00000001.pt"}, {"file": "../../x.pt"},
     {"step": 1}],
    ids=lambda c: "-".join(f"{k}={v!r}"[:24] for k, v in c.items()),
)
def test_malformed_marker_falls_back_to_the_previous_checkpoint(tmp_path, caplog, changes):
    """A marker with a key missing or of the wrong type or range used to escape the
    fallback (KeyError, TypeError): `--resume auto` crashed instead of resuming."""
    save_steps(tmp_path, 1, 2)
    reseal_marker(tmp_path / "checkpoints" / "step-00000002.json", **changes)
    assert newest_valid_step(tmp_path, caplog, "step-00000002.json") == 1


def torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "payload",
    ["garbage", "pickle", "torch-pickle", "list", "missing-keys", "extra-key", "step-differs", "tensor-config", "world-size-0",
     "std-zero", "stats-tensor", "shard-set-tensor"],
)
def test_checkpoint_that_does_not_load_falls_back_to_the_previous(tmp_path, caplog, payload):
    """A .pt that matches its marker but is not a loadable training state (crafted, or
    written by something else): skipped with a warning naming it; nothing in it runs."""
    save_steps(tmp_path, 1, 2)
    ran = tmp_path / "payload-ran"
    crafted = {
        "garbage": b"\x80\x04 not a checkpoint",
        "pickle": pickle.dumps(Payload(ran)),
        "torch-pickle": torch_bytes(Payload(ran)),
        "list": torch_bytes([1, 2, 3]),
        "missing-keys": torch_bytes({"loop": {"step": 2}}),
        "extra-key": torch_bytes({**small_state(2), "payload": 1}),
        "step-differs": torch_bytes(small_state(7)),
        "tensor-config": torch_bytes({**small_state(2), "config": {"lr": torch.ones(2)}}),
        "world-size-0": torch_bytes({**small_state(2), "world_size": 0}),
        "std-zero": torch_bytes({**small_state(2), "normalization_stats": {"mean": 0.13, "std": 0.0}}),  # predict would divide by it
        "stats-tensor": torch_bytes({**small_state(2), "normalization_stats": {"pixel_mean": torch.zeros(784)}}),
        "shard-set-tensor": torch_bytes({**small_state(2), "shard_set_sha256": torch.zeros(32, dtype=torch.uint8)}),
    }[payload]
    pt = tmp_path / "checkpoints" / "step-00000002.pt"
    pt.write_bytes(crafted)
    reseal_marker(pt.with_suffix(".json"))
    assert newest_valid_step(tmp_path, caplog, "step-00000002.pt") == 1
    assert not ran.exists(), "unpickling the checkpoint ran code"
    with pytest.raises(HarnessError, match="step-00000002.pt"):  # --resume PATH: the same problem is an error
        ckpt.load_verified(pt)


def test_what_newer_checkpoints_hold_beside_the_training_state_loads(tmp_path):
    """A run's checkpoints also hold the normalisation statistics it used (for `harness
    predict`) and the test figures of its initial weights (loop.before_training); older
    checkpoints hold neither. Both kinds load."""
    stats = {"mean": 0.1307, "std": 0.3081}
    newer = {**small_state(2), "normalization_stats": stats, "loop": {"step": 2, "before_training": {"test_loss": 2.3, "test_accuracy": 0.1}}}
    ckpt.save_checkpoint(tmp_path, small_state(1), step=1, epoch=0, keep=10)
    ckpt.save_checkpoint(tmp_path, newer, step=2, epoch=0, keep=10)
    assert ckpt.load_newest_valid(tmp_path)[1]["normalization_stats"] == stats
    assert "normalization_stats" not in ckpt.load_verified(tmp_path / "checkpoints" / "step-00000001.pt")


@pytest.mark.parametrize("before_training", [None, {}, {"test_loss": 2.3, "test_accuracy": 0.1}], ids=["older", "empty", "figures"])
def test_the_loops_test_figures_before_training_fit_a_fresh_run(before_training):
    """A resumed run's loop starts with before_training {} (not measured yet); a checkpoint's
    may hold the figures, nothing yet, or (written before they existed) no such key."""
    model, optimizer, scheduler = tiny_training_objects()
    loop = {"step": 1, "epoch": 0, "last_metrics": {}, "before_training": {}}
    saved = {**{k: v for k, v in loop.items() if k != "before_training"}, **({} if before_training is None else {"before_training": before_training})}
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "loop": saved,
             "rng": {"torch": [torch.get_rng_state()], "cuda": []}}
    assert ckpt.state_mismatch(state, model, optimizer, scheduler, loop) is None


def test_checkpoints_are_ordered_and_pruned_by_step_number(tmp_path):
    """step-100000000 is newer than step-99999999, though it sorts first as text."""
    save_steps(tmp_path, 99999998, 99999999, 100000000)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-100000000.json", "step-99999999.json", "step-99999998.json"]
    assert ckpt.load_newest_valid(tmp_path)[1]["loop"]["step"] == 100000000
    ckpt.save_checkpoint(tmp_path, small_state(100000001), step=100000001, epoch=0, keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "step-100000000.json", "step-100000000.pt", "step-100000001.json", "step-100000001.pt"]


def test_names_that_are_not_step_numbers_are_ignored(tmp_path):
    save_steps(tmp_path, 1)
    (tmp_path / "checkpoints" / "step-latest.json").write_text("{}")
    (tmp_path / "checkpoints" / "step-1e9.json").write_text("{}")
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000001.json"]


@pytest.mark.parametrize(
    "edit,problem",
    [
        (lambda s: s["model"].update({"0.weight": torch.zeros(3, 5)}),
         "model.0.weight: a torch.float32 tensor of shape (3, 5); expected a torch.float32 tensor of shape (3, 4)"),
        (lambda s: s["model"].update({"0.weight": torch.zeros(3, 4, dtype=torch.float64)}), "expected a torch.float32 tensor"),
        (lambda s: s["model"].update({"9.bias": torch.zeros(2)}), "model: keys"),
        (lambda s: s["optimizer"]["state"][0].update({"momentum_buffer": torch.zeros(7)}), "optimizer.state[0].momentum_buffer"),
        (lambda s: s["optimizer"]["state"].update({17: {"momentum_buffer": torch.zeros(3)}}), "optimizer.state[17]"),
        (lambda s: s["optimizer"]["param_groups"][0].update({"lr": "0.1"}), "optimizer.param_groups[0].lr: a str"),
        (lambda s: s["optimizer"]["param_groups"][0].update({"params": [5, 4, 3, 2]}), "numbered differently"),
        (lambda s: s["scheduler"].update({"optimizer": None}), "scheduler: keys"),
        (lambda s: s["scheduler"].update({"last_epoch": 1.0}), "scheduler.last_epoch: a float; expected a int"),
        (lambda s: s["loop"].update({"step": 3.0}), "loop.step: a float"),
        (lambda s: s["loop"].update({"last_metrics": [1]}), "loop.last_metrics: not a mapping"),
        (lambda s: s["loop"].update({"before_training": {"test_loss": "2.3", "test_accuracy": 0.1}}), "loop.before_training.test_loss: a str"),
        (lambda s: s["loop"].update({"before_training": {"test_accuracy": 0.1}}), "loop.before_training: keys"),
        (lambda s: s["loop"].update({"before_training": [0.1]}), "loop.before_training: keys a list"),
        (lambda s: s["rng"].update({"torch": [torch.zeros(5, dtype=torch.uint8)]}), "rng.torch"),
        (lambda s: s["rng"].update({"cuda": [torch.zeros(5)]}), "rng.cuda"),
    ],
)
def test_a_state_that_does_not_fit_the_model_is_named(edit, problem):
    """Checked before anything is loaded, so a bad state never leaves a run half restored."""
    model, optimizer, scheduler = tiny_training_objects()
    loop = {"step": 1, "epoch": 0, "last_metrics": {}}
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "loop": dict(loop),
             "rng": {"torch": [torch.get_rng_state()], "cuda": []}}
    assert ckpt.state_mismatch(state, model, optimizer, scheduler, loop) is None
    edit(state)
    assert problem in (ckpt.state_mismatch(state, model, optimizer, scheduler, loop) or "")


def test_resume_auto_skips_malformed_newest_checkpoints(tmp_path):
    """Through the real command, on a small shard set: the newest marker lacks a key, the
    one before holds weights of the wrong shape; the run resumes from the one before those."""
    shards, run_dir = tmp_path / "shards", tmp_path / "run"
    pack(load_source(write_source(tmp_path / "src")), shards, shard_size=80, block_size=20)
    args = ("--preset", "lenet", "--device", "cpu", "--batch-size", "20", "--checkpoint-every", "1", "--keep-checkpoints", "5",
            "--log-every", "1", "--threads", "1")
    train_ok(shards, run_dir, *args, "--max-steps", "4")
    marker = run_dir / "checkpoints" / "step-00000004.json"
    marker.write_text(json.dumps({k: v for k, v in json.loads(marker.read_text()).items() if k != "bytes"}))
    third = run_dir / "checkpoints" / "step-00000003.pt"
    state = torch.load(third, weights_only=True)
    first_weight = next(iter(state["model"]))
    state["model"][first_weight] = torch.zeros(3, 3)
    third.write_bytes(torch_bytes(state))
    reseal_marker(third.with_suffix(".json"))
    result = train_ok(shards, run_dir, *args, "--max-steps", "6")
    output = result.stdout + result.stderr
    assert "skipping checkpoint" in output and "step-00000004.json" in output and "'bytes' is a required property" in output
    assert f"step-00000003.pt: does not fit this run's model, optimizer or epochs (model.{first_weight}: a torch.float32 tensor of shape (3, 3)" in output
    assert f"resuming from {run_dir / 'checkpoints' / 'step-00000002.pt'} (epoch 1, step 2)" in output
    assert summary(run_dir)["steps"] == 6
    (aside,) = (run_dir / "checkpoints").glob("set-aside-*")  # the skipped ones, kept for a look
    assert sorted(p.name for p in aside.iterdir()) == [f"step-0000000{s}.{e}" for s in (3, 4) for e in ("json", "pt")]
    assert [ckpt.marker_step(m) for m in ckpt.list_checkpoints(run_dir)] == [6, 5, 4, 3, 2]


def test_keep_last_k(tmp_path):
    for step in range(1, 6):
        ckpt.save_checkpoint(tmp_path, {"loop": {"step": step}}, step=step, epoch=0, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000005.json", "step-00000004.json"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "step-00000004.json", "step-00000004.pt", "step-00000005.json", "step-00000005.pt"]


def test_a_committed_checkpoint_is_never_replaced(tmp_path):
    """Replacing step-N in place would leave a moment when its marker and payload disagree,
    and a failed write would remove the good one: a second write of a step is refused."""
    save_steps(tmp_path, 5)
    with pytest.raises(HarnessError, match="step-00000005.pt: a checkpoint of step 5 exists already and is kept"):
        ckpt.save_checkpoint(tmp_path, small_state(99), step=5, epoch=1, keep=1)
    assert ckpt.load_verified(tmp_path / "checkpoints" / "step-00000005.pt")["model"]["w"].tolist() == [5.0] * 3


def test_pruning_keeps_the_new_checkpoint_whatever_lies_past_it(tmp_path):
    """Only checkpoints before the one written count toward --keep-checkpoints; one past it
    (which a resume would have set aside) is neither kept in its place nor deleted."""
    save_steps(tmp_path, 10, 20)
    ckpt.save_checkpoint(tmp_path, small_state(15), step=15, epoch=0, keep=1)
    assert [ckpt.marker_step(m) for m in ckpt.list_checkpoints(tmp_path)] == [20, 15]
    ckpt.save_checkpoint(tmp_path, small_state(16), step=16, epoch=0, keep=2)
    assert [ckpt.marker_step(m) for m in ckpt.list_checkpoints(tmp_path)] == [20, 16, 15]


def test_checkpoints_past_the_start_are_set_aside_not_deleted(tmp_path, caplog):
    save_steps(tmp_path, 1, 2, 3)
    directory = tmp_path / "checkpoints"
    (directory / "step-00000004.pt").write_bytes(b"a payload whose marker was never written")
    (directory / "notes.txt").write_text("not ours")
    with caplog.at_level("WARNING", logger="harness"):
        aside = ckpt.set_aside_checkpoints_after(tmp_path, 1)
    assert sorted(p.name for p in aside.iterdir()) == ["step-00000002.json", "step-00000002.pt", "step-00000003.json",
                                                        "step-00000003.pt", "step-00000004.pt"]
    assert sorted(p.name for p in directory.iterdir() if p.is_file()) == ["notes.txt", "step-00000001.json", "step-00000001.pt"]
    assert f"moved checkpoint(s) step-00000002, step-00000003, step-00000004 to {aside}: this run continues from step 1" in caplog.text
    assert ckpt.set_aside_checkpoints_after(tmp_path, 1) is None  # nothing past step 1 now
    again = ckpt.set_aside_checkpoints_after(tmp_path, 0)  # a fresh start: all of them, in a folder of their own
    assert again != aside and sorted(p.name for p in again.iterdir()) == ["step-00000001.json", "step-00000001.pt"]
    assert "this run starts afresh" in caplog.text


def test_disk_full_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    ckpt.save_checkpoint(tmp_path, small_state(1), step=1, epoch=0, keep=3)
    real_fsync = os.fsync

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)  # every atomic write fsyncs
    with pytest.raises(HarnessError, match="No space left on device.*previous checkpoints are intact") as raised:
        ckpt.save_checkpoint(tmp_path, {"loop": {"step": 2}}, step=2, epoch=0, keep=3)
    assert raised.value.exit_status == 1  # the system's failure, as the README says, not bad input's 2
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000001.json", "step-00000001.pt"]
    assert ckpt.load_newest_valid(tmp_path)[1]["loop"]["step"] == 1


def test_unwritable_run_dir_is_a_clear_error(quick_shards, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = run(checkpointed_run(quick_shards, blocker / "run"))
    assert result.returncode == 2 and "not writable" in result.stderr and str(blocker) in result.stderr


def test_slow_checkpoint_write_on_rank_0_does_not_fail_the_job(quick_shards, tmp_path, reference):
    """Rank 0 takes 12 s to write the step-50 checkpoint (a slow shared filesystem), over
    twice --timeout (as in test_stops' slow stop record): rank 1 waits on rank 0's heartbeat
    instead of timing out, and the run ends with the uninterrupted run's weights."""
    run_dir = tmp_path / "run"
    result = run(checkpointed_run(quick_shards, run_dir, "--timeout", "5", nproc=2), env={"HARNESS_TEST_FAULT": "slowsave=12@50:0"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert checksum(run_dir) == reference[2]
    assert summary(run_dir)["loop_seconds_by_part"]["checkpoints"] >= 12  # the slow write happened, inside the loop


def test_a_checkpoint_holds_the_state_as_it_was_when_asked_for(tmp_path):
    """RunOutputs.checkpoint copies the tensors and returns; serialising and writing happen
    later, on the background writer. Training changing the weights in place, or the
    state's dicts, meanwhile (here before the writer even starts) does not reach the file."""
    import threading

    from harness.run_outputs import RunOutputs

    weights = torch.arange(6, dtype=torch.float32)
    state = {"model": {"w": weights}, "optimizer": {"state": {0: {"momentum_buffer": weights * 2}}}, "progress": {"step": 7}}
    changed = threading.Event()
    outputs = RunOutputs(tmp_path / "run", resumed_at=None)
    try:
        outputs.checkpoint(state, step=7, epoch=0, keep=3, before_write=lambda: changed.wait(10))
        weights.add_(100)  # the next steps
        state["optimizer"]["state"][0]["momentum_buffer"].zero_()
        state["progress"]["step"] = 8
        changed.set()
        outputs.wait_for_writes()
    finally:
        outputs.close()
    [marker] = ckpt.list_checkpoints(tmp_path / "run")
    saved = torch.load(marker.with_suffix(".pt"), weights_only=True)
    assert saved["model"]["w"].tolist() == [0, 1, 2, 3, 4, 5]
    assert saved["optimizer"]["state"][0]["momentum_buffer"].tolist() == [0, 2, 4, 6, 8, 10]
    assert saved["progress"] == {"step": 7}


def test_a_start_removes_the_temporary_files_of_killed_writes(tmp_path, caplog):
    """A SIGKILL during an atomic write leaves its .NAME.tmp-PID file (as large as a
    checkpoint), which nothing reads: the next start in the directory removes those, and
    only those."""
    from harness.run_outputs import RunOutputs

    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    leftovers = [run_dir / "checkpoints" / ".step-00000010.pt.tmp-4242", run_dir / ".summary.json.tmp-17"]
    kept = [run_dir / "checkpoints" / ".notes.tmp", run_dir / "notes.tmp-1", run_dir / ".model.pt.tmp-x"]
    for path in leftovers + kept:
        path.write_bytes(b"partial")
    (run_dir / ".folder.tmp-5").mkdir()
    with caplog.at_level("INFO", logger="harness"):
        RunOutputs(run_dir, resumed_at=None).close()
    assert not any(p.exists() for p in leftovers) and all(p.exists() for p in kept) and (run_dir / ".folder.tmp-5").is_dir()
    assert "removed 2 temporary file(s) of writes an earlier attempt did not finish" in caplog.text


def test_training_goes_on_while_a_checkpoint_file_is_written(quick_shards, tmp_path, reference):
    """The file of the step-150 checkpoint takes 3 s longer to write, on rank 0's background
    writer. Training goes on meanwhile and waits only for what is left of the write at the
    end (step 300), so the loop's checkpoint time is well under the 3 s a write on the
    training thread would cost. The weights are those of an uninterrupted run."""
    run_dir, slow = tmp_path / "run", 3.0
    result = run(checkpointed_run(quick_shards, run_dir, "--checkpoint-every", "150"), env={"HARNESS_TEST_FAULT": f"slowwrite={slow:g}@150"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    parts = summary(run_dir)["loop_seconds_by_part"]
    # Training overlapped the write by the 150 steps' time (steps 150-300 are half the
    # steps' part), up to the write's length; half of that overlap is required, and 0.3 s
    # allows for the two snapshots (about 30 ms each on a 2-core Xeon).
    overlap = min(parts["steps"] / 2, slow)
    assert parts["checkpoints"] < slow - overlap / 2 + 0.3, parts
    assert [json.loads(m.read_text())["step"] for m in ckpt.list_checkpoints(run_dir)] == [300, 150]
    assert checksum(run_dir) == reference[1]
    # The write did take its 3 s more: the file appeared that long after step 150's sync point,
    # whose event is logged before the write starts. 0.1 s: a file's time comes from the
    # kernel's coarse clock, which runs a few ms behind time.time()'s.
    logged = {e.step: e.wall_time for e in scalar_events(run_dir, "train/loss")}[150]
    assert (run_dir / "checkpoints" / "step-00000150.pt").stat().st_mtime - logged >= slow - 0.1


def test_a_slow_event_file_creation_on_rank_0_does_not_fail_the_job(shards, tmp_path):
    """Rank 0 takes 8 s more to create TensorBoard's event file, over --timeout: it does so
    in main_only, so rank 1 waits on its heartbeat, and the run finishes. (The file used to
    be created by rank 0's first scalars, at the first sync point of a resumed run, while
    rank 1 waited in an all-reduce that --timeout bounds.)"""
    run_dir = tmp_path / "run"
    train_ok(shards, run_dir, *SMALL_RUN, "--timeout", "5", nproc=2, env={"HARNESS_TEST_FAULT": "slowevents=8@0"})
    assert summary(run_dir)["steps"] == 30 and len(scalar_events(run_dir, "train/loss")) == 6


def test_ranks_that_find_different_checkpoints_are_refused(tmp_path):
    """RUN_DIR on node-local disks: rank 0 finds step 2, rank 1 nothing. Resuming from
    different steps would train divergent weights, or hang, so every rank stops with one
    error that says why. (Rank 1's answer comes through the fake gather.)"""
    import dataclasses

    from harness.config import TrainConfig

    class TwoRanks:  # rank 0 of two; the other rank found no checkpoint
        world_size = 2

        def gather(self, values):
            return [values, [-1]]

    save_steps(tmp_path, 1, 2)
    config = dataclasses.replace(TrainConfig(), lr=0.1, precision="fp32")  # small_state's config (without precision: fp32, as before the field)
    with pytest.raises(HarnessError, match=r"ranks found different checkpoints \(steps \[2, -1\]\); RUN_DIR must be on a filesystem every node shares"):
        ckpt.checkpoint_to_resume(TwoRanks(), tmp_path, "auto", config)


def test_a_failed_atomic_write_keeps_the_old_file(tmp_path, monkeypatch):
    """A write that fails (the disk fills at its fsync) leaves the old file as it was, and no
    temporary file (were the temporary the target, the write would truncate it, and the
    cleanup delete it)."""
    path = tmp_path / "summary.json"
    path.write_bytes(b"old")

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        write_bytes_atomic(path, b"new")
    monkeypatch.undo()
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_a_fresh_start_never_overwrites_a_finished_run(tmp_path):
    """A fresh start in a finished run's directory is refused (summary.json): a finished run without
    checkpoints (--checkpoint-every 0, or pruned by hand) would be trained over."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "summary.json").write_text('{"steps": 10}')
    (run_dir / "model.pt").write_bytes(b"weights")
    with pytest.raises(HarnessError, match=r"already holds a run \(summary.json exists\)"):
        prepare_run_dir(run_dir, resuming=False)
    assert (run_dir / "model.pt").read_bytes() == b"weights"


@pytest.mark.parametrize("name", ["model.pt", "test_report.json"])
def test_a_fresh_start_never_overwrites_a_loose_model_or_test_report(tmp_path, name):
    """Without summary.json or metrics.jsonl the directory holds no run, but a model.pt (or
    a test report) there, a finished run's whose summary was moved, or one put there by
    hand, would be overwritten at the new run's end."""
    (tmp_path / name).write_bytes(b"kept")
    with pytest.raises(HarnessError, match=f"^{tmp_path}: holds {name}, which this run would overwrite at its end; pick a new --run-dir, or move the file$"):
        prepare_run_dir(tmp_path, resuming=False)
    assert [p.name for p in tmp_path.iterdir()] == [name] and (tmp_path / name).read_bytes() == b"kept"


@pytest.mark.parametrize("where", ["run directory", "checkpoints", "report"])
def test_a_file_where_the_run_writes_a_directory_is_refused_before_training(tmp_path, where):
    """--run-dir naming a file, or a file named checkpoints or report in RUN_DIR: one line at
    start-up, not an OS error after an epoch of training (when the first checkpoint or the
    pictures were due), and the file is kept."""
    if where == "run directory":
        path = run_dir = tmp_path / "afile"
        expected = f"^{path}: is a file, not a directory; give --run-dir a directory \\(it is created if missing\\)$"
    else:
        run_dir, path = tmp_path, tmp_path / where
        what = "checkpoints" if where == "checkpoints" else "pictures"
        expected = f"^{path}: is a file where the run writes its {what}; move it, or pick a new --run-dir$"
    path.write_bytes(b"kept")
    with pytest.raises(HarnessError, match=expected):
        prepare_run_dir(run_dir, resuming=where != "run directory")
    assert path.read_bytes() == b"kept" and [p.name for p in tmp_path.iterdir()] == [path.name]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only directory")
def test_a_read_only_checkpoints_directory_is_refused_before_training(tmp_path):
    """A run (a resume here) whose checkpoints/ it cannot write to failed at its first
    checkpoint, after training up to it."""
    (tmp_path / "checkpoints").mkdir(mode=0o555)
    with pytest.raises(HarnessError, match=f"^{tmp_path / 'checkpoints'}: checkpoints directory is not writable \\(Permission denied\\)$"):
        prepare_run_dir(tmp_path, resuming=True)


def test_a_shard_set_is_not_a_run_directory(tmp_path):
    """--run-dir given the shard directory mixed the run's files into the shard set."""
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(HarnessError, match=f"^{tmp_path}: holds a shard set \\(manifest.json\\); a run's files go in a directory of their own$"):
        prepare_run_dir(tmp_path, resuming=False)
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def test_a_run_into_a_directory_another_run_is_writing_to_is_refused_before_it_writes(shards, tmp_path):
    """Two runs into one RUN_DIR (the same command twice, two Slurm jobs given one RUN_DIR):
    the second resumed from the first's checkpoint, removed its unfinished writes, set its
    newer checkpoints aside and wrote a second event file, whose purge hid part of the
    first run's curves in TensorBoard, and failed only when the two met at a checkpoint's
    step. A process holding the lock stands in for the first run here, with an
    unfinished write and checkpoints that such a resume would have moved."""
    run_dir = tmp_path / "run"
    train_ok(shards, run_dir, *SMALL_RUN, "--max-steps", "10", "--checkpoint-every", "5")
    (run_dir / "summary.json").unlink()  # as while the first run trains
    (run_dir / "checkpoints" / ".step-00000015.pt.tmp-99999").write_bytes(b"being written")
    with lock_held_by_another_process(run_dir) as holder:
        before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
        result = run(train_command(shards, run_dir, *SMALL_RUN, "--max-steps", "15", "--checkpoint-every", "5"))
        assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
        assert f"error: {run_dir}: another run is writing to it (its lock file names pid {holder.pid} on " in result.stderr
        assert "wait for it to end, or pick a new --run-dir" in result.stderr and "Traceback" not in result.stderr
        assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
    # The lock goes with its process: the same command now resumes.
    result = run(train_command(shards, run_dir, *SMALL_RUN, "--max-steps", "15", "--checkpoint-every", "5"))
    assert result.returncode == 0 and "resuming from" in result.stdout + result.stderr, result.stderr[-2000:]


def test_a_filesystem_without_file_locks_gets_a_warning_and_no_lock(tmp_path, monkeypatch, caplog):
    """Lustre mounted without flock answers ENOSYS, an NFS server without a lock manager
    ENOLCK: the run goes on, unguarded, and says so."""
    import fcntl

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with caplog.at_level("WARNING", logger="harness"):
        _, lock = prepare_run_dir(tmp_path, resuming=False)
    assert lock.fd is None
    assert f"{tmp_path / 'lock'}: no file locks on this filesystem (No locks available); a second run started into" in caplog.text


def test_a_lock_file_that_cannot_be_opened_is_one_line(tmp_path, capsys):
    """A directory named `lock` in RUN_DIR (or another user's lock file): one error naming
    it, and no "Exception ignored" traceback from the half-made lock after it. A FIFO
    named `lock` alike."""
    import subprocess
    import sys

    (tmp_path / "lock").mkdir()
    with pytest.raises(HarnessError, match=f"^{tmp_path / 'lock'}: cannot open the run directory's lock file \\(Is a directory\\); move it, or pick a new --run-dir$"):
        prepare_run_dir(tmp_path, resuming=False)
    result = subprocess.run([sys.executable, "-c", "import sys; from harness.run_lock import RunDirLock; RunDirLock(sys.argv[1])", str(tmp_path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and result.stderr.count("Traceback") == 1 and "Exception ignored" not in result.stderr, result.stderr
    (tmp_path / "lock").rmdir()
    os.mkfifo(tmp_path / "lock")  # opened read-write it does not block, and could not be truncated
    with pytest.raises(HarnessError, match=f"^{tmp_path / 'lock'}: the run directory's lock file is not a regular file; move it"):
        prepare_run_dir(tmp_path, resuming=False)


def test_a_default_run_directory_refused_at_start_up_is_removed_with_its_lock(tmp_path, monkeypatch):
    """A run without --run-dir that fails after rank 0 locked its new directory (another
    rank's error, say) left runs/NAME-.../lock behind: the directory was no longer empty."""
    from harness.default_run_dir import remove_if_unused

    monkeypatch.chdir(tmp_path)
    run_dir, _ = prepare_run_dir(Path("runs/lenet-20261129-120000"), resuming=False)
    assert [p.name for p in run_dir.iterdir()] == ["lock"]
    remove_if_unused(run_dir)
    assert list((tmp_path / "runs").iterdir()) == []
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("{}\n")  # the run wrote something: it stays
    remove_if_unused(run_dir)
    assert (run_dir / "metrics.jsonl").exists()


def test_a_stop_while_the_shard_set_opens_writes_nothing_into_a_directory_another_run_holds(shards, tmp_path, monkeypatch):
    """A second run into a busy RUN_DIR, stopped by a SIGTERM while it opened its shard set
    (before RunOutputs takes the lock), wrote its stopped.json among the first run's files,
    where train.sbatch would read it as that run's stop. Now it is refused there as it
    would have been a moment later, and writes nothing."""
    import signal

    from harness.distributed import DistContext
    from harness.run_lock import RunDirLock
    from harness.stopping import StopRequest
    from harness.train import open_shards

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = RunDirLock(run_dir)  # another open file of the lock: refused as another process's would be
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # this test's process keeps its own handlers
    stop_request = StopRequest()
    stop_request.signal_name = "SIGTERM"
    with pytest.raises(HarnessError, match="another run is writing to it"):
        open_shards(DistContext(), shards, None, None, stop_request, run_dir)
    assert not (run_dir / "stopped.json").exists()
    holder.release()
    from harness.sync_point import Stopped

    with pytest.raises(Stopped):  # with the directory free, the stop is recorded as before
        open_shards(DistContext(), shards, None, None, stop_request, run_dir)
    assert json.loads((run_dir / "stopped.json").read_text()) == {"step": 0, "signal": "SIGTERM"}
