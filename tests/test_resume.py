"""Resuming: a killed or restarted run ends with an uninterrupted run's weights; a resume
that cannot continue the same experiment is refused with every file left as it was."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import PAUSE, ROOT, SMALL_RUN, checkpointed_run, checksum, run, scalar_steps, snapshot, start_and_signal, summary, train_command, train_ok, wait_for

from harness import checkpoint as ckpt
from harness.data.pack import pack
from harness.data.sources import load_source
from harness.optimizer import load_optimizer_state


def test_sigkill_then_resume_is_bitwise_exact(quick_shards, tmp_path, reference):
    """One process (two ranks killed and resumed: test_torchrun_elastic_restart_after_a_worker_is_killed)."""
    run_dir = tmp_path / "run"
    killed = start_and_signal(checkpointed_run(quick_shards, run_dir), run_dir, signal.SIGKILL, env=PAUSE)
    assert killed.returncode != 0
    assert not (run_dir / "summary.json").exists(), "the kill came too late to test anything"
    result = run(checkpointed_run(quick_shards, run_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from" in result.stdout
    assert checksum(run_dir) == reference[1]
    # The split of the loop's time is this process's: the epoch's steps before the kill are not in it.
    parts = summary(run_dir)["loop_seconds_by_part"]
    # Rounded to 1e-4 s each (loop_breakdown): five parts sum to the total within 2.5e-4.
    assert parts["other"] >= -1e-3 and sum(parts.values()) == pytest.approx(summary(run_dir)["total_seconds"], abs=1e-3), parts
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1]
    # Steps logged before the kill and redone after it are shown once (purge_step).
    steps = scalar_steps(run_dir, "train/loss")
    assert steps == sorted(set(steps)) and steps[-1] == 300, steps


def test_torchrun_elastic_restart_after_a_worker_is_killed(quick_shards, tmp_path, reference):
    """Rank 1 SIGKILLs itself before step 120 on the first attempt; torchrun restarts the group,
    which resumes from the step-100 checkpoint and finishes with the uninterrupted weights.
    Without --run-dir: the restarted attempt finds the directory the first one chose (it
    took the clock of its own start, and began again from step 0 in a new directory)."""
    env = {"HARNESS_TEST_FAULT": "kill@120:1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}  # as launch/torchrun.sh sets it
    command = checkpointed_run(quick_shards, Path("unused"), nproc=2, launcher_args=("--max-restarts=1",))
    del command[command.index("--run-dir") : command.index("--run-dir") + 2]
    result = run(command, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    [run_dir] = [Path("runs") / d.name for d in (tmp_path / "runs").iterdir()]  # one directory, and the finished run's record gone
    summary = json.loads((tmp_path / run_dir / "summary.json").read_text())
    assert summary["steps_per_rank"] == [300, 300]
    assert summary["param_checksum"] == reference[2]
    # Only a restarted attempt resumes (the first started afresh), and from step 100, the last checkpoint before the kill.
    assert f"resuming from {run_dir / 'checkpoints' / 'step-00000100.pt'} (epoch 1, step 100)" in result.stdout + result.stderr


def test_world_size_change_on_resume_continues(quick_shards, tmp_path, reference):
    run_dir = tmp_path / "run"
    assert run(checkpointed_run(quick_shards, run_dir, "--max-steps", "100")).returncode == 0
    result = run(checkpointed_run(quick_shards, run_dir, nproc=2))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (result.stdout + result.stderr).count("resuming a world-size-1 run with world size 2") == 1  # rank 0's line, not one per rank
    assert json.loads((run_dir / "summary.json").read_text())["steps_per_rank"] == [300, 300]


def test_every_rank_gets_its_own_rng_state_back(quick_shards, tmp_path):
    """A checkpoint holds each rank's CPU generator state, and a resumed rank R gets rank R's
    back. A test hook makes the ranks' states differ (training draws nothing from it after
    the initial weights), so rank 0's state saved twice, or a rank restoring another's,
    shows; each rank saves its state at the end of both runs."""
    run_dir, rng = tmp_path / "run", tmp_path / "rng"
    env = {"HARNESS_TEST_RANK_RNG": str(rng)}
    assert run(checkpointed_run(quick_shards, run_dir, "--max-steps", "50", nproc=2), env=env).returncode == 0
    _, state = ckpt.load_newest_valid(run_dir)
    saved = state["rng"]["torch"]
    assert len(saved) == 2 and all(t.dtype == torch.uint8 for t in saved) and not torch.equal(saved[0], saved[1])
    assert all(t.device.type == "cpu" for t in state["model"].values())

    def ended_equal_saved() -> bool:
        ended = [torch.load(rng / f"rank-{r}-rng.pt", weights_only=True) for r in (0, 1)]
        return all(torch.equal(ended[r], saved[r]) for r in (0, 1))

    assert ended_equal_saved()  # the checkpoint holds each rank's own
    shutil.rmtree(rng)  # the resumed run writes them again
    result = run(checkpointed_run(quick_shards, run_dir, "--max-steps", "100", nproc=2), env=env)
    assert result.returncode == 0 and "resuming from" in result.stdout, result.stderr[-3000:]
    assert ended_equal_saved()  # each rank restored its own (and drew nothing since)


def test_resume_from_a_named_checkpoint(quick_shards, tmp_path, reference):
    """--resume PATH continues another run directory's checkpoint in a new one, exactly."""
    first = tmp_path / "first"
    result = run(checkpointed_run(quick_shards, first, "--max-steps", "150", "--keep-checkpoints", "5"))
    assert result.returncode == 0, result.stderr[-3000:]
    path = first / "checkpoints" / "step-00000100.pt"
    result = run(checkpointed_run(quick_shards, tmp_path / "second", "--resume", path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming from {path} (epoch 1, step 100)" in result.stdout
    assert checksum(tmp_path / "second") == reference[1]


def test_another_runs_checkpoint_does_not_overwrite_a_run_or_finish_with_nothing_trained(shards, tmp_path):
    """--resume PATH with another run directory's checkpoint starts a run in RUN_DIR: one
    that holds a finished run is refused, as a fresh start there is (its summary, model
    and report used to be replaced by the other run's, beside its own metrics); and one
    with nothing left to train (step 20 with --max-steps 10) is refused before RUN_DIR is
    made (it used to write a summary and model with no metrics.jsonl, which `report`
    then refused)."""
    other, finished = tmp_path / "other", tmp_path / "finished"
    train_ok(shards, other, *SMALL_RUN)
    train_ok(shards, finished, *SMALL_RUN, "--max-steps", "10")
    files = snapshot(finished)
    step_20 = other / "checkpoints" / "step-00000020.pt"
    result = run(train_command(shards, finished, *SMALL_RUN, "--resume", step_20))
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"error: {finished}: already holds a run (metrics.jsonl exists) that this one would not continue "
        "(--resume never, another run's checkpoint, or no valid checkpoint to resume from); pick a new --run-dir"
    ], result.stderr[-3000:]
    assert snapshot(finished) == files
    result = run(train_command(shards, tmp_path / "new", *SMALL_RUN, "--max-steps", "10", "--resume", step_20))
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"error: --resume {step_20}: nothing is left to train from it (step 20, 2 epochs done; --epochs 3, --max-steps 10)"
    ], result.stderr[-3000:]
    assert not (tmp_path / "new").exists()
    own = finished / "checkpoints" / "step-00000010.pt"  # a run's own checkpoint, named: it continues there
    assert "resuming from" in train_ok(shards, finished, *SMALL_RUN, "--resume", own).stdout and summary(finished)["steps"] == 30


def test_another_runs_checkpoint_sets_aside_every_checkpoint_the_directory_held(shards, tmp_path):
    """RUN_DIR holds checkpoints and no metrics (a run stopped before its first epoch's end):
    --resume with another run's step-20 set aside only those after step 20, and the older
    ones, none of this run's, were pruned by --keep-checkpoints among the new ones. All go
    aside now, and come back byte for byte."""
    other, stopped = tmp_path / "other", tmp_path / "stopped"
    train_ok(shards, other, *SMALL_RUN)
    train_ok(shards, tmp_path / "earlier", *SMALL_RUN, "--max-steps", "10", "--seed", "1")
    (stopped / "checkpoints").mkdir(parents=True)
    for path in (tmp_path / "earlier" / "checkpoints").glob("step-*"):
        shutil.copy(path, stopped / "checkpoints" / path.name)
    own = {p.name: p.read_bytes() for p in (stopped / "checkpoints").iterdir()}
    result = train_ok(shards, stopped, *SMALL_RUN, "--keep-checkpoints", "1", "--resume", other / "checkpoints" / "step-00000020.pt")
    assert "moved checkpoint(s) step-00000010 to" in result.stdout + result.stderr
    assert "this run continues from another run's step 20, not from them" in result.stdout + result.stderr
    (aside,) = (stopped / "checkpoints").glob("set-aside-*")
    assert {p.name: p.read_bytes() for p in aside.iterdir()} == own
    assert sorted(p.name for p in (stopped / "checkpoints").glob("step-*")) == ["step-00000030.json", "step-00000030.pt"]


def test_metrics_of_more_than_a_first_epoch_without_checkpoints_are_refused_not_emptied(shards, tmp_path):
    """A fresh start with no checkpoint takes RUN_DIR for a run killed before its first
    checkpoint, which leaves two metrics lines at most (see the test above), and drops
    them. Three epochs' lines (a run whose checkpoints were deleted to free space) were
    emptied too, silently: refused."""
    earlier = tmp_path / "earlier"
    train_ok(shards, earlier, *SMALL_RUN)
    kept = tmp_path / "kept"
    kept.mkdir()
    lines = (earlier / "metrics.jsonl").read_bytes()
    (kept / "metrics.jsonl").write_bytes(lines)
    result = run(train_command(shards, kept, *SMALL_RUN))
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"error: {kept}: its metrics.jsonl holds 3 epoch line(s) (up to epoch 3) and there is no checkpoint to resume from: "
        "more than a run killed before its first checkpoint leaves, and a fresh start would drop them; pick a new --run-dir, or move the file"
    ], result.stderr[-3000:]
    assert (kept / "metrics.jsonl").read_bytes() == lines
    (kept / "metrics.jsonl").write_bytes(lines.splitlines(keepends=True)[0])  # what a run killed before its first checkpoint leaves
    train_ok(shards, kept, *SMALL_RUN)
    assert [json.loads(line)["epoch"] for line in (kept / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_resume_from_a_missing_checkpoint_is_a_clear_error(quick_shards, tmp_path):
    missing = tmp_path / "checkpoints" / "step-00000100.pt"
    result = run(checkpointed_run(quick_shards, tmp_path / "run", "--resume", missing))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: --resume {missing}: no such checkpoint file (give auto, never, or a checkpoint's step-N.pt)"]


def test_changed_config_is_refused_on_resume(quick_shards, tmp_path):
    run_dir = tmp_path / "run"
    assert run(checkpointed_run(quick_shards, run_dir, "--max-steps", "50")).returncode == 0
    result = run(checkpointed_run(quick_shards, run_dir, "--lr", "0.05"))
    assert result.returncode == 2
    assert "different --lr" in result.stderr and "step-00000050.pt" in result.stderr
    assert result.stderr.rstrip().endswith("train with the new settings in a new --run-dir")  # advice that works (--resume never there is refused)


def test_another_shard_set_is_refused_on_resume_and_a_copy_is_not(shards, tmp_path):
    """Checkpoints record the shard set they were trained on (its manifest's blocks and
    shards, hashed). The same images packed in blocks of 40 (another order) are refused
    before anything is written: the run used to go on, on the other data, and a finished
    run resumed on a smaller set rewrote its metrics with the other set's. The same set
    copied elsewhere resumes."""
    run_dir = tmp_path / "run"
    train_ok(shards, run_dir, *SMALL_RUN, "--max-steps", "10")
    files = snapshot(run_dir)
    reblocked = tmp_path / "reblocked"
    pack(load_source(tmp_path / "src"), reblocked, shard_size=80, block_size=40)  # the `shards` fixture's images
    result = run(train_command(reblocked, run_dir, *SMALL_RUN))
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"error: {run_dir / 'checkpoints' / 'step-00000010.pt'}: was written with a different shard set (--shards: other images, "
        "or packed with another --block-size or --shard-size); resuming would mix two experiments: train with the new settings in a new --run-dir"
    ], result.stderr[-3000:]
    assert snapshot(run_dir) == files
    copy = shutil.copytree(shards, tmp_path / "copy")
    resumed = train_ok(copy, run_dir, *SMALL_RUN)
    assert "resuming from" in resumed.stdout and summary(run_dir)["steps"] == 30


def test_resume_never_refuses_a_run_dir_with_a_run(quick_shards, tmp_path):
    run_dir = tmp_path / "run"
    assert run(checkpointed_run(quick_shards, run_dir, "--max-steps", "25")).returncode == 0
    before = (run_dir / "metrics.jsonl").read_bytes()
    result = run(checkpointed_run(quick_shards, run_dir, "--resume", "never"))
    assert result.returncode == 2 and "already holds a run (metrics.jsonl exists) that this one would not continue (--resume never" in result.stderr
    assert (run_dir / "metrics.jsonl").read_bytes() == before


def test_a_run_killed_before_its_first_checkpoint_starts_again(shards, tmp_path):
    """Killed after the first epoch's validation (its metrics line written) but before its
    checkpoint was: the directory holds no checkpoint to resume from, so the rerun of the
    same command (a batch script's, torchrun --max-restarts') starts afresh there, where
    it used to be refused ("already holds a run"), and ends as an uninterrupted run."""
    whole, run_dir = tmp_path / "whole", tmp_path / "run"
    train_ok(shards, whole, *SMALL_RUN)
    # The background writer sleeps 60 s before it writes step 10's checkpoint (epoch 1's).
    process = subprocess.Popen(train_command(shards, run_dir, *SMALL_RUN), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "HARNESS_TEST_FAULT": "slowwrite=60@10"})
    try:
        # (Epoch 2's line may follow before the kill: its checkpoint waits for epoch 1's.)
        wait_for(lambda: (run_dir / "metrics.jsonl").is_file() and (run_dir / "metrics.jsonl").read_text().strip(), 120,
                 "the first epoch's metrics line")
    finally:
        process.kill()
        process.wait(timeout=60)
    assert not list((run_dir / "checkpoints").glob("step-*"))
    rerun = train_ok(shards, run_dir, *SMALL_RUN)
    assert "resuming" not in rerun.stdout
    assert summary(run_dir)["param_checksum"] == summary(whole)["param_checksum"]
    assert [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    (run_dir / "summary.json").unlink()  # a finished run's directory, but for its summary: still refused
    refused = run(train_command(shards, run_dir, *SMALL_RUN, "--resume", "never"))
    assert refused.returncode == 2 and "already holds a run (metrics.jsonl exists)" in refused.stderr


def test_a_resume_with_a_damaged_metrics_line_is_one_clear_error(shards, tmp_path):
    """A resume rewrites metrics.jsonl without the epochs it will redo; a line there that is
    not a metrics line is one error naming the file and line (it was a JSON traceback), and
    the file is left as it was."""
    run_dir = tmp_path / "run"
    train_ok(shards, run_dir, *SMALL_RUN, "--max-steps", "12")
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"epoch": "three"}\n')
    before = (run_dir / "metrics.jsonl").read_bytes()
    result = run(train_command(shards, run_dir, *SMALL_RUN, "--max-steps", "15"))
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"{run_dir / 'metrics.jsonl'}: line 3: " in result.stderr and "Traceback" not in result.stderr
    assert (run_dir / "metrics.jsonl").read_bytes() == before


def test_a_resume_drops_a_metrics_line_a_crash_cut_short(tmp_path):
    """metrics.jsonl's line for an epoch is written before the epoch's checkpoint, so a line
    a crash cut short (no newline) is of an epoch the resume redoes: it is dropped with the
    other redone lines, not refused as damage. A restart from step 0 reads no line at all."""
    from harness.run_outputs import RunOutputs

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    line = lambda epoch: json.dumps({"epoch": epoch, "train_loss": 0.5, "val_loss": 0.4, "val_accuracy": 0.9})  # noqa: E731
    (run_dir / "metrics.jsonl").write_text(line(1) + "\n" + line(2) + "\n" + line(3)[:20])
    outputs = RunOutputs(run_dir, resumed_at=20)
    try:
        outputs.keep_epochs(1)
        assert (run_dir / "metrics.jsonl").read_text() == line(1) + "\n"
        (run_dir / "metrics.jsonl").write_text("not a metrics line\n")
        outputs.keep_epochs(0)
        assert (run_dir / "metrics.jsonl").read_text() == ""
    finally:
        outputs.close()


def test_a_partial_epochs_validation_does_not_count_toward_early_stopping(shards, tmp_path):
    """--max-steps 15 ends mid-epoch 2: that validation is logged, but early stopping, whose
    count the checkpoint carries into a resumed run, compares whole epochs only."""
    run_dir = tmp_path / "run"
    result = train_ok(shards, run_dir, *SMALL_RUN, "--early-stopping", "1", "--max-steps", "15")
    assert "--early-stopping 1 without --holdout: when to stop is chosen on the test set" in result.stdout  # a warning
    loop = ckpt.load_verified(ckpt.list_checkpoints(run_dir)[0])["loop"]
    first_epoch = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert (loop["step"], loop["best_val"], loop["stale_epochs"]) == (15, first_epoch["val_loss"], 0)
    assert loop["last_metrics"]["step"] == 15  # the partial epoch was validated


def test_a_resumed_optimizer_keeps_this_runs_update_kernel():
    """A saved optimizer state carries its writer's foreach/fused flags; the run that loads
    it keeps its own (a GPU run's CUDA graph can capture only the fused update) and takes
    the rest, the lr among it."""
    params = [torch.nn.Parameter(torch.ones(3))]
    default = torch.optim.SGD(params, lr=0.1, momentum=0.9)  # as the CPU builds it
    fused = torch.optim.SGD(params, lr=0.1, momentum=0.9, fused=True)  # as a GPU run does (the CPU has a fused SGD too)
    gpu_state, cpu_state = fused.state_dict(), default.state_dict()
    gpu_state["param_groups"][0]["lr"] = cpu_state["param_groups"][0]["lr"] = 0.05
    load_optimizer_state(default, gpu_state)
    load_optimizer_state(fused, cpu_state)
    assert (default.param_groups[0]["fused"], default.param_groups[0]["lr"]) == (None, 0.05)
    assert (fused.param_groups[0]["fused"], fused.param_groups[0]["lr"]) == (True, 0.05)
