"""A rank that diverges, exits, hangs or freezes: every rank stops with one clear error
within its timeout, and the last good checkpoint is the newest. Real torchrun jobs, with
faults injected by HARNESS_TEST_FAULT (harness/testhooks.py)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time

import psutil
import pytest
import torch
from helpers import CHECKPOINTED_RUN, ROOT, checkpointed_run, free_port, kill_tree, ranks_ended_with_harness_errors, run, wait_for

from harness import checkpoint as ckpt


def test_nan_on_one_rank_stops_every_rank_naming_the_step(quick_shards, tmp_path):
    run_dir = tmp_path / "run"
    started = time.monotonic()
    result = run(checkpointed_run(quick_shards, run_dir, nproc=2), env={"HARNESS_TEST_FAULT": "nan@60:1"}, timeout=240)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    # Printed once, by rank 0 (so it stopped with it too), and no rank ended another way.
    assert output.count("loss is NaN or infinite at step 61 on rank 1") == 1, output[-3000:]
    assert ranks_ended_with_harness_errors(output, 2), output[-3000:]
    # 7.8 s on the 2-core Xeon (2026-11-29, the whole job); rank 0 left waiting for the
    # default --timeout would take over 300 s: 200 leaves a slower machine 25x.
    assert time.monotonic() - started < 200
    assert not (run_dir / "summary.json").exists()
    # The last checkpoint (step 50, before the bad step) is intact and finite.
    path, state = ckpt.load_newest_valid(run_dir)
    assert path.name == "step-00000050.pt"
    assert all(torch.isfinite(t).all() for t in state["model"].values())


@pytest.mark.parametrize("nproc", [1, 2])
def test_an_overflowed_update_is_not_checkpointed(quick_shards, tmp_path, nproc):
    """The update of step 100 leaves an infinite weight on the last rank, and step 100 is
    checkpointed before any loss has seen it: every rank stops there with the same clear
    error instead of writing it (which would have been the checkpoint a resume loads), and
    the step-50 one stays newest."""
    run_dir = tmp_path / "run"
    result = run(checkpointed_run(quick_shards, run_dir, nproc=nproc), env={"HARNESS_TEST_FAULT": f"infweights@99:{nproc - 1}"}, timeout=240)
    output = result.stdout + result.stderr
    error = f"error: the weights, momentum or running statistics are NaN or infinite after step 100 on rank {nproc - 1}"
    assert output.count(error) == 1, output[-3000:]  # rank 0 prints an error every rank stops with
    if nproc == 1:
        assert result.returncode == 2 and "Traceback" not in output  # HarnessError's status, as for a NaN loss
    else:  # every rank stopped with it, not only the one whose weights overflowed
        assert result.returncode != 0 and "lost contact" not in output
        assert ranks_ended_with_harness_errors(output, 2), output[-3000:]
    path, state = ckpt.load_newest_valid(run_dir)
    assert path.name == "step-00000050.pt"
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    assert not (run_dir / "summary.json").exists()


def test_a_rank_that_exits_early_ends_the_others(quick_shards, tmp_path):
    """Rank 1 exits before step 40 under its own torchrun agent, as on another node, so no
    launcher kills rank 0 for it: rank 0 must notice by itself, at its next collective, and
    end with one clear error at once, not after --timeout (600 s here)."""
    endpoint = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "SHARDS": str(quick_shards), "RUN_DIR": str(tmp_path / "run"), "RDZV_ID": f"exit-{os.getpid()}",
           "HARNESS_TEST_FAULT": "exit@40:1"}
    started = time.monotonic()
    agents = [
        subprocess.Popen(["bash", str(ROOT / "launch" / "multinode.sh"), "2", endpoint, "1", "lenet", *CHECKPOINTED_RUN[2:], "--timeout", "600"],
                         cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]
    try:
        outputs = [agent.communicate(timeout=240)[0] for agent in agents]
    finally:
        for agent in agents:
            kill_tree(agent)
    elapsed = time.monotonic() - started
    assert [a.returncode != 0 for a in agents] == [True, True]
    both = "".join(outputs)  # the rendezvous puts rank 0 on either agent
    assert "error: rank 0: lost contact with another rank" in both, both[-6000:]
    assert elapsed < 120, elapsed  # 7.7 s on the 2-core Xeon (2026-11-29); waiting out --timeout: 600 s
    assert not (tmp_path / "run" / "summary.json").exists()


def test_a_stuck_rank_fails_the_job_within_the_timeout(quick_shards, tmp_path):
    """Rank 1 stays alive but stops stepping: rank 0's next collective gives up after
    --timeout seconds and the job ends with an error naming that timeout, instead of
    waiting forever."""
    started = time.monotonic()
    result = run(checkpointed_run(quick_shards, tmp_path / "run", "--timeout", "15", nproc=2), env={"HARNESS_TEST_FAULT": "hang@40:1"}, timeout=240)
    elapsed = time.monotonic() - started
    assert result.returncode != 0
    assert "error: rank 0: no answer from another rank within --timeout 15 s" in result.stdout + result.stderr, result.stderr[-4000:]
    # The collective waits the whole --timeout 15 s first; 22 s in all on the 2-core Xeon
    # (2026-11-29); a job that waited for the default 300 s instead would exceed 150.
    assert 15 < elapsed < 150, elapsed


@pytest.mark.parametrize("store_in", ["agent", "rank 0"])
def test_rank_0_frozen_during_a_checkpoint_write_ends_the_job_after_the_timeout(quick_shards, tmp_path, store_in):
    """Rank 0 stops (SIGSTOP, heartbeat thread included) while writing the step-50
    checkpoint: rank 1 sees the heartbeat stop and ends the job after --timeout. A stopped
    process cannot act on torchrun's SIGTERM, so torchrun's SIGKILL ends it 30 s later.
    The store rank 1 polls lives in torchrun's agent by default, and in rank 0's own
    process with the launchers' TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: there the frozen
    rank 0 cannot answer the poll at all, which hung rank 1 for ever before.

    The test sends that SIGKILL itself once rank 1 has exited, sparing the 30 s (torch
    2.13's agent ignores TORCH_ELASTIC_SHUTDOWN_TIMEOUT when a worker fails): what is
    tested is that rank 1 ends on its own, and torchrun with it."""
    started = time.monotonic()
    env = {**os.environ, "HARNESS_TEST_FAULT": "freeze@50:0", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1" if store_in == "rank 0" else "0"}
    command = checkpointed_run(quick_shards, tmp_path / "run", "--timeout", "10", nproc=2)
    with open(tmp_path / "output", "w+") as output:
        agent = subprocess.Popen(command, cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: agent.poll() is not None or only_stopped_workers_left(agent), 200, "rank 1 to exit")
            if agent.poll() is None:
                for worker in psutil.Process(agent.pid).children():
                    with contextlib.suppress(psutil.NoSuchProcess):  # torchrun may reap it first (seen in CI)
                        worker.kill()  # the frozen rank 0, as torchrun would 30 s later
            agent.wait(timeout=60)
        finally:
            kill_tree(agent)
        output.seek(0)
        text = output.read()
    elapsed = time.monotonic() - started
    assert agent.returncode != 0
    assert "rank 1: rank 0 stopped responding during its checkpoint write: no heartbeat for --timeout 10 s" in text, text[-4000:]
    assert elapsed < 150, elapsed  # 20-21 s on the 2-core Xeon (2026-11-29, --timeout 10); hung for ever before


def only_stopped_workers_left(agent: subprocess.Popen) -> bool:
    """Whether torchrun's workers include a stopped one, and the rest have exited."""
    try:
        states = [worker.status() for worker in psutil.Process(agent.pid).children()]
    except psutil.NoSuchProcess:
        return False
    return psutil.STATUS_STOPPED in states and all(s in (psutil.STATUS_STOPPED, psutil.STATUS_ZOMBIE) for s in states)
