"""Helpers shared by the benchmark scripts in bench/.

The scripts run as `python bench/X.py`, and start their own worker processes the same way
(by script path, also under torchrun), so this directory is sys.path[0] in all of them and
`import common` finds this file; the harness snapshot on PYTHONPATH holds only `harness`.
Only the standard library is imported at module level: workers and ranks import this too.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

CLEAN_CORES = 0.25  # a run is "clean" when other processes used at most this many cores during it


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1 (--repeats 0 left nothing to take a median of)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer of at least 1")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number above 0")
    return value


def positive_ints(text: str) -> list[int]:
    """argparse type: comma-separated integers of at least 1 (--sizes 60000,600000)."""
    try:
        return [positive_int(part) for part in text.split(",")]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers of at least 1") from None


def run_main(main) -> None:
    """Run a benchmark's main() and exit with its status, under the harness's own guard
    (errors.run_guarded): a HarnessError (a bad shard set, an unknown preset) is one line
    on stderr, as the harness prints it, not a traceback."""
    from harness.errors import run_guarded

    sys.exit(run_guarded(lambda _: main(), None))


def make_log(name: str):
    """A `log(message)` that writes `[name HH:MM:SS] message` to stderr (stdout carries the JSON record)."""

    def log(message: str) -> None:
        print(f"[{name} {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    return log


def median(values):
    """Median of the values that are not None; None when there are none."""
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def mnist_dir() -> Path:
    """The MNIST IDX directory from $MNIST_DIR (exits with a message when unset or missing)."""
    value = os.environ.get("MNIST_DIR", "")
    if not value:
        sys.exit("error: MNIST_DIR is not set; point it at a directory with the MNIST IDX files (e.g. MNIST_DIR=../shared/mnist)")
    path = Path(value)
    if not path.is_dir():
        sys.exit(f"error: MNIST_DIR={value}: not a directory")
    # Absolute, for the child processes, which run in other directories.
    os.environ["MNIST_DIR"] = str(path.resolve())
    return path.resolve()


def capture_step(work, model, warm_up: int = 3):
    """A training step's `work` (forward and backward, and the optimizer's update if it
    includes it, as harness/cuda_graph.py's does) as one CUDA graph: `warm_up` runs on a
    side stream (gradients dropped; the first update makes the momentum buffers), then the
    capture. Returns the graph; each `replay()` leaves fresh gradients."""
    import torch  # here, not at module level: see the module docstring

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warm_up):
            work()
            model.zero_grad(set_to_none=True)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        work()
    return graph


# ----------------------------------------------------------------------------- environment


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask), else all of them."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def hardware(**extra) -> dict:
    """CPU model and core counts; `extra` (e.g. gpu=...) is added last."""
    return {
        "cpu_model": cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable_cores(),
        "machine": platform.machine(),
        **extra,
    }


def versions(*modules: str, **extra) -> dict:
    """Versions of Python, torch, numpy, the named extra `modules` and harness, then `extra`
    fields, then the platform. harness is imported from sys.path as it is now (the snapshot,
    once harness_code() has put it first)."""
    import importlib

    import numpy
    import torch

    import harness

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        **{name: getattr(importlib.import_module(name), "__version__", "unknown") for name in modules},
        "harness": getattr(harness, "__version__", "unknown"),
        **extra,
        "platform": platform.platform(),
    }


def loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


# ----------------------------------------------------------------------------- CPU contention


def cpu_jiffies() -> tuple[int, int]:
    """Machine-wide (total, idle) CPU time from the first line of /proc/stat, in clock ticks
    (idle counts iowait too); raises OSError/IndexError/ValueError where it cannot be read."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields[:8]), idle


def busy_seconds() -> float | None:
    """Machine-wide busy CPU seconds so far (all cores), or None where /proc/stat is unreadable."""
    try:
        total, idle = cpu_jiffies()
    except (OSError, IndexError, ValueError):
        return None
    return (total - idle) / os.sysconf("SC_CLK_TCK")


def own_and_children_cpu() -> float:
    """CPU seconds of this process and of its waited-for descendants."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


class OthersGauge:
    """Average CPU cores that other processes used during a timed stretch (`with OthersGauge()
    as g: ...; g.cores`): machine-wide busy time minus this process's and its waited-for
    descendants' (a child waited for inside the stretch counts as ours; torchrun waits its
    ranks). None where /proc/stat cannot be read."""

    cores: float | None = None

    def __enter__(self):
        self.busy0, self.own0, self.wall0 = busy_seconds(), own_and_children_cpu(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        wall, busy, own = time.perf_counter() - self.wall0, busy_seconds(), own_and_children_cpu()
        if self.busy0 is None or busy is None or wall <= 0:
            self.cores = None
        else:
            self.cores = round(max(0.0, (busy - self.busy0) - (own - self.own0)) / wall, 2)
        return False


# ----------------------------------------------------------------------------- harness code


def git_state(package_dir: Path) -> dict:
    """The checkout's commit and the uncommitted changes below package_dir (None/[] without git)."""

    def git(*args):
        done = subprocess.run(["git", "-C", str(package_dir), *args], capture_output=True, text=True)
        return done.stdout.rstrip() if done.returncode == 0 else None

    changed = git("status", "--porcelain", "--", ".")
    return {"git_commit": git("rev-parse", "HEAD"), "uncommitted_changes_in_package": changed.splitlines() if changed else []}


def harness_code(work: Path, live: bool) -> tuple[dict, str | None]:
    """Unless `live`, copy the harness package once to WORK/harness_snapshot, so that every run
    of a benchmark uses the same code even while someone edits the checkout, and put it first
    on this process's sys.path. Returns the JSON's `harness_code` record and the snapshot root
    (None when live), which the caller puts first on its children's PYTHONPATH."""
    import importlib.util

    origin = Path(importlib.util.find_spec("harness").origin).parent
    root = None
    if not live:
        root = work / "harness_snapshot"
        shutil.copytree(origin, root / "harness", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        sys.path.insert(0, str(root))
    return {"package_dir": str(origin), "snapshot": not live, **git_state(origin)}, (str(root) if root else None)
