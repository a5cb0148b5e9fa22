"""What several test modules need: MNIST's known figures, an IDX writer, and process runners."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from harness.cli import main as cli_main
from harness.data.download import MIRRORS, MNIST_BYTES, MNIST_SHA256, download_mnist  # noqa: F401 (MNIST_*: re-exported for the tests)
from harness.errors import HarnessError

ROOT = Path(__file__).resolve().parents[1]

MNIST_TRAIN_HISTOGRAM = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_HISTOGRAM = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def idx_bytes(array, gz: bool = False, magic: bytes | None = None) -> bytes:
    """An unsigned-byte IDX file (the layout of the original MNIST distribution); `magic`
    replaces the first four header bytes, to write a bad one."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = (magic or bytes([0, 0, 0x08, array.ndim])) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.tobytes()
    return gzip.compress(data, mtime=0) if gz else data


def write_idx(path: Path, array, gz: bool = False, magic: bytes | None = None) -> None:
    Path(path).write_bytes(idx_bytes(array, gz, magic))


def mnist_cache_dir(env) -> Path:
    """Where the tests keep a downloaded MNIST: $HARNESS_CACHE/mnist, default ~/.cache/mnist-harness/mnist."""
    return Path(env.get("HARNESS_CACHE") or Path.home() / ".cache" / "mnist-harness") / "mnist"


def mnist_source(env, cache_dir: Path, mirrors=MIRRORS) -> Path:
    """$MNIST_DIR when it is set; else the files downloaded into `cache_dir` (those already
    there with the published MD5 are kept, so only the first run downloads)."""
    if env.get("MNIST_DIR"):
        path = Path(env["MNIST_DIR"])
        if not path.is_dir():
            raise HarnessError(f"MNIST_DIR={path} is not a directory")
        return path
    try:
        return download_mnist(cache_dir, mirrors=mirrors)
    except HarnessError as e:
        raise HarnessError(f"MNIST_DIR is not set and the download into {cache_dir} failed: {e}") from None


# --- input files -------------------------------------------------------------------------------------


def write_source(directory: Path, n_train: int = 200, n_test: int = 50, gz: bool = True) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    ext = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(directory / f"{prefix}-images-idx3-ubyte{ext}", rng.integers(0, 256, (n, 28, 28)), gz)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte{ext}", rng.integers(0, 10, n), gz)
    return directory


def csv_row(label, pixels=None) -> str:
    pixels = [0] * 784 if pixels is None else pixels
    return ",".join(map(str, [label, *pixels]))


def write_csv_source(directory: Path, train_lines: list[str], header: bool = True) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    head = [",".join(["label"] + [f"pixel{i}" for i in range(784)])] if header else []
    (directory / "mnist_train.csv").write_text("\n".join(head + train_lines) + "\n")
    (directory / "mnist_test.csv").write_text("\n".join(head + [csv_row(3), csv_row(4)]) + "\n")
    return directory


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` (relative name -> content)."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def cli(capsys, *args) -> tuple[int, str, str]:
    """`harness ARGS` in this process: (exit status, stdout, stderr)."""
    rc = cli_main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_error(rc: int, err: str, *fragments: str) -> str:
    """Exit status 2 and exactly one stderr line `error: ...` that holds every fragment."""
    assert rc == 2, err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


# --- crafted shards: what someone who controls a shard directory can write ------------------------------


def tar_members(path: Path) -> list[tuple[str, bytes]]:
    """The regular-file members of a tar, in order, as (name, content)."""
    with tarfile.open(path, "r:") as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isreg()]


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    """A plain tar of regular files with the packer's fixed metadata."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(payload), 0o644
            tar.addfile(info, io.BytesIO(payload))


def npy_bytes(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=allow_pickle)
    return buffer.getvalue()


def reseal(shard_dir: Path) -> dict:
    """Make manifest.json's shard sizes and SHA-256s match the files again, as whoever
    crafted the shards would: the manifest travels with them. Returns the manifest."""
    path = Path(shard_dir) / "manifest.json"
    manifest = json.loads(path.read_text())
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            shard_path = Path(shard_dir) / shard["name"]
            if shard_path.is_file():
                shard["bytes"] = shard_path.stat().st_size
                shard["sha256"] = hashlib.sha256(shard_path.read_bytes()).hexdigest()
    write_manifest(shard_dir, manifest)
    return manifest


def write_manifest(shard_dir: Path, manifest: dict) -> None:
    (Path(shard_dir) / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


class Payload:
    """Unpickling this opens (creates) `path` for writing: proof that code from a file ran."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def tiny_training_objects():
    """A small model, momentum SGD after one step (so it has momentum buffers), and a schedule."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 0.9**epoch)
    model(torch.ones(1, 4)).sum().backward()
    optimizer.step()
    return model, optimizer, scheduler


# --- processes -------------------------------------------------------------------------------------


def run(command: list[str], env: dict | None = None, timeout: float = 420, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """A command as a user would run it, from the repository root; output captured as text.
    Past `timeout` it is killed with all its processes (subprocess.run would kill only
    torchrun's agent, and leave its workers, which run in sessions of their own)."""
    args = [str(c) for c in command]
    process = subprocess.Popen(args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except BaseException:
        kill_tree(process)
        raise
    return subprocess.CompletedProcess(args, process.returncode, stdout, stderr)


def ranks_ended_with_harness_errors(output: str, nproc: int) -> bool:
    """From the account torchrun prints of a failed job (its ChildFailedError's `rank : R`
    and `exitcode : N` lines): every rank exited with HarnessError's status 2, or, where it
    had not yet exited when torchrun saw the first one end, of torchrun's SIGTERM (-15).
    None crashed or lost contact (status 1)."""
    found = re.findall(r"rank\s*: (\d+) \(local_rank: \d+\)\s*\n\s*exitcode\s*: (-?\d+)", output)
    statuses = {int(rank): int(status) for rank, status in found}
    return len(statuses) == nproc and 2 in statuses.values() and set(statuses.values()) <= {2, -signal.SIGTERM}


def kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL a process that may still run, and everything it started, and reap it."""
    if process.poll() is None:
        signal_tree(process, signal.SIGKILL)
        process.wait()


@contextlib.contextmanager
def lock_held_by_another_process(run_dir: Path):
    """Another process holds `run_dir`'s lock (RunDirLock) within; yields that process.
    It lets go when its stdin closes, and is killed if it has not ended 30 s after."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from harness.run_lock import RunDirLock; lock = RunDirLock(sys.argv[1]); print('locked', flush=True); sys.stdin.read()",
         str(run_dir)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline() == "locked\n"
        yield holder
    finally:
        try:
            holder.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            kill_tree(holder)
            raise


class LineReader:
    """A child's output pipe, read line by line on a thread, so that a test waits for a line
    with a deadline: a process that stalls without a word fails the test in `timeout`
    seconds, not at pytest-timeout's limit. `readline` returns "" at the end of output."""

    def __init__(self, stream):
        self.lines: queue.Queue[str] = queue.Queue()
        self.thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.thread.start()

    def _read(self, stream) -> None:
        for line in stream:
            self.lines.put(line)
        self.lines.put("")

    def readline(self, timeout: float) -> str:
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no output line within {timeout} s") from None

    def rest(self, timeout: float) -> str:
        """All output up to its end (the process, and whatever shares its pipe, has ended)."""
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"the output did not end within {timeout} s"
        lines = []
        while not self.lines.empty() and (line := self.lines.get_nowait()):
            lines.append(line)
        return "".join(lines)


def run_cli(*args, timeout: float = 600, env: dict | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """`python -m harness ARGS`."""
    return run([sys.executable, "-m", "harness", *args], env=env, timeout=timeout, cwd=cwd)


def train_command(shards: Path, run_dir: Path, *train_args, nproc: int = 1, launcher_args: tuple = ()) -> list[str]:
    """`python -m harness.train ...`, under `torchrun --standalone` when nproc > 1 or launcher_args are given."""
    train = ["-m", "harness.train", "--shards", str(shards), "--run-dir", str(run_dir), *map(str, train_args)]
    if nproc == 1 and not launcher_args:
        return [sys.executable, *train]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *launcher_args, *train]


# The run of the checkpoint, resume, stop and failure tests (test_checkpoint.py,
# test_resume.py, test_stops.py, test_failures.py): 300 LeNet steps in 9 macro-batches per
# epoch (7,000 images each, 70 steps), a sync point every 25 steps and a checkpoint every
# 50: kills land mid-epoch and mid-macro-batch.
CHECKPOINTED_RUN = ("--preset", "lenet", "--epochs", "1", "--max-steps", "300", "--macro-batch", "7000",
                    "--log-every", "25", "--checkpoint-every", "50", "--threads", "1")


def checkpointed_run(shards: Path, run_dir: Path, *extra: str, nproc: int = 1, launcher_args: tuple = ()) -> list[str]:
    """The command of CHECKPOINTED_RUN, with `extra` options after its own."""
    return train_command(shards, run_dir, *CHECKPOINTED_RUN, *extra, nproc=nproc, launcher_args=launcher_args)


# A signal lands 1 s after the step-50 checkpoint of CHECKPOINTED_RUN appears
# (start_and_signal); the 250 steps left take about 5 s on a 2-core Xeon, but a CPU 3x
# faster would finish first. Rank 0 pauses 5 s before step 130, so the signal lands
# mid-run on any machine (the weights are unchanged).
PAUSE = {"HARNESS_TEST_FAULT": "sleep=5@130"}

# The run of the small shard set (conftest's `shards`): 10 steps of 20 images per epoch, a
# sync point every 5.
SMALL_RUN = ("--model", "mlp", "--hidden", "32", "--device", "cpu", "--batch-size", "20", "--epochs", "3", "--log-every", "5",
             "--threads", "1")


def train_ok(shards: Path, run_dir: Path, *train_args, nproc: int = 1, launcher_args: tuple = (), env: dict | None = None) -> subprocess.CompletedProcess:
    """Train, and fail the test with the output's tail unless it exits 0."""
    result = run(train_command(shards, run_dir, *train_args, nproc=nproc, launcher_args=launcher_args), env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def signal_tree(process: subprocess.Popen, sig: int) -> None:
    """Signal a process and all its descendants, as Slurm signals every process of a job
    (torchrun starts its workers in sessions of their own, out of reach of killpg)."""
    root = psutil.Process(process.pid)
    for p in [root, *root.children(recursive=True)]:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


def start_and_signal(cmd: list[str], run_dir: Path, sig: int, env: dict | None = None) -> subprocess.Popen:
    """Start a run and signal every process of it once it is past its first checkpoint."""
    process = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})})
    try:
        wait_for(lambda: list((run_dir / "checkpoints").glob("step-*.json")) or process.poll() is not None, 240, "a checkpoint")
        assert process.poll() is None, process.communicate()[0]
        time.sleep(1.0)  # land between checkpoints
        signal_tree(process, sig)
        process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            signal_tree(process, signal.SIGKILL)
            process.wait()
    return process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- run outputs ----------------------------------------------------------------------------------


def summary(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "summary.json").read_text())


def checksum(run_dir: Path) -> str:
    """The run's final parameter checksum (summary.json's param_checksum)."""
    return summary(run_dir)["param_checksum"]


def scalar_events(run_dir: Path, tag: str) -> list:
    """The points TensorBoard shows for `tag` (step, wall_time, value), over every event file
    of the run (purges applied)."""
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return events.Scalars(tag)


def scalar_steps(run_dir: Path, tag: str) -> list[int]:
    return [e.step for e in scalar_events(run_dir, tag)]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(Path(run_dir) / "model.pt", weights_only=True)


def checkpoint_weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    """The model's parameters in a run's checkpoint of that step."""
    return torch.load(Path(run_dir) / "checkpoints" / f"step-{step:08d}.pt", weights_only=True)["model"]


def max_weight_diff(wa: dict[str, torch.Tensor], wb: dict[str, torch.Tensor]) -> float:
    """Largest absolute difference between two sets of the same parameters."""
    assert wa.keys() == wb.keys()
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


def max_param_diff(a: Path, b: Path) -> float:
    """Largest absolute difference between two runs' final parameters."""
    return max_weight_diff(final_weights(a), final_weights(b))
