"""Stops: SIGTERM, Ctrl-C and preemption checkpoint at a sync point every rank agrees on
and exit for a requeue, with real processes and real signals."""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
from helpers import (PAUSE, ROOT, SMALL_RUN, LineReader, checkpointed_run, checksum, free_port, kill_tree, run, run_cli, scalar_steps, signal_tree, start_and_signal, summary,
                     train_command, train_ok, wait_for)

from harness import checkpoint as ckpt
from harness.config import load_preset
from harness.errors import run_guarded
from harness.stopping import EXIT_STOPPED


def sync_points(steps: int = 300, log_every: int = 25, macro_steps: int = 7000 // load_preset("lenet")["batch_size"], checkpoint_every: int = 50) -> set[int]:
    """Steps after which CHECKPOINTED_RUN's loop syncs: a full --log-every window, a macro-batch's end, a due checkpoint, the last step."""
    points, window = set(), 0
    for step in range(1, steps + 1):
        window += 1
        if window == log_every or step % macro_steps == 0 or step % checkpoint_every == 0 or step == steps:
            points.add(step)
            window = 0
    return points


def test_sigterm_checkpoints_and_exits_with_the_stop_status(quick_shards, tmp_path, reference):
    run_dir = tmp_path / "run"
    stopped = start_and_signal(checkpointed_run(quick_shards, run_dir), run_dir, signal.SIGTERM, env=PAUSE)
    assert stopped.returncode == EXIT_STOPPED
    assert json.loads((run_dir / "stopped.json").read_text())["signal"] == "SIGTERM"
    markers = ckpt.list_checkpoints(run_dir)
    stop_step = json.loads(markers[0].read_text())["step"]
    assert stop_step in sync_points(), stop_step  # every rank stopped at the same sync point
    assert stop_step < 300
    result = run(checkpointed_run(quick_shards, run_dir))
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
def test_sigterm_during_start_up_stops_before_training_for_a_requeue(quick_shards, tmp_path, reference, nproc):
    """A SIGTERM to every process of the job as soon as rank 0 has opened the shard set
    (Slurm's preemption can come at any time): the ranks finish starting up, agree to stop
    before their first step, and leave stopped.json for train.sbatch to requeue on. Before,
    the signal killed the ranks outright and the job was not requeued. The rerun trains
    from the start (there is no checkpoint) and, with one process, ends as the reference."""
    run_dir = tmp_path / "run"
    process = subprocess.Popen(checkpointed_run(quick_shards, run_dir, nproc=nproc), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    output, reader = [], LineReader(process.stdout)
    try:
        while line := reader.readline(timeout=120):  # "" if the run ends without the line
            output.append(line)
            if line.startswith("run directory "):  # rank 0's first line, once the ranks have opened the shards
                signal_tree(process, signal.SIGTERM)
                break
        process.wait(timeout=120)
        output.append(reader.rest(timeout=30))
    finally:
        if process.poll() is None:
            signal_tree(process, signal.SIGKILL)
            process.wait()
    output = "".join(output)
    # Rank 0's line, once every rank reached the stop (one line for the job)
    assert output.count("SIGTERM: stopped at step 0 before training, with nothing new to checkpoint") == 1, output[-3000:]
    if nproc == 1:
        assert process.returncode == EXIT_STOPPED and "Traceback" not in output
    # else torchrun's agent, signalled too, exits 1 and prints its SignalException's traceback
    assert json.loads((run_dir / "stopped.json").read_text()) == {"step": 0, "signal": "SIGTERM"}
    assert ckpt.list_checkpoints(run_dir) == []
    result = run(checkpointed_run(quick_shards, run_dir, nproc=nproc))
    assert result.returncode == 0, result.stderr[-3000:]
    assert summary(run_dir)["steps"] == 300 and not (run_dir / "stopped.json").exists()
    assert checksum(run_dir) == reference[nproc]


def poll_until(predicate, timeout: float, what: str) -> None:
    """wait_for, looking every 10 ms: for a window of a fraction of a second."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def catches(pid: int, sig: int) -> bool:
    """Whether the process has a handler for `sig` (the kernel's SigCgt mask)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            mask = next(int(line.split()[1], 16) for line in f if line.startswith("SigCgt:"))
    except (FileNotFoundError, ProcessLookupError):
        return False
    return bool(mask >> (sig - 1) & 1)


@pytest.mark.parametrize("nproc", [1, 2])
def test_sigterm_while_a_rank_imports_torch_stops_it_for_a_requeue(quick_shards, tmp_path, nproc):
    """The launchers start a rank as `python -m harness train`, which imports torch (1.5-2.5 s
    on a 2-core Xeon) before its stop handling is set up. A SIGTERM then (Slurm's, in an
    attempt's first seconds) ended the rank with `terminated` and no stop record: the job
    was reported failed, not requeued. Now the signal is held through the import and is a
    stop, as one later in start-up: every rank stops before its first step."""
    run_dir = tmp_path / "run"
    cmd = checkpointed_run(quick_shards, run_dir, nproc=nproc)
    cmd[cmd.index("harness.train") : cmd.index("harness.train") + 1] = ["harness", "train"]  # as the launchers start it
    process = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def ranks() -> list[int]:
            if nproc == 1:
                return [process.pid]
            children = psutil.Process(process.pid).children()
            return [p.pid for p in children if "harness" in " ".join(p.cmdline())]

        # Each rank holds SIGTERM from the moment it starts importing torch (signals_held):
        # the signal comes within 10 ms of that, and the import takes 1.5-2.5 s here, over
        # 0.5 s anywhere.
        poll_until(lambda: (len(ranks()) == nproc and all(catches(pid, signal.SIGTERM) for pid in ranks())) or process.poll() is not None,
                   60, "every rank's import")
        signal_tree(process, signal.SIGTERM)
        output = process.communicate(timeout=120)[0]
    finally:
        kill_tree(process)
    assert "SIGTERM: stopped at step 0 before training, with nothing new to checkpoint" in output, output[-3000:]
    assert "terminated" not in output.splitlines(), output[-3000:]
    if nproc == 1:
        assert process.returncode == EXIT_STOPPED, output[-3000:]
    assert json.loads((run_dir / "stopped.json").read_text()) == {"step": 0, "signal": "SIGTERM"}
    assert ckpt.list_checkpoints(run_dir) == []


def test_sigterm_before_torchrun_starts_the_ranks_stops_them_as_they_start(quick_shards, tmp_path):
    """slurm/train.sbatch starts torchrun as `python -m harness.torchrun`. torchrun sets its
    SIGTERM handler only as it starts the ranks (after the rendezvous, which on several
    nodes waits for every node): a SIGTERM before that killed it on the spot (status -15,
    no output), with no stop record, and the job was reported failed. Now the ranks start
    with that stop requested and stop before training, leaving the record."""
    run_dir = tmp_path / "run"
    cmd = checkpointed_run(quick_shards, run_dir, nproc=2)
    cmd[cmd.index("torch.distributed.run")] = "harness.torchrun"
    cmd[cmd.index("harness.train") : cmd.index("harness.train") + 1] = ["harness", "train"]
    process = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # Its handler is set as it starts; importing torch alone then takes over 0.5 s anywhere.
        poll_until(lambda: catches(process.pid, signal.SIGTERM) or process.poll() is not None, 60, "harness.torchrun's handler")
        assert psutil.Process(process.pid).children() == [], "torchrun started the ranks before the signal"
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=120)[0]
    finally:
        kill_tree(process)
    assert output.count("SIGTERM: stopped at step 0 before training, with nothing new to checkpoint") == 1, output[-3000:]
    assert json.loads((run_dir / "stopped.json").read_text()) == {"step": 0, "signal": "SIGTERM"}
    assert "exitcode: 75" in output and "Traceback" not in output  # the ranks' status, as torchrun reports it
    assert process.returncode == EXIT_STOPPED  # passed on (plain torchrun's would be 1)


def test_a_second_sigterm_ends_harness_torchrun_while_it_waits_for_the_other_nodes():
    """A SIGTERM before the ranks start is kept for them, so it no longer ended a node left
    waiting at the rendezvous (up to RDZV_TIMEOUT, 600 s): it says so, and a second one
    ends it, as the first did under plain torchrun."""
    cmd = [sys.executable, "-m", "harness.torchrun", "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{free_port()}", "-m", "harness", "train", "--max-steps", "1"]
    process = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        poll_until(lambda: catches(process.pid, signal.SIGTERM) or process.poll() is not None, 60, "harness.torchrun's handler")
        process.send_signal(signal.SIGTERM)
        reader = LineReader(process.stderr)
        line = reader.readline(timeout=30)
        while line.startswith(("W", "I", " ", "*")):  # torchrun's own log lines
            line = reader.readline(timeout=30)
        assert line == ("harness.torchrun: SIGTERM before the ranks have started (once every node has joined): they will stop "
                        "as they start; another SIGTERM before then ends this at once\n")
        time.sleep(1.0)
        assert process.poll() is None  # still waiting for the other node
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
        assert process.returncode == -signal.SIGTERM
    finally:
        kill_tree(process)


def test_ctrl_c_before_torchrun_starts_the_ranks_is_one_line():
    """Ctrl-C to a node waiting for the others at the rendezvous (or importing torch) printed
    a KeyboardInterrupt traceback of 20-48 lines."""
    cmd = [sys.executable, "-m", "harness.torchrun", "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{free_port()}", "-m", "harness", "train", "--max-steps", "1"]
    process = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        poll_until(lambda: catches(process.pid, signal.SIGTERM) or process.poll() is not None, 60, "harness.torchrun's handler")
        time.sleep(2.0)  # into the rendezvous here; on a slower machine still in the import, where it is held: the same end
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=30)
    finally:
        kill_tree(process)
    assert (process.returncode, err.splitlines()[-1:]) == (130, ["harness.torchrun: interrupted"]), err[-3000:]
    assert "Traceback" not in err


def test_a_stop_requested_before_start_is_its_launchers_own(monkeypatch):
    """HARNESS_SIGNAL_BEFORE_START names the harness.torchrun process that set it: a rank
    takes it from its parent only (a value exported further up, or inherited by a rank's
    own child, is not this rank's stop), and takes it once."""
    from harness.stopping import SIGNAL_BEFORE_START, StopRequest

    for value, requested in ((f"SIGTERM:{os.getppid()}", "SIGTERM"), ("SIGTERM:1", None), (f"SIGKILL:{os.getppid()}", None), ("", None)):
        monkeypatch.setenv(SIGNAL_BEFORE_START, value)
        assert StopRequest().signal_name == requested, value  # (the conftest puts the test process's own handlers back)
        assert SIGNAL_BEFORE_START not in os.environ


def test_a_stop_at_an_epochs_end_waits_for_its_validation_and_checkpoint(shards, tmp_path):
    """A SIGTERM during an epoch's last step stops the run after that epoch's validation,
    with the epoch's checkpoint: a step is checkpointed once, in the state a resume
    continues from. The resumed run ends as an uninterrupted one, and TensorBoard shows
    each step once, the stop step's points included."""
    train_ok(shards, tmp_path / "whole", *SMALL_RUN)
    run_dir = tmp_path / "stopped"
    stopped = run(train_command(shards, run_dir, *SMALL_RUN), env={"HARNESS_TEST_FAULT": "term@9"})  # during step 10
    assert stopped.returncode == EXIT_STOPPED, stopped.stderr[-3000:]
    assert json.loads((run_dir / "stopped.json").read_text())["step"] == 10
    (marker,) = ckpt.list_checkpoints(run_dir)
    loop = ckpt.load_verified(marker)["loop"]
    assert (loop["step"], loop["epoch"], loop["macro"], loop["last_metrics"]["epoch"]) == (10, 1, 0, 1)  # validated, then saved
    resumed = train_ok(shards, run_dir, *SMALL_RUN)
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
    train_ok(shards, tmp_path / "whole", *SMALL_RUN, nproc=2)
    run_dir = tmp_path / "stopped"
    stopped = run(train_command(shards, run_dir, *SMALL_RUN, nproc=2), env={"HARNESS_TEST_FAULT": "termval@10"})
    output = stopped.stdout + stopped.stderr
    assert json.loads((run_dir / "stopped.json").read_text()) == {"step": 10, "signal": "SIGTERM"}, output[-3000:]
    assert output.count("SIGTERM: stopped at step 10 and checkpointed; run again to resume") == 1, output[-3000:]  # rank 0's
    # torchrun's account of its ranks: the first to exit, with 75 (the other may have been
    # SIGTERMed by torchrun as it exited, after the stop)
    assert "exitcode: 75" in output and "exitcode: 1" not in output, output[-3000:]
    (marker,) = ckpt.list_checkpoints(run_dir)
    loop = ckpt.load_verified(marker)["loop"]
    assert (loop["step"], loop["epoch"], loop["macro"]) == (10, 1, 0)
    resumed = train_ok(shards, run_dir, *SMALL_RUN, nproc=2)
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
    train_ok(shards, whole, *SMALL_RUN, "--max-steps", "15")
    train_ok(shards, run_dir, *SMALL_RUN, "--max-steps", "12")
    stopped = run(train_command(shards, run_dir, *SMALL_RUN, "--max-steps", "15"), env={"HARNESS_TEST_FAULT": "term@14"})  # during step 15
    assert stopped.returncode == EXIT_STOPPED, stopped.stderr[-3000:]
    assert json.loads((run_dir / "stopped.json").read_text())["step"] == 15 and summary(run_dir)["steps"] == 12
    # Meanwhile `harness predict RUN_DIR` takes the newest weights, step 15's, not model.pt's of step 12, and says so
    predicted = run_cli("predict", run_dir, "--shards", shards, "--index", "0", "--json")
    newest = run_dir / "checkpoints" / "step-00000015.pt"
    assert json.loads(predicted.stdout)["model"] == str(newest), predicted.stderr
    assert predicted.stderr == f"note: {run_dir}: it went on past its summary.json's step 12; predicting with its newest checkpoint, {newest.name} (step 15)\n"
    rerun = train_ok(shards, run_dir, *SMALL_RUN, "--max-steps", "15")
    assert "nothing to train" not in rerun.stdout
    assert not (run_dir / "stopped.json").exists()
    assert summary(run_dir)["steps"] == 15 and summary(run_dir)["param_checksum"] == summary(whole)["param_checksum"]
    assert torch.equal(torch.load(run_dir / "model.pt")["1.weight"], torch.load(whole / "model.pt")["1.weight"])
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(m["epoch"], m["step"]) for m in metrics] == [(1, 10), (2, 15)]
    again = train_ok(shards, run_dir, *SMALL_RUN, "--max-steps", "15")  # now it has finished
    assert "this run has finished (summary.json); nothing to train" in again.stdout


def test_a_slow_stop_record_on_rank_0_does_not_fail_the_job(shards, tmp_path):
    """Rank 0 takes 12 s over stopped.json (a slow shared filesystem), over twice --timeout:
    rank 1 waits on rank 0's heartbeat, as it does through a slow checkpoint write, and both
    stop with the record a batch script requeues by. (Rank 1 used to wait in a barrier,
    which --timeout bounds: the job failed instead.)"""
    run_dir = tmp_path / "run"
    command = train_command(shards, run_dir, *SMALL_RUN, "--timeout", "5", nproc=2)
    stopped = run(command, env={"HARNESS_TEST_FAULT": "slowstop=12@7:1"})  # rank 1 signalled during step 8
    output = stopped.stdout + stopped.stderr
    assert json.loads((run_dir / "stopped.json").read_text()) == {"step": 10, "signal": "SIGTERM"}, output[-3000:]  # rank 1's
    assert output.count("SIGTERM: stopped at step 10 and checkpointed; run again to resume") == 1, output[-3000:]  # rank 0's
    # torchrun's account of its ranks: the first to exit, with 75 (the other may have been
    # SIGTERMed by torchrun as it exited, after the stop)
    assert "exitcode: 75" in output and "exitcode: 1" not in output, output[-3000:]
    resumed = train_ok(shards, run_dir, *SMALL_RUN, "--timeout", "5", nproc=2)
    assert "resuming from" in resumed.stdout and summary(run_dir)["steps"] == 30
