"""Checkpoints, exact resume and fault tolerance, with real processes and real signals."""

from __future__ import annotations

import errno
import gc
import hashlib
import io
import json
import os
import pickle
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from helpers import (ROOT, Payload, checkpointed_run, kill_tree, run, signal_tree, snapshot, start_and_signal, summary, tiny_training_objects,
                     train_command, train_ok, wait_for, write_source)
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from harness import checkpoint as ckpt
from harness.atomic import write_bytes_atomic
from harness.config import load_preset
from harness.data.pack import pack
from harness.data.sources import load_source
from harness.errors import HarnessError, run_guarded
from harness.run_outputs import prepare_run_dir
from harness.stopping import EXIT_STOPPED
from harness.train import load_optimizer_state

# A signal lands 1 s after the step-50 checkpoint appears (start_and_signal); here the 250
# steps left take about 5 s, but a CPU 3x faster would finish first. Rank 0 pauses 5 s
# before step 130, so the signal lands mid-run on any machine (the weights are unchanged).
PAUSE = {"HARNESS_TEST_FAULT": "sleep=5@130"}


def checksum(run_dir: Path) -> str:
    return json.loads((run_dir / "summary.json").read_text())["param_checksum"]


@pytest.fixture(scope="module")
def reference(mnist_shards, tmp_path_factory):
    """Uninterrupted runs with 1 and 2 processes: the checksums a resumed run must reproduce."""
    base = tmp_path_factory.mktemp("reference")
    for nproc in (1, 2):
        result = run(checkpointed_run(mnist_shards, base / f"w{nproc}", nproc=nproc))
        assert result.returncode == 0, result.stderr[-3000:]
    return {nproc: checksum(base / f"w{nproc}") for nproc in (1, 2)}


def test_sigkill_then_resume_is_bitwise_exact(mnist_shards, tmp_path, reference):
    """One process (two ranks killed and resumed: test_torchrun_elastic_restart_after_a_worker_is_killed)."""
    run_dir = tmp_path / "run"
    killed = start_and_signal(checkpointed_run(mnist_shards, run_dir), run_dir, signal.SIGKILL, env=PAUSE)
    assert killed.returncode != 0
    assert not (run_dir / "summary.json").exists(), "the kill came too late to test anything"
    result = run(checkpointed_run(mnist_shards, run_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from" in result.stdout
    assert checksum(run_dir) == reference[1]
    # The split of the loop's time is this process's: the epoch's steps before the kill are not in it.
    parts = summary(run_dir)["loop_seconds_by_part"]
    assert parts["other"] > -0.01 and sum(parts.values()) == pytest.approx(summary(run_dir)["total_seconds"], abs=0.01), parts
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1]
    # Steps logged before the kill and redone after it are shown once (purge_step).
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    steps = [e.step for e in events.Scalars("train/loss")]
    assert steps == sorted(set(steps)) and steps[-1] == 300, steps


def sync_points(steps: int = 300, log_every: int = 25, macro_steps: int = 7000 // load_preset("lenet")["batch_size"], checkpoint_every: int = 50) -> set[int]:
    """Steps after which CHECKPOINTED_RUN's loop syncs: a full --log-every window, a macro-batch's end, a due checkpoint, the last step."""
    points, window = set(), 0
    for step in range(1, steps + 1):
        window += 1
        if window == log_every or step % macro_steps == 0 or step % checkpoint_every == 0 or step == steps:
            points.add(step)
            window = 0
    return points


def test_sigterm_checkpoints_and_exits_with_the_stop_status(mnist_shards, tmp_path, reference):
    run_dir = tmp_path / "run"
    stopped = start_and_signal(checkpointed_run(mnist_shards, run_dir), run_dir, signal.SIGTERM, env=PAUSE)
    assert stopped.returncode == EXIT_STOPPED
    assert json.loads((run_dir / "stopped.json").read_text())["signal"] == "SIGTERM"
    markers = ckpt.list_checkpoints(run_dir)
    stop_step = json.loads(markers[0].read_text())["step"]
    assert stop_step in sync_points(), stop_step  # every rank stopped at the same sync point
    assert stop_step < 300
    result = run(checkpointed_run(mnist_shards, run_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"step {stop_step})" in result.stdout
    assert checksum(run_dir) == reference[1]


def test_a_first_ctrl_c_asks_for_a_stop_and_a_second_interrupts(capsys):
    """After a stop is asked for, Ctrl-C raises KeyboardInterrupt as Python's own handler
    does (a stop that takes too long, or a hung run, can still be ended), and a command
    ends on it with one line and status 130 (128 + SIGINT), as a C tool does."""
    from harness.errors import run_guarded
    from harness.stopping import StopRequest

    request = StopRequest()  # (the conftest puts the test process's own handlers back)
    os.kill(os.getpid(), signal.SIGINT)
    assert request.signal_name == "SIGINT"  # the flag a SIGTERM sets: the stop that follows is the SIGTERM test's
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
    request = StopRequest()
    os.kill(os.getpid(), signal.SIGTERM)  # Ctrl-C after a SIGTERM, too
    assert run_guarded(lambda args: os.kill(os.getpid(), signal.SIGINT), None) == 130
    assert capsys.readouterr().err == "interrupted\n"


def test_a_second_ctrl_c_as_a_stopped_run_ends_keeps_its_stop_status(monkeypatch, capsys):
    """A second Ctrl-C 0.05-0.1 s after the stop's checkpoint (a reviewer's repro) landed in
    run_guarded's closing gc.collect: a KeyboardInterrupt traceback, and status 130 for a
    run that had stopped and checkpointed (75)."""
    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(gc, "collect", interrupted)  # where the second SIGINT's handler raised
    assert run_guarded(lambda args: EXIT_STOPPED, None) == EXIT_STOPPED
    assert capsys.readouterr().err == ""


def test_a_second_ctrl_c_does_not_wait_for_a_checkpoint_write_in_progress(shards, tmp_path):
    """README: a second SIGINT "ends it at once". The background writer is writing the
    step-10 checkpoint slowly (60 s, a slow filesystem): the run used to wait it out before
    it exited (57 s measured), past torchrun's 30 s grace period."""
    run_dir = tmp_path / "run"
    cmd = train_command(shards, run_dir, "--model", "mlp", "--hidden", "8", "--epochs", "50", "--batch-size", "20", "--threads", "1", "--device", "cpu")
    process = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "HARNESS_TEST_FAULT": "slowwrite=60@10:0"})
    try:
        metrics = run_dir / "metrics.jsonl"
        wait_for(lambda: metrics.exists() and metrics.read_text().strip(), 120, "epoch 1's validation")  # its checkpoint comes next
        time.sleep(1.0)
        process.send_signal(signal.SIGINT)
        time.sleep(0.5)
        process.send_signal(signal.SIGINT)
        started = time.monotonic()
        output = process.communicate(timeout=40)[0]
        assert time.monotonic() - started < 15, output
        assert process.returncode == 130, output
        assert "interrupted" in output.splitlines()[-1]
    finally:
        kill_tree(process)


@pytest.mark.parametrize("nproc", [1, 2])
def test_sigterm_during_start_up_stops_before_training_for_a_requeue(mnist_shards, tmp_path, reference, nproc):
    """A SIGTERM to every process of the job as soon as rank 0 has joined the process group
    (Slurm's preemption can come at any time): the ranks finish starting up, agree to stop
    before their first step, and leave stopped.json for train.sbatch to requeue on. Before,
    the signal killed the ranks outright and the job was not requeued. The rerun trains
    from the start (there is no checkpoint) and, with one process, ends as the reference."""
    run_dir = tmp_path / "run"
    process = subprocess.Popen(checkpointed_run(mnist_shards, run_dir, nproc=nproc), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    output = []
    try:
        for line in process.stdout:  # EOF if the run ends without the line
            output.append(line)
            if line.startswith("run directory "):  # rank 0's first line, once every rank has joined
                signal_tree(process, signal.SIGTERM)
                break
        output.append(process.communicate(timeout=120)[0])
    finally:
        if process.poll() is None:
            signal_tree(process, signal.SIGKILL)
            process.wait()
    output = "".join(output)
    assert "SIGTERM: stopped at step 0 before training, with nothing new to checkpoint" in output, output[-3000:]
    if nproc == 1:
        assert process.returncode == EXIT_STOPPED and "Traceback" not in output
    else:  # torchrun's agent, signalled too, exits 1 and prints its SignalException's traceback
        assert "[rank 1] WARNING SIGTERM: stopped at step 0 before training" in output
    assert json.loads((run_dir / "stopped.json").read_text()) == {"step": 0, "signal": "SIGTERM"}
    assert ckpt.list_checkpoints(run_dir) == []
    result = run(checkpointed_run(mnist_shards, run_dir, nproc=nproc))
    assert result.returncode == 0, result.stderr[-3000:]
    assert summary(run_dir)["steps"] == 300 and not (run_dir / "stopped.json").exists()
    assert checksum(run_dir) == reference[nproc]


# The small shard set (conftest's `shards`): 10 steps of 20 images per epoch, a sync point every 5.
SMALL = ("--model", "mlp", "--hidden", "32", "--device", "cpu", "--batch-size", "20", "--epochs", "3", "--log-every", "5",
         "--threads", "1")


def scalar_events(run_dir: Path, tag: str) -> list:
    """The points TensorBoard shows for `tag` (step, wall_time, value), over every event file
    of the run (purges applied)."""
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return events.Scalars(tag)


def scalar_steps(run_dir: Path, tag: str) -> list[int]:
    return [e.step for e in scalar_events(run_dir, tag)]


def test_a_stop_at_an_epochs_end_waits_for_its_validation_and_checkpoint(shards, tmp_path):
    """A SIGTERM during an epoch's last step stops the run after that epoch's validation,
    with the epoch's checkpoint: a step is checkpointed once, in the state a resume
    continues from. The resumed run ends as an uninterrupted one, and TensorBoard shows
    each step once, the stop step's points included."""
    train_ok(shards, tmp_path / "whole", *SMALL)
    run_dir = tmp_path / "stopped"
    stopped = run(train_command(shards, run_dir, *SMALL), env={"HARNESS_TEST_FAULT": "term@9"})  # during step 10
    assert stopped.returncode == EXIT_STOPPED, stopped.stderr[-3000:]
    assert json.loads((run_dir / "stopped.json").read_text())["step"] == 10
    (marker,) = ckpt.list_checkpoints(run_dir)
    loop = ckpt.load_verified(marker)["loop"]
    assert (loop["step"], loop["epoch"], loop["macro"], loop["last_metrics"]["epoch"]) == (10, 1, 0, 1)  # validated, then saved
    resumed = train_ok(shards, run_dir, *SMALL)
    assert "resuming from" in resumed.stdout
    assert summary(run_dir)["param_checksum"] == summary(tmp_path / "whole")["param_checksum"]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    for tag in ("train/loss", "val/loss", "val/accuracy"):
        assert scalar_steps(run_dir, tag) == scalar_steps(tmp_path / "whole", tag), tag


def test_a_stop_during_validation_stops_between_the_epochs_with_the_epochs_checkpoint(shards, tmp_path):
    """A SIGTERM to rank 0 while it validates epoch 1, after the epoch's last sync point:
    both ranks stop before epoch 2 (the all-reduce between epochs), with epoch 1's
    checkpoint, not at epoch 2's first sync point; resumed, the run ends as an
    uninterrupted one. (Rank 1 had no signal: torchrun forwards none here.)"""
    train_ok(shards, tmp_path / "whole", *SMALL, nproc=2)
    run_dir = tmp_path / "stopped"
    stopped = run(train_command(shards, run_dir, *SMALL, nproc=2), env={"HARNESS_TEST_FAULT": "termval@10"})
    output = stopped.stdout + stopped.stderr
    assert json.loads((run_dir / "stopped.json").read_text()) == {"step": 10, "signal": "SIGTERM"}, output[-3000:]
    assert "[rank 1] WARNING stop signal on another rank: stopped at step 10" in output, output[-3000:]
    (marker,) = ckpt.list_checkpoints(run_dir)
    loop = ckpt.load_verified(marker)["loop"]
    assert (loop["step"], loop["epoch"], loop["macro"]) == (10, 1, 0)
    resumed = train_ok(shards, run_dir, *SMALL, nproc=2)
    assert "resuming from" in resumed.stdout
    assert summary(run_dir)["param_checksum"] == summary(tmp_path / "whole")["param_checksum"]


def test_an_extended_run_stopped_at_its_new_last_step_finishes_when_rerun(shards, tmp_path):
    """A finished run extended with a larger --max-steps, and stopped by a signal at its
    new last step (mid-epoch 2): the rerun has nothing left to train, but the summary.json
    there is the shorter run's, so it finishes now: the summary, model.pt and the metrics
    line of the partial epoch are an uninterrupted 15-step run's, and stopped.json goes.
    (It used to take the old summary for its own, and keep all three stale for good; and
    the resume dropped the partial epoch's line, which nothing wrote again.)"""
    whole, run_dir = tmp_path / "whole", tmp_path / "run"
    train_ok(shards, whole, *SMALL, "--max-steps", "15")
    train_ok(shards, run_dir, *SMALL, "--max-steps", "12")
    stopped = run(train_command(shards, run_dir, *SMALL, "--max-steps", "15"), env={"HARNESS_TEST_FAULT": "term@14"})  # during step 15
    assert stopped.returncode == EXIT_STOPPED, stopped.stderr[-3000:]
    assert json.loads((run_dir / "stopped.json").read_text())["step"] == 15 and summary(run_dir)["steps"] == 12
    rerun = train_ok(shards, run_dir, *SMALL, "--max-steps", "15")
    assert "nothing to train" not in rerun.stdout
    assert not (run_dir / "stopped.json").exists()
    assert summary(run_dir)["steps"] == 15 and summary(run_dir)["param_checksum"] == summary(whole)["param_checksum"]
    assert torch.equal(torch.load(run_dir / "model.pt")["1.weight"], torch.load(whole / "model.pt")["1.weight"])
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(m["epoch"], m["step"]) for m in metrics] == [(1, 10), (2, 15)]
    again = train_ok(shards, run_dir, *SMALL, "--max-steps", "15")  # now it has finished
    assert "this run has finished (summary.json); nothing to train" in again.stdout


def test_a_resume_with_a_damaged_metrics_line_is_one_clear_error(shards, tmp_path):
    """A resume rewrites metrics.jsonl without the epochs it will redo; a line there that is
    not a metrics line is one error naming the file and line (it was a JSON traceback), and
    the file is left as it was."""
    run_dir = tmp_path / "run"
    train_ok(shards, run_dir, *SMALL, "--max-steps", "12")
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"epoch": "three"}\n')
    before = (run_dir / "metrics.jsonl").read_bytes()
    result = run(train_command(shards, run_dir, *SMALL, "--max-steps", "15"))
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"{run_dir / 'metrics.jsonl'}: line 3: " in result.stderr and "Traceback" not in result.stderr
    assert (run_dir / "metrics.jsonl").read_bytes() == before


def test_a_run_killed_before_its_first_checkpoint_starts_again(shards, tmp_path):
    """Killed after the first epoch's validation (its metrics line written) but before its
    checkpoint was: the directory holds no checkpoint to resume from, so the rerun of the
    same command (a batch script's, torchrun --max-restarts') starts afresh there, where
    it used to be refused ("already holds a run"), and ends as an uninterrupted run."""
    whole, run_dir = tmp_path / "whole", tmp_path / "run"
    train_ok(shards, whole, *SMALL)
    # The background writer sleeps 60 s before it writes step 10's checkpoint (epoch 1's).
    process = subprocess.Popen(train_command(shards, run_dir, *SMALL), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "HARNESS_TEST_FAULT": "slowwrite=60@10"})
    try:
        # (Epoch 2's line may follow before the kill: its checkpoint waits for epoch 1's.)
        wait_for(lambda: (run_dir / "metrics.jsonl").is_file() and (run_dir / "metrics.jsonl").read_text().strip(), 120,
                 "the first epoch's metrics line")
    finally:
        process.kill()
        process.wait(timeout=60)
    assert not list((run_dir / "checkpoints").glob("step-*"))
    rerun = train_ok(shards, run_dir, *SMALL)
    assert "resuming" not in rerun.stdout
    assert summary(run_dir)["param_checksum"] == summary(whole)["param_checksum"]
    assert [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    (run_dir / "summary.json").unlink()  # a finished run's directory, but for its summary: still refused
    refused = run(train_command(shards, run_dir, *SMALL, "--resume", "never"))
    assert refused.returncode == 2 and "already holds a run (metrics.jsonl exists)" in refused.stderr


def test_a_partial_epochs_validation_does_not_count_toward_early_stopping(shards, tmp_path):
    """--max-steps 15 ends mid-epoch 2: that validation is logged, but early stopping, whose
    count the checkpoint carries into a resumed run, compares whole epochs only."""
    run_dir = tmp_path / "run"
    train_ok(shards, run_dir, *SMALL, "--early-stopping", "1", "--max-steps", "15")
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


def test_torchrun_elastic_restart_after_a_worker_is_killed(mnist_shards, tmp_path, reference):
    """Rank 1 SIGKILLs itself before step 120 on the first attempt; torchrun restarts the group,
    which resumes from the step-100 checkpoint and finishes with the uninterrupted weights."""
    run_dir = tmp_path / "run"
    env = {"HARNESS_TEST_FAULT": "kill@120:1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}  # as launch/torchrun.sh sets it
    result = run(checkpointed_run(mnist_shards, run_dir, nproc=2, launcher_args=("--max-restarts=1",)), env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps_per_rank"] == [300, 300]
    assert summary["param_checksum"] == reference[2]
    # Only a restarted attempt resumes (the first started afresh), and from step 100, the last checkpoint before the kill.
    assert f"resuming from {run_dir / 'checkpoints' / 'step-00000100.pt'} (epoch 1, step 100)" in result.stdout + result.stderr


def test_truncated_newest_checkpoint_falls_back_to_the_previous(mnist_shards, tmp_path, reference):
    run_dir = tmp_path / "run"
    result = run(checkpointed_run(mnist_shards, run_dir, "--max-steps", "150", "--keep-checkpoints", "5"))
    assert result.returncode == 0, result.stderr[-3000:]
    newest = ckpt.list_checkpoints(run_dir)[0].with_suffix(".pt")
    assert newest.name == "step-00000150.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    result = run(checkpointed_run(mnist_shards, run_dir))
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
    assert f"step-00000003.pt: does not fit this run's model and optimizer (model.{first_weight}: a torch.float32 tensor of shape (3, 3)" in output
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
    with pytest.raises(HarnessError, match="No space left on device.*previous checkpoints are intact"):
        ckpt.save_checkpoint(tmp_path, {"loop": {"step": 2}}, step=2, epoch=0, keep=3)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000001.json", "step-00000001.pt"]
    assert ckpt.load_newest_valid(tmp_path)[1]["loop"]["step"] == 1


def test_resume_from_a_named_checkpoint(mnist_shards, tmp_path, reference):
    """--resume PATH continues another run directory's checkpoint in a new one, exactly."""
    first = tmp_path / "first"
    result = run(checkpointed_run(mnist_shards, first, "--max-steps", "150", "--keep-checkpoints", "5"))
    assert result.returncode == 0, result.stderr[-3000:]
    path = first / "checkpoints" / "step-00000100.pt"
    result = run(checkpointed_run(mnist_shards, tmp_path / "second", "--resume", path))
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
    train_ok(shards, other, *SMALL)
    train_ok(shards, finished, *SMALL, "--max-steps", "10")
    files = snapshot(finished)
    step_20 = other / "checkpoints" / "step-00000020.pt"
    result = run(train_command(shards, finished, *SMALL, "--resume", step_20))
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"error: {finished}: already holds a run (metrics.jsonl exists) that this one would not continue "
        "(--resume never, another run's checkpoint, or no valid checkpoint to resume from); pick a new --run-dir"
    ], result.stderr[-3000:]
    assert snapshot(finished) == files
    result = run(train_command(shards, tmp_path / "new", *SMALL, "--max-steps", "10", "--resume", step_20))
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"error: --resume {step_20}: nothing is left to train from it (step 20, 2 epochs done; --epochs 3, --max-steps 10)"
    ], result.stderr[-3000:]
    assert not (tmp_path / "new").exists()
    own = finished / "checkpoints" / "step-00000010.pt"  # a run's own checkpoint, named: it continues there
    assert "resuming from" in train_ok(shards, finished, *SMALL, "--resume", own).stdout and summary(finished)["steps"] == 30


def test_resume_from_a_missing_checkpoint_is_a_clear_error(mnist_shards, tmp_path):
    missing = tmp_path / "checkpoints" / "step-00000100.pt"
    result = run(checkpointed_run(mnist_shards, tmp_path / "run", "--resume", missing))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: --resume {missing}: no such checkpoint file (give auto, never, or a checkpoint's step-N.pt)"]


def test_changed_config_is_refused_on_resume(mnist_shards, tmp_path):
    run_dir = tmp_path / "run"
    assert run(checkpointed_run(mnist_shards, run_dir, "--max-steps", "50")).returncode == 0
    result = run(checkpointed_run(mnist_shards, run_dir, "--lr", "0.05"))
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
    train_ok(shards, run_dir, *SMALL, "--max-steps", "10")
    files = snapshot(run_dir)
    reblocked = tmp_path / "reblocked"
    pack(load_source(tmp_path / "src"), reblocked, shard_size=80, block_size=40)  # the `shards` fixture's images
    result = run(train_command(reblocked, run_dir, *SMALL))
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"error: {run_dir / 'checkpoints' / 'step-00000010.pt'}: was written with a different shard set (--shards: other images, "
        "or packed with another --block-size or --shard-size); resuming would mix two experiments: train with the new settings in a new --run-dir"
    ], result.stderr[-3000:]
    assert snapshot(run_dir) == files
    copy = shutil.copytree(shards, tmp_path / "copy")
    resumed = train_ok(copy, run_dir, *SMALL)
    assert "resuming from" in resumed.stdout and summary(run_dir)["steps"] == 30


def test_world_size_change_on_resume_continues(mnist_shards, tmp_path, reference):
    run_dir = tmp_path / "run"
    assert run(checkpointed_run(mnist_shards, run_dir, "--max-steps", "100")).returncode == 0
    result = run(checkpointed_run(mnist_shards, run_dir, nproc=2))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming a world-size-1 run with world size 2" in result.stdout + result.stderr
    assert json.loads((run_dir / "summary.json").read_text())["steps_per_rank"] == [300, 300]


def test_resume_never_refuses_a_run_dir_with_a_run(mnist_shards, tmp_path):
    run_dir = tmp_path / "run"
    assert run(checkpointed_run(mnist_shards, run_dir, "--max-steps", "25")).returncode == 0
    before = (run_dir / "metrics.jsonl").read_bytes()
    result = run(checkpointed_run(mnist_shards, run_dir, "--resume", "never"))
    assert result.returncode == 2 and "already holds a run (metrics.jsonl exists) that this one would not continue (--resume never" in result.stderr
    assert (run_dir / "metrics.jsonl").read_bytes() == before


def test_unwritable_run_dir_is_a_clear_error(mnist_shards, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = run(checkpointed_run(mnist_shards, blocker / "run"))
    assert result.returncode == 2 and "not writable" in result.stderr and str(blocker) in result.stderr


def test_slow_checkpoint_write_on_rank_0_does_not_fail_the_job(mnist_shards, tmp_path, reference):
    """Rank 0 takes 20 s to write the step-50 checkpoint (a slow shared filesystem), twice
    --timeout: rank 1 waits on rank 0's heartbeat instead of timing out, and the run ends
    with the uninterrupted run's weights."""
    run_dir = tmp_path / "run"
    result = run(checkpointed_run(mnist_shards, run_dir, "--timeout", "10", nproc=2), env={"HARNESS_TEST_FAULT": "slowsave=20@50:0"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert checksum(run_dir) == reference[2]
    assert summary(run_dir)["loop_seconds_by_part"]["checkpoints"] >= 20  # the slow write happened, inside the loop


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


def test_training_goes_on_while_a_checkpoint_file_is_written(mnist_shards, tmp_path, reference):
    """The file of the step-150 checkpoint takes 3 s longer to write, on rank 0's background
    writer. Training goes on meanwhile and waits only for what is left of the write at the
    end (step 300), so the loop's checkpoint time is well under the 3 s a write on the
    training thread would cost. The weights are those of an uninterrupted run."""
    run_dir, slow = tmp_path / "run", 3.0
    result = run(checkpointed_run(mnist_shards, run_dir, "--checkpoint-every", "150"), env={"HARNESS_TEST_FAULT": f"slowwrite={slow:g}@150"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    parts = summary(run_dir)["loop_seconds_by_part"]
    # Training overlapped the write by the 150 steps' time (steps 150-300 are half the
    # steps' part), up to the write's length; half of that overlap is required, and 0.3 s
    # allows for the two snapshots (about 30 ms each on a 2-core Xeon).
    overlap = min(parts["steps"] / 2, slow)
    assert parts["checkpoints"] < slow - overlap / 2 + 0.3, parts
    assert [json.loads(m.read_text())["step"] for m in ckpt.list_checkpoints(run_dir)] == [300, 150]
    assert checksum(run_dir) == reference[1]
    # The write did take its 3 s more: the file appeared that long after step 150's sync point.
    logged = {e.step: e.wall_time for e in scalar_events(run_dir, "train/loss")}[150]
    assert (run_dir / "checkpoints" / "step-00000150.pt").stat().st_mtime - logged >= slow - 0.1


def test_every_rank_gets_its_own_rng_state_back(mnist_shards, tmp_path):
    """A checkpoint holds each rank's CPU generator state, and a resumed rank R gets rank R's
    back. A test hook makes the ranks' states differ (training draws nothing from it after
    the initial weights), so rank 0's state saved twice, or a rank restoring another's,
    shows; each rank saves its state at the end of both runs."""
    run_dir, rng = tmp_path / "run", tmp_path / "rng"
    env = {"HARNESS_TEST_RANK_RNG": str(rng)}
    assert run(checkpointed_run(mnist_shards, run_dir, "--max-steps", "50", nproc=2), env=env).returncode == 0
    _, state = ckpt.load_newest_valid(run_dir)
    saved = state["rng"]["torch"]
    assert len(saved) == 2 and all(t.dtype == torch.uint8 for t in saved) and not torch.equal(saved[0], saved[1])
    assert all(t.device.type == "cpu" for t in state["model"].values())

    def ended_equal_saved() -> bool:
        ended = [torch.load(rng / f"rank-{r}-rng.pt", weights_only=True) for r in (0, 1)]
        return all(torch.equal(ended[r], saved[r]) for r in (0, 1))

    assert ended_equal_saved()  # the checkpoint holds each rank's own
    shutil.rmtree(rng)  # the resumed run writes them again
    result = run(checkpointed_run(mnist_shards, run_dir, "--max-steps", "100", nproc=2), env=env)
    assert result.returncode == 0 and "resuming from" in result.stdout, result.stderr[-3000:]
    assert ended_equal_saved()  # each rank restored its own (and drew nothing since)


def test_a_slow_stop_record_on_rank_0_does_not_fail_the_job(shards, tmp_path):
    """Rank 0 takes 12 s over stopped.json (a slow shared filesystem), over twice --timeout:
    rank 1 waits on rank 0's heartbeat, as it does through a slow checkpoint write, and both
    stop with the record a batch script requeues by. (Rank 1 used to wait in a barrier,
    which --timeout bounds: the job failed instead.)"""
    run_dir = tmp_path / "run"
    command = train_command(shards, run_dir, *SMALL, "--timeout", "5", nproc=2)
    stopped = run(command, env={"HARNESS_TEST_FAULT": "slowstop=12@7:1"})  # rank 1 signalled during step 8
    output = stopped.stdout + stopped.stderr
    assert json.loads((run_dir / "stopped.json").read_text()) == {"step": 10, "signal": "stop signal on another rank"}, output[-3000:]
    assert output.count("stopped at step 10 and checkpointed; run again to resume") == 2, output[-3000:]
    assert "exitcode: 75" in output and "exitcode: 1" not in output, output[-3000:]  # torchrun's account of its ranks
    resumed = train_ok(shards, run_dir, *SMALL, "--timeout", "5", nproc=2)
    assert "resuming from" in resumed.stdout and summary(run_dir)["steps"] == 30


def test_a_slow_event_file_creation_on_rank_0_does_not_fail_the_job(shards, tmp_path):
    """Rank 0 takes 8 s more to create TensorBoard's event file, over --timeout: it does so
    in main_only, so rank 1 waits on its heartbeat, and the run finishes. (The file used to
    be created by rank 0's first scalars, at the first sync point of a resumed run, while
    rank 1 waited in an all-reduce that --timeout bounds.)"""
    run_dir = tmp_path / "run"
    train_ok(shards, run_dir, *SMALL, "--timeout", "5", nproc=2, env={"HARNESS_TEST_FAULT": "slowevents=8@0"})
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
