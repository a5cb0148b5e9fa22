"""slurm/train.sbatch on a real Slurm cluster of two nodes on one machine (slurm/local-cluster.sh).

The module fixture installs (first time only, as root, with apt-get) and starts munged,
slurmctld and two slurmd, node1 and node2: their names do not resolve, Slurm reaches them
at NodeAddr 127.0.0.1. A cluster this module started is stopped again at the end. The jobs
run as root with this environment (--export=ALL), so they find the same python, torchrun
and `harness`. One node with NPROC_PER_NODE=2: one torchrun starts two gloo ranks; two
nodes with NPROC_PER_NODE=1: one torchrun on each node, one rank each. `scancel
--signal=TERM` stands in for the time limit's SIGTERM (--signal=TERM@120): both go to the
job step's processes. Whether the job requeued itself is scontrol's Restarts count.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import torch
from helpers import final_weights, lock_held_by_another_process, max_param_diff, summary, train_ok
from test_distributed import FIFTY_STEPS_TOLERANCE

ROOT = Path(__file__).resolve().parents[1]
SBATCH = ROOT / "slurm" / "train.sbatch"
CLUSTER = ROOT / "slurm" / "local-cluster.sh"
NODES = ["node1", "node2"]
SETUP_TIMEOUT = 900  # apt-get install on a fresh machine; a running cluster answers in about a second
JOB_TIMEOUT = 600
SIGNAL_TIMEOUT = 120  # from scancel --signal=TERM to the job's end
ACTIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "RESIZING", "REQUEUED"}
SLURM_DAEMONS = {"slurmctld", "slurmd", "slurmstepd"}
TRAIN_ARGS = ("--device", "cpu", "--threads", "1", "--log-every", "10")
# What tests/test_distributed.py's FIFTY_STEPS_TOLERANCE was measured for: 50 LeNet steps at
# lr 0.02 (the preset's batch of 100), one thread per rank. --log-every does not change the
# arithmetic; it sets the sync points, where a stop signal is honoured.
COMPARED_ARGS = ("--device", "cpu", "--threads", "1", "--lr", "0.02", "--max-steps", "50", "--log-every", "5")
STARTED = re.compile(r"\blenet on cpu, world size 2\b")  # from the harness's first log line on rank 0


def slurm_daemons() -> list[tuple[int, str]]:
    """(pid, name) of every Slurm daemon on this machine."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            name = (proc / "comm").read_text().strip() if proc.name.isdigit() else ""
        except OSError:
            continue
        if name in SLURM_DAEMONS:
            found.append((int(proc.name), name))
    return found


def nodes_idle() -> bool:
    """Whether a cluster is up with both nodes idle (False where Slurm is not installed yet:
    local-cluster.sh installs it)."""
    try:
        result = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        return False
    return result.returncode == 0 and {f"{n} idle" for n in NODES} <= set(result.stdout.splitlines())


def local_cluster(*args: str) -> None:
    try:
        result = subprocess.run(["bash", str(CLUSTER), *args], capture_output=True, text=True, timeout=SETUP_TIMEOUT)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"slurm/local-cluster.sh {' '.join(args)} did not finish in {SETUP_TIMEOUT}s:\n{e.stdout}\n{e.stderr}")
    assert result.returncode == 0, f"slurm/local-cluster.sh {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"


@pytest.fixture(scope="module")
def slurm_job_name():
    """A running two-node cluster, and a job name unique to this module. After the module its
    leftover jobs are cancelled, and a cluster it started is stopped, every daemon with it."""
    was_running = nodes_idle()
    local_cluster("start", str(len(NODES)))
    name = f"harness-test-{uuid.uuid4().hex[:8]}"
    yield name
    subprocess.run(["scancel", f"--name={name}"], capture_output=True, timeout=60)
    deadline = time.monotonic() + 60  # let the next tests have the CPUs back
    while time.monotonic() < deadline and squeue_ids(name):
        time.sleep(1)
    if not was_running:
        local_cluster("stop")
        assert slurm_daemons() == [], "slurm/local-cluster.sh stop left Slurm daemons running"


def squeue_ids(name: str) -> list[str]:
    result = subprocess.run(["squeue", "-h", f"--name={name}", "-o", "%i"], capture_output=True, text=True, timeout=60)
    return result.stdout.split()


def job_state(job_id: str) -> dict[str, str]:
    """scontrol's fields of a job ({} once Slurm has forgotten it: local-cluster.sh sets MinJobAge=16 s)."""
    result = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, timeout=60)
    if result.returncode:
        return {}
    return dict(field.split("=", 1) for field in result.stdout.split() if "=" in field)


def submit(name: str, shards: Path, run_dir: Path, output: Path, *train_args: str, wait: bool, nodes: int = 1, env: dict | None = None,
           export_all: bool = True) -> subprocess.Popen:
    """sbatch the script from the repository root as a user would, with PRESET/SHARDS/RUN_DIR in the
    environment; one node runs two ranks, more nodes one rank each. `export_all=False`:
    those settings alone reach the job (sbatch --export=NONE,PRESET=...), as at sites
    that set SBATCH_EXPORT=NONE."""
    settings = {"PRESET": "lenet", "SHARDS": str(shards), "RUN_DIR": str(run_dir), "NPROC_PER_NODE": "2" if nodes == 1 else "1", **(env or {})}
    export = "--export=ALL" if export_all else "--export=" + ",".join(["NONE", *(f"{k}={v}" for k, v in settings.items())])
    command = ["sbatch", "--parsable", f"--job-name={name}", f"--nodes={nodes}", f"--output={output}", export, *(["--wait"] if wait else []), str(SBATCH), *train_args]
    env = {**os.environ, **settings}
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)


def job_id_of(proc: subprocess.Popen) -> str:
    # --parsable prints the id at once, before --wait waits: a minute covers a busy controller.
    line = proc.stdout.readline().strip() if select.select([proc.stdout], [], [], 60)[0] else ""
    if not line:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)
        pytest.fail(f"sbatch failed (exit {proc.returncode}): {proc.stderr.read()}")
    return line.split(";")[0]


def start_job(name: str, shards: Path, run_dir: Path, tmp_path: Path, *train_args: str, nodes: int = 1, env: dict | None = None) -> tuple[str, Path]:
    """Submit without waiting: (job id, its output file)."""
    proc = submit(name, shards, run_dir, tmp_path / "slurm-%j.out", *train_args, wait=False, nodes=nodes, env=env)
    job_id = job_id_of(proc)
    proc.wait(timeout=60)
    return job_id, tmp_path / f"slurm-{job_id}.out"


def wait_for_end(job_id: str, output: Path, timeout: float = JOB_TIMEOUT, while_running=None) -> dict[str, str]:
    """Poll until the job has ended (through any requeue); its last scontrol fields. `while_running`
    is called at every poll."""
    deadline, state, last = time.monotonic() + timeout, job_state(job_id), {}
    while state.get("JobState") in ACTIVE:
        assert time.monotonic() < deadline, f"job {job_id} still {state['JobState']} after {timeout}s:\n{tail(output)}"
        if while_running:
            while_running()
        time.sleep(0.2)
        last, state = state, job_state(job_id)
    return state or last  # {} if Slurm forgot it between two polls: the last state seen


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


def rank_processes(run_dir: Path) -> list[dict]:
    """The training ranks of a run that are alive now, as the kernel sees them: their RANK and
    SLURMD_NODENAME (the Slurm node whose slurmd started them), and whether they catch SIGTERM
    yet (the harness installs its stop handler before it loads any data)."""
    ranks = []
    for pid in python_processes_with(str(run_dir)):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")
            caught = re.search(r"^SigCgt:\s*([0-9a-f]+)$", Path(f"/proc/{pid}/status").read_text(), re.M)
        except OSError:
            continue
        env = dict(item.split("=", 1) for item in environ if "=" in item)
        if "RANK" in env and caught:  # torchrun's workers; not torchrun or srun
            catches = bool(int(caught[1], 16) >> (signal.SIGTERM - 1) & 1)
            ranks.append({"rank": int(env["RANK"]), "node": env.get("SLURMD_NODENAME"), "catches_sigterm": catches})
    return ranks


@pytest.mark.parametrize("option", ["--run-dir", "--run-dir=/tmp/elsewhere", "--preset", "--shards"])
def test_options_the_script_sets_itself_are_refused(option):
    """The script looks for RUN_DIR/stopped.json to requeue: a --run-dir among the options
    would win in the harness, and a stopped job would be reported as failed, not requeued.
    Checked before anything of Slurm's is read, so no cluster is needed."""
    result = subprocess.run(["bash", str(SBATCH), "--epochs", "1", option, "x"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 2
    assert result.stderr.strip() == f"slurm/train.sbatch: set RUN_DIR, PRESET and SHARDS in the environment, not {option.split('=')[0]} among the options"


STUB_SRUN = """#!/bin/bash
printf '%s\\n' "$@" > "$STUB_OUT/srun-args"
case $STUB_SRUN in
  finish-then-fail) echo '{"steps": 2}' > "$RUN_DIR/summary.json"; exit 1 ;;
  fail) exit 1 ;;
  stop) printf '{\\n "signal": "SIGTERM",\\n "step": 7\\n}\\n' > "$RUN_DIR/stopped.json"; exit 1 ;;  # as the harness writes it
esac
"""


def run_script_with_stubs(tmp_path: Path, *options: str, restart_count: int = 0, srun: str = "fail",
                          env: dict | None = None) -> tuple[subprocess.CompletedProcess, list[str]]:
    """The batch script outside Slurm, with stand-ins for srun, scontrol and sinfo: its own
    bookkeeping (the options it passes on, what it makes of the step's end) without a
    cluster. Returns the result and the arguments srun got."""
    stubs, out = tmp_path / "stubs", tmp_path / "out"
    stubs.mkdir(exist_ok=True)
    out.mkdir(exist_ok=True)
    for name, text in (("srun", STUB_SRUN), ("sinfo", "#!/bin/bash\necho 127.0.0.1\n"),
                       ("scontrol", '#!/bin/bash\ncase "$*" in *hostnames*) echo node1 ;; *"show job"*) echo " Requeue=1 " ;; '
                                    'requeue*) echo requeued >> "$STUB_OUT/requeued" ;; esac\n')):
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "STUB_OUT": str(out), "STUB_SRUN": srun, "RUN_DIR": str(tmp_path / "run"),
           "SLURM_SUBMIT_DIR": str(ROOT), "SLURM_JOB_ID": "4242", "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "node1",
           "SLURM_CPUS_ON_NODE": "1", "SLURM_RESTART_COUNT": str(restart_count), **(env or {})}
    result = subprocess.run(["bash", str(SBATCH), *options], capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)
    args_file = out / "srun-args"
    return result, args_file.read_text().splitlines() if args_file.exists() else []


@pytest.mark.parametrize("restart_count", [0, 1])
def test_resume_among_the_options_is_for_the_first_attempt_only(tmp_path, restart_count):
    """`sbatch train.sbatch --resume PATH`: the first attempt starts from PATH; a requeued
    one goes on from the newest checkpoint (auto). Passed again, --resume took every
    attempt back to PATH, or failed once PATH had been pruned."""
    options = ("--epochs", "2", "--resume", "runs/x/checkpoints/step-00000010.pt", "--seed", "3", "--resume=never")
    _, srun_args = run_script_with_stubs(tmp_path, *options, restart_count=restart_count)
    passed_on = srun_args[srun_args.index("--run-dir") + 2 :]
    assert passed_on == (list(options) if restart_count == 0 else ["--epochs", "2", "--seed", "3"])


@pytest.mark.parametrize(("env", "line"), [
    ({"NPROC_PER_NODE": "0"}, "slurm/train.sbatch: NPROC_PER_NODE is the number of ranks per node, got '0'"),
    ({"MAX_REQUEUES": "many"}, "slurm/train.sbatch: MAX_REQUEUES is a number, got 'many'"),
    ({"RDZV_PORT": "abc"}, "slurm/train.sbatch: RDZV_PORT is a port number (1 to 65535), got 'abc'"),
    ({"RDZV_PORT": "99999"}, "slurm/train.sbatch: RDZV_PORT is a port number (1 to 65535), got '99999'"),
    ({"RDZV_PORT": "1" * 20}, f"slurm/train.sbatch: RDZV_PORT is a port number (1 to 65535), got '{'1' * 20}'"),  # no bash overflow message
    ({"SLURM_SUBMIT_DIR": "/"}, "slurm/train.sbatch: submitted from /, which has no launch/env.sh: run sbatch from the checkout's root"),
])
def test_a_bad_setting_or_submit_directory_is_one_line_before_srun(tmp_path, env, line):
    """NPROC_PER_NODE=0 gave torchrun's AssertionError traceback, and a job submitted from
    outside the checkout only bash's 'launch/env.sh: No such file or directory'."""
    result, srun_args = run_script_with_stubs(tmp_path, "--max-steps", "2", env=env)
    assert (result.returncode, result.stderr.strip(), srun_args) == (2, line, [])


@pytest.mark.parametrize("srun,status,line", [
    ("fail", 1, "job 4242: training failed (srun exit status 1); not requeued"),
    ("finish-then-fail", 0, "job 4242: finished (srun exit status 1: a stop signal came at the end); run files in {run_dir}"),
    ("stop", None, "job 4242: stopped at step 7; requeueing (requeue 1 of at most 20)"),
])
def test_an_earlier_summary_does_not_make_a_failed_attempt_finished(tmp_path, srun, status, line):
    """RUN_DIR holds the summary.json of a run that finished before (and is now extended):
    an attempt that fails is a failure, not "finished" with exit 0, and one that writes a
    new summary before the step fails did finish. A stopped one is requeued."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "summary.json").write_text('{"steps": 1}')
    result, _ = run_script_with_stubs(tmp_path, "--max-steps", "2", srun=srun)
    assert line.format(run_dir=run_dir) in result.stdout + result.stderr, result.stdout + result.stderr
    if status is not None:
        assert result.returncode == status
    else:
        assert (tmp_path / "out" / "requeued").read_text() == "requeued\n"


def test_a_rendezvous_port_in_use_is_refused_before_srun(tmp_path):
    """A program listening on RDZV_PORT took torchrun's connections and never answered: the
    job hung silently until its time limit (and 29500 + JOBID % 1000 is torchrun's own
    default port for every thousandth job)."""
    with socket.socket() as listener:
        listener.bind(("", 0))
        listener.listen()
        port = listener.getsockname()[1]
        result, srun_args = run_script_with_stubs(tmp_path, "--max-steps", "2", env={"RDZV_PORT": str(port)})
    assert (result.returncode, result.stderr.strip(), srun_args) == (2, f"slurm/train.sbatch: RDZV_PORT {port} on node1: in use; set RDZV_PORT to a free port", [])


def test_a_run_directory_another_run_is_writing_to_is_refused_before_srun(tmp_path):
    """Two jobs given one RUN_DIR: the second's script removed the first run's stopped.json
    before its own run was refused (RUN_DIR/lock), so the first job, stopping, was reported
    failed and not requeued. Now the script sees the lock held, and refuses; and it never
    removes a stop record, but counts one only if its own attempt wrote it."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "stopped.json").write_text('{"signal": "SIGTERM", "step": 7}')
    with lock_held_by_another_process(run_dir) as holder:
        result, srun_args = run_script_with_stubs(tmp_path, "--max-steps", "2")
    line = (f"slurm/train.sbatch: RUN_DIR {run_dir}: another run is writing to it (its lock file names pid {holder.pid} on {socket.gethostname()}); "
            "wait for it to end, or set another RUN_DIR")
    assert (result.returncode, result.stderr.strip(), srun_args) == (2, line, [])
    assert (run_dir / "stopped.json").exists()
    # The lock is free: the attempt starts, and fails; the record from before is not its stop.
    result, srun_args = run_script_with_stubs(tmp_path, "--max-steps", "2")
    assert srun_args and "job 4242: training failed (srun exit status 1); not requeued" in result.stderr
    assert (run_dir / "stopped.json").exists() and not (tmp_path / "out" / "requeued").exists()


def test_sbatch_two_ranks(slurm_job_name, quick_shards, tmp_path):
    """Submitted with --export=NONE and its settings: the step got no environment then, and
    could not find torchrun on the PATH that launch/env.sh set."""
    run_dir, output = tmp_path / "run", tmp_path / "slurm-%j.out"
    proc = submit(slurm_job_name, quick_shards, run_dir, output, "--max-steps", "30", *TRAIN_ARGS, wait=True, export_all=False)
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
    # The job's own output says it ran once and finished; scontrol says so too while it still
    # knows the job (it forgets it MinJobAge=16 s after the end, which a loaded machine can pass).
    assert f"job {job_id}, attempt 1:" in log and f"job {job_id}: finished" in log and "attempt 2" not in log, log[-4000:]
    state = job_state(job_id)
    if state:
        assert (state["JobState"], state["ExitCode"], state["Restarts"]) == ("COMPLETED", "0:0", "0"), state

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["steps_per_rank"] == [30, 30]
    assert summary["ranks_identical"] is True
    assert STARTED.search(log), log[-4000:]
    # the rendezvous is at the node's NodeAddr, not at its name (node1 does not resolve)
    assert f"job {job_id}, attempt 1: 1 node(s) x 2 rank(s), rendezvous 127.0.0.1:" in log
    assert f"job {job_id}: finished; run files in {run_dir}" in log


@pytest.fixture(scope="module")
def two_node_run(slurm_job_name, quick_shards, tmp_path_factory):
    """sbatch --nodes=2 with one rank per node, run to the end: (run dir, job output, final
    scontrol fields, the Slurm node each rank ran on as seen in its environment)."""
    tmp_path = tmp_path_factory.mktemp("two-nodes")
    run_dir = tmp_path / "run"
    job_id, output = start_job(slurm_job_name, quick_shards, run_dir, tmp_path, *COMPARED_ARGS, nodes=2)
    nodes_of_ranks: dict[int, str] = {}

    def record_ranks():
        nodes_of_ranks.update({r["rank"]: r["node"] for r in rank_processes(run_dir)})

    state = wait_for_end(job_id, output, while_running=record_ranks)
    return run_dir, tail(output, 100_000), state, nodes_of_ranks


def test_two_nodes_one_rank_each_match_torchrun(two_node_run, quick_shards, tmp_path):
    """The same training as 2 processes under torchrun on one node, up to float summation order."""
    run_dir, log, state, nodes_of_ranks = two_node_run
    assert (state.get("JobState"), state.get("ExitCode"), state.get("Restarts")) == ("COMPLETED", "0:0", "0"), log[-4000:]
    assert state["NodeList"] == "node[1-2]"
    assert sorted(nodes_of_ranks) == [0, 1] and sorted(nodes_of_ranks.values()) == NODES  # one rank on each node
    assert re.search(r"attempt 1: 2 node\(s\) x 1 rank\(s\), rendezvous 127\.0\.0\.1:\d+ \(node1\)", log), log[-4000:]
    s = summary(run_dir)
    assert s["world_size"] == 2 and s["steps_per_rank"] == [50, 50] and s["ranks_identical"] is True

    train_ok(quick_shards, tmp_path / "torchrun", "--preset", "lenet", *COMPARED_ARGS, nproc=2)
    assert max_param_diff(run_dir, tmp_path / "torchrun") < FIFTY_STEPS_TOLERANCE


def test_stopped_job_requeues_itself_and_resumes(slurm_job_name, two_node_run, quick_shards, tmp_path):
    """SIGTERM as at the time limit: the ranks checkpoint and stop, the batch script requeues the
    job, and the second attempt resumes and ends with the uninterrupted run's weights, bit for bit."""
    run_dir = tmp_path / "run"
    # Rank 0 pauses 5 s before step 26, so that a signal sent 1 s after training starts lands
    # mid-run on any machine (the weights are unchanged). A signal during start-up would stop
    # the run before its first step, with no checkpoint (tests/test_stops.py).
    job_id, output = start_job(slurm_job_name, quick_shards, run_dir, tmp_path, *COMPARED_ARGS, nodes=2,
                               env={"HARNESS_TEST_FAULT": "sleep=5@25"})
    deadline = time.monotonic() + JOB_TIMEOUT
    while "before training: " not in tail(output, 100_000):  # rank 0's last line of start-up
        assert job_state(job_id).get("JobState") in ACTIVE, f"job {job_id} ended before training:\n{tail(output)}"
        assert time.monotonic() < deadline, f"job {job_id}: no training after {JOB_TIMEOUT}s:\n{tail(output)}"
        time.sleep(0.1)
    time.sleep(1.0)
    subprocess.run(["scancel", "--signal=TERM", job_id], check=True, timeout=60)
    state = wait_for_end(job_id, output)

    log = tail(output, 100_000)
    assert (state.get("JobState"), state.get("ExitCode"), state.get("Restarts")) == ("COMPLETED", "0:0", "1"), log[-4000:]
    stopped = re.search(rf"job {job_id}: stopped at step (\d+); requeueing \(requeue 1 of at most 20\)", log)
    assert stopped, log[-4000:]
    step = int(stopped[1])
    assert 0 < step < 50
    # both attempts in the one log, the second resuming where the first stopped
    first, second = log.index(f"job {job_id}, attempt 1:"), log.index(f"job {job_id}, attempt 2:")
    assert first < stopped.start() < second < log.index(f"resuming from {run_dir}/checkpoints/step-{step:08d}.pt")
    assert f"job {job_id}: finished; run files in {run_dir}" in log[second:]

    s = summary(run_dir)
    assert s["world_size"] == 2 and s["steps_per_rank"] == [50, 50]
    assert not (run_dir / "stopped.json").exists()
    uninterrupted, resumed = final_weights(two_node_run[0]), final_weights(run_dir)
    assert uninterrupted.keys() == resumed.keys()
    assert all(torch.equal(uninterrupted[k], resumed[k]) for k in resumed)


def test_failed_job_is_not_requeued(slurm_job_name, quick_shards, tmp_path):
    """A rank that dies after checkpoints were written: the job fails and stays failed."""
    run_dir = tmp_path / "run"
    args = ("--max-steps", "50", "--checkpoint-every", "5", *TRAIN_ARGS)
    job_id, output = start_job(slurm_job_name, quick_shards, run_dir, tmp_path, *args, env={"HARNESS_TEST_FAULT": "exit@15:1"})
    state = wait_for_end(job_id, output)

    log = tail(output, 100_000)
    assert (state.get("JobState"), state.get("Restarts")) == ("FAILED", "0"), log[-4000:]
    assert f"job {job_id}: training failed (srun exit status 1); not requeued" in log
    assert "requeueing" not in log and "attempt 2" not in log
    # progress was made (checkpoints up to step 15), so it is not "a new checkpoint" that tells a stop
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step-*.json"))[-1] == "step-00000015.json"
    assert not (run_dir / "stopped.json").exists()


def test_scancel_sigterm_reaches_training_processes(slurm_job_name, quick_shards, tmp_path):
    """SIGTERM reaches torchrun and the ranks, which checkpoint; with MAX_REQUEUES=0 the job then ends."""
    run_dir = tmp_path / "run"
    job_id, output = start_job(slurm_job_name, quick_shards, run_dir, tmp_path, "--epochs", "15", *TRAIN_ARGS, env={"MAX_REQUEUES": "0"})

    # Until rank 0's last line of start-up: its first line comes some seconds earlier (2.4 s
    # here: the test set's evaluation), and a SIGTERM before the first step stops the run
    # with nothing to checkpoint. What follows the line (loading the first macro-batch)
    # takes milliseconds, so 3 s later the ranks are training on any machine.
    deadline = time.monotonic() + JOB_TIMEOUT
    while "before training: " not in tail(output, 100_000):
        assert job_state(job_id).get("JobState") in ACTIVE, f"job {job_id} ended before training started:\n{tail(output)}"
        assert time.monotonic() < deadline, f"job {job_id}: no training after {JOB_TIMEOUT}s:\n{tail(output)}"
        time.sleep(0.5)
    assert len(python_processes_with(str(run_dir))) >= 3  # torchrun and its two ranks
    time.sleep(3)

    # Like Slurm's --signal=TERM@120 before the time limit: SIGTERM to the job step's processes.
    subprocess.run(["scancel", "--signal=TERM", job_id], check=True, timeout=60)
    state = wait_for_end(job_id, output, timeout=SIGNAL_TIMEOUT)

    log = tail(output, 100_000)
    assert re.search(r"Received (15|(Signals\.)?SIGTERM) death signal", log), f"torchrun did not report SIGTERM:\n{log[-4000:]}"
    assert python_processes_with(str(run_dir)) == [], "training processes outlived the job"
    # The ranks honoured the signal: they stopped at a sync point and rank 0 checkpointed there.
    stopped = re.search(r"stopped at step (\d+) and checkpointed; run again to resume", log)
    assert stopped, log[-4000:]
    assert (run_dir / "checkpoints" / f"step-{int(stopped[1]):08d}.json").exists()
    assert json.loads((run_dir / "stopped.json").read_text())["step"] == int(stopped[1])  # what the script went by
    # ... and the cap held: no requeue
    assert f"not requeued: requeued 0 time(s) already (MAX_REQUEUES=0): resubmit with RUN_DIR={run_dir} to resume" in log
    assert (state.get("JobState"), state.get("ExitCode"), state.get("Restarts")) == ("FAILED", "75:0", "0"), state
