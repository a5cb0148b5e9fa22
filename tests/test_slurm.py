"""slurm/train.sbatch on a real one-node Slurm cluster on localhost (slurm/local-cluster.sh).

The module fixture installs (first time only, as root, with apt-get) and starts munged,
slurmctld and slurmd; the jobs run as root with this environment (--export=ALL), so they
find the same python, torchrun and `harness`. NPROC_PER_NODE=2: srun starts one torchrun
on the node, which starts two gloo ranks.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SBATCH = ROOT / "slurm" / "train.sbatch"
SETUP_TIMEOUT = 900  # apt-get install on a fresh machine; a running cluster answers in about a second
JOB_TIMEOUT = 600
SIGNAL_TIMEOUT = 120  # from scancel --signal=TERM to the job's end
ACTIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "RESIZING", "REQUEUED"}
TRAIN_ARGS = ("--device", "cpu", "--threads", "1", "--log-every", "10")
STARTED = re.compile(r"\blenet on cpu, world size 2\b")  # from the harness's first log line on rank 0


@pytest.fixture(scope="module")
def slurm_job_name():
    """A running local cluster, and a job name unique to this module; its leftover jobs are cancelled after."""
    try:
        setup = subprocess.run(["bash", str(ROOT / "slurm" / "local-cluster.sh")], capture_output=True, text=True, timeout=SETUP_TIMEOUT)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"slurm/local-cluster.sh did not finish in {SETUP_TIMEOUT}s:\n{e.stdout}\n{e.stderr}")
    assert setup.returncode == 0, f"slurm/local-cluster.sh failed:\n{setup.stdout}\n{setup.stderr}"
    name = f"harness-test-{uuid.uuid4().hex[:8]}"
    yield name
    subprocess.run(["scancel", f"--name={name}"], capture_output=True, timeout=60)
    deadline = time.monotonic() + 60  # let the next tests have the CPUs back
    while time.monotonic() < deadline and squeue_ids(name):
        time.sleep(1)


def squeue_ids(name: str) -> list[str]:
    result = subprocess.run(["squeue", "-h", f"--name={name}", "-o", "%i"], capture_output=True, text=True, timeout=60)
    return result.stdout.split()


def job_state(job_id: str) -> dict[str, str]:
    """scontrol's fields of a job ({} once Slurm has forgotten it: local-cluster.sh sets MinJobAge=16 s)."""
    result = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, timeout=60)
    if result.returncode:
        return {}
    return dict(field.split("=", 1) for field in result.stdout.split() if "=" in field)


def submit(name: str, shards: Path, run_dir: Path, output: Path, *train_args: str, wait: bool) -> subprocess.Popen:
    """sbatch the script from the repository root as a user would, with PRESET/SHARDS/RUN_DIR in the environment."""
    env = {**os.environ, "PRESET": "lenet", "SHARDS": str(shards), "RUN_DIR": str(run_dir), "NPROC_PER_NODE": "2"}
    command = ["sbatch", "--parsable", f"--job-name={name}", f"--output={output}", "--export=ALL", *(["--wait"] if wait else []), str(SBATCH), *train_args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)


def job_id_of(proc: subprocess.Popen) -> str:
    line = proc.stdout.readline().strip()  # --parsable prints the id at once, before --wait waits
    if not line:
        proc.wait(timeout=60)
        pytest.fail(f"sbatch failed (exit {proc.returncode}): {proc.stderr.read()}")
    return line.split(";")[0]


def tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else f"({path} does not exist)"


def python_processes_with(text: str) -> list[int]:
    """PIDs whose command line mentions `text` (here: the job's run directory)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and text in (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                pids.append(int(proc.name))
        except OSError:
            pass
    return pids


def test_sbatch_two_ranks(slurm_job_name, mnist_shards, tmp_path):
    run_dir, output = tmp_path / "run", tmp_path / "slurm-%j.out"
    proc = submit(slurm_job_name, mnist_shards, run_dir, output, "--max-steps", "30", *TRAIN_ARGS, wait=True)
    job_id = job_id_of(proc)
    output = tmp_path / f"slurm-{job_id}.out"
    try:
        _, stderr = proc.communicate(timeout=JOB_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        subprocess.run(["scancel", job_id], timeout=60)
        pytest.fail(f"job {job_id} did not finish in {JOB_TIMEOUT}s; its output:\n{tail(output)}")
    log = tail(output, 100_000)
    assert proc.returncode == 0, f"sbatch --wait exited {proc.returncode} ({stderr.strip()}); job output:\n{log[-4000:]}"
    state = job_state(job_id)
    if state:  # no accounting database (sacct) on the local cluster; scontrol still knows the job
        assert (state["JobState"], state["ExitCode"]) == ("COMPLETED", "0:0"), state

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["steps_per_rank"] == [30, 30]
    assert summary["ranks_identical"] is True
    assert STARTED.search(log), log[-4000:]
    assert f"job {job_id}: 1 node(s) x 2 rank(s), rendezvous localhost:" in log


def test_scancel_sigterm_reaches_training_processes(slurm_job_name, mnist_shards, tmp_path):
    run_dir, output = tmp_path / "run", tmp_path / "slurm-%j.out"
    proc = submit(slurm_job_name, mnist_shards, run_dir, output, "--epochs", "15", *TRAIN_ARGS, wait=False)
    job_id = job_id_of(proc)
    proc.wait(timeout=60)
    output = tmp_path / f"slurm-{job_id}.out"

    deadline = time.monotonic() + JOB_TIMEOUT  # until rank 0 has logged that training starts
    while not (output.exists() and STARTED.search(output.read_text(errors="replace"))):
        assert job_state(job_id).get("JobState") in ACTIVE, f"job {job_id} ended before training started:\n{tail(output)}"
        assert time.monotonic() < deadline, f"job {job_id}: no training after {JOB_TIMEOUT}s:\n{tail(output)}"
        time.sleep(1)
    assert len(python_processes_with(str(run_dir))) >= 3  # torchrun and its two ranks
    time.sleep(3)  # into the training loop

    # Like Slurm's --signal=TERM@120 before the time limit: SIGTERM to the job step's processes.
    subprocess.run(["scancel", "--signal=TERM", job_id], check=True, timeout=60)
    signalled = time.monotonic()
    while job_state(job_id).get("JobState") in ACTIVE:
        assert time.monotonic() - signalled < SIGNAL_TIMEOUT, f"job {job_id} still running {SIGNAL_TIMEOUT}s after SIGTERM:\n{tail(output)}"
        time.sleep(1)

    log = tail(output, 100_000)
    assert re.search(r"Received (15|(Signals\.)?SIGTERM) death signal", log), f"torchrun did not report SIGTERM:\n{log[-4000:]}"
    assert python_processes_with(str(run_dir)) == [], "training processes outlived the job"
    # The ranks honoured the signal: they stopped at a sync point and rank 0 checkpointed there.
    assert re.search(r"stopped at step \d+ and checkpointed", log), log[-4000:]
    assert list((run_dir / "checkpoints").glob("step-*.json")), "no checkpoint after SIGTERM"
