"""DDP on the CPU with real torchrun / accelerate processes on gloo, over loopback."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harness.data.pack import pack
from harness.data.sources import load_source

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 420


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, shards: Path, run_dir: Path, *train_args: str, log_dir: Path | None = None, launcher: list[str] | None = None):
    """`torchrun --standalone` (or another launcher) around `python -m harness.train`."""
    launcher = launcher or [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    if log_dir:  # one stdout/stderr file per rank
        launcher = [*launcher, f"--log-dir={log_dir}", "--redirects=3"]
    command = [*launcher, "-m", "harness.train", "--shards", str(shards), "--run-dir", str(run_dir), *train_args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def single(shards: Path, run_dir: Path, *train_args: str):
    command = [sys.executable, "-m", "harness.train", "--shards", str(shards), "--run-dir", str(run_dir), *train_args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def max_param_diff(a: Path, b: Path) -> float:
    wa, wb = torch.load(a / "model.pt"), torch.load(b / "model.pt")
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


# Same seed, same global batch (the preset's 100), one CPU thread per process so that the world size
# is the only thing that changes between runs. lr 0.02 instead of the preset's 0.1: at 0.1
# training is chaotic early on (float-order noise alone moved 150-step accuracy by 1.7
# points), which would make this a test of chaos rather than of DDP.
SHORT = ("--preset", "lenet", "--lr", "0.02", "--max-steps", "300", "--log-every", "100", "--threads", "1")


@pytest.fixture(scope="module")
def short_runs(mnist_shards, tmp_path_factory):
    """300 LeNet steps with 1 (no launcher), 2 and 4 processes."""
    base = tmp_path_factory.mktemp("ddp")
    single(mnist_shards, base / "w1", *SHORT)
    for w in (2, 4):
        torchrun(w, mnist_shards, base / f"w{w}", *SHORT, log_dir=base / f"logs{w}")
    return base


@pytest.mark.parametrize("world_size", [2, 4])
def test_ddp_reaches_single_process_accuracy(short_runs, world_size):
    one, many = summary(short_runs / "w1"), summary(short_runs / f"w{world_size}")
    assert many["world_size"] == world_size
    assert one["test_accuracy"] > 0.9
    assert abs(many["test_accuracy"] - one["test_accuracy"]) <= 0.003


@pytest.mark.parametrize("world_size", [2, 4])
def test_every_rank_ends_identical_with_equal_steps(short_runs, world_size):
    s = summary(short_runs / f"w{world_size}")
    assert s["ranks_identical"] is True
    assert s["steps_per_rank"] == [300] * world_size


@pytest.mark.parametrize("world_size", [2, 4])
def test_only_rank0_writes_events_and_epoch_lines(short_runs, world_size):
    run_dir = short_runs / f"w{world_size}"
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1
    logs = sorted((short_runs / f"logs{world_size}").rglob("stdout.log"), key=lambda p: int(p.parent.name))
    assert len(logs) == world_size
    assert "epoch 1/15" in logs[0].read_text()
    for other in logs[1:]:
        assert other.read_text().strip() == "", f"{other} should be silent"


def test_world_size_invariance(mnist_shards, tmp_path):
    """With the same seed and global batch, 1, 2 and 4 processes see the same global batches
    and end with the same weights up to float summation order. At the preset's lr 0.1 /
    momentum 0.9 LeNet training is chaotic: float-order noise of ~1e-8 after one step grew
    to 0.025 by 30 steps with 4 ranks (even 1 vs 2 threads in one process differ), which
    would test chaos rather than DDP. At lr 0.02 the noise stays at float level: 50 steps,
    tolerance 1e-5."""
    args = ("--preset", "lenet", "--lr", "0.02", "--max-steps", "50", "--threads", "1")
    single(mnist_shards, tmp_path / "w1", *args)
    for w in (2, 4):
        torchrun(w, mnist_shards, tmp_path / f"w{w}", *args)
        assert max_param_diff(tmp_path / "w1", tmp_path / f"w{w}") < 1e-5
    # and the weights did move: this is not comparing two untrained models
    assert summary(tmp_path / "w1")["test_accuracy"] > 0.5


def test_one_ddp_step_equals_one_step_on_the_global_batch(mnist_shards, tmp_path):
    args = ("--preset", "lenet", "--max-steps", "1", "--threads", "1")
    single(mnist_shards, tmp_path / "w1", *args)
    torchrun(2, mnist_shards, tmp_path / "w2", *args)
    assert max_param_diff(tmp_path / "w1", tmp_path / "w2") < 1e-6


def test_two_torchrun_agents_rendezvous_on_loopback(mnist_shards, tmp_path):
    """launch/multinode.sh started twice, as on two nodes: c10d rendezvous on 127.0.0.1."""
    endpoint = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "SHARDS": str(mnist_shards), "RUN_DIR": str(tmp_path / "run"), "RDZV_ID": f"test-{os.getpid()}"}
    agents = [
        subprocess.Popen(
            ["bash", str(ROOT / "launch" / "multinode.sh"), "2", str(node_rank), endpoint, "1", "lenet", "--max-steps", "20", "--threads", "1"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for node_rank in (0, 1)
    ]
    try:
        outputs = [agent.communicate(timeout=TIMEOUT)[0] for agent in agents]
    finally:
        for agent in agents:
            agent.kill()
    assert [a.returncode for a in agents] == [0, 0], "\n".join(f"--- node {i}:\n{out[-4000:]}" for i, out in enumerate(outputs))
    s = summary(tmp_path / "run")
    assert s["world_size"] == 2 and s["steps_per_rank"] == [20, 20] and s["ranks_identical"]


def launch_script(script: str, shards: Path, run_dir: Path, *args: str, env: dict | None = None) -> dict:
    """Run one of launch/*.sh as the README shows it; the run's summary."""
    env = {**os.environ, "SHARDS": str(shards), "RUN_DIR": str(run_dir), **(env or {})}
    result = subprocess.run(["bash", str(ROOT / "launch" / script), *args], capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return summary(run_dir)


def test_accelerate_launch_two_processes(mnist_shards, tmp_path):
    s = launch_script("accelerate.sh", mnist_shards, tmp_path / "run", "2", "lenet", "--max-steps", "20", env={"MAIN_PROCESS_PORT": str(free_port())})
    assert s["world_size"] == 2 and s["steps_per_rank"] == [20, 20] and s["ranks_identical"]


def test_dev_and_torchrun_launchers(mnist_shards, tmp_path):
    dev = launch_script("dev.sh", mnist_shards, tmp_path / "dev", "lenet", "--max-steps", "10", "--threads", "1")
    assert dev["world_size"] == 1 and dev["steps"] == 10
    two = launch_script("torchrun.sh", mnist_shards, tmp_path / "two", "2", "lenet", "--max-steps", "10", "--threads", "1")
    assert two["world_size"] == 2 and two["steps_per_rank"] == [10, 10] and two["ranks_identical"]
    # the same global batches: equal up to float summation order after 10 steps
    assert max_param_diff(tmp_path / "dev", tmp_path / "two") < 1e-4


@pytest.fixture(scope="module")
def uneven_shards(mnist_dir, tmp_path_factory):
    """Three train shards of 25,000, 25,000 and 10,000 images: fewer shards than 4 ranks, unequal sizes."""
    out = tmp_path_factory.mktemp("uneven") / "shards"
    pack(load_source(mnist_dir), out, shard_size=25000, block_size=500)
    return out


@pytest.mark.parametrize("world_size", [2, 4])
def test_uneven_shards_full_epoch_equal_steps(uneven_shards, tmp_path, world_size):
    args = ("--preset", "neupy-mlp", "--hidden", "32", "--epochs", "1", "--threads", "1")
    torchrun(world_size, uneven_shards, tmp_path / "run", *args)
    s = summary(tmp_path / "run")
    assert s["steps_per_rank"] == [60000 // 128] * world_size
    assert s["ranks_identical"]


def test_batch_not_divisible_by_world_size_fails_fast(mnist_shards, tmp_path):
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4",
        "-m", "harness.train", "--shards", str(mnist_shards), "--run-dir", str(tmp_path / "run"),
        "--preset", "lenet", "--batch-size", "66",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode != 0
    assert "--batch-size 66 is not divisible by the world size 4" in result.stdout + result.stderr
