#!/usr/bin/env python
"""The float noise behind the test suite's accuracy and weight tolerances, measured under
each CPU kernel set, as a CI machine of another CPU model would pick it.

    MNIST_DIR=../shared/mnist python bench/tolerance_noise.py > noise.json     # ~15 min on 2 cores

PyTorch picks its CPU kernels at start-up from what the CPU offers (AVX-512, AVX2 or
neither), and oneDNN, which runs the convolutions, does the same. The kernels sum in
different orders, so the same run ends with slightly different weights on another CPU
model. ATEN_CPU_CAPABILITY and DNNL_MAX_CPU_ISA cap both, so this one machine can stand
in for the older ones. Each test configuration below (named after the test whose bound
it informs) runs in a fresh `python -m harness train` process under every kernel set
this CPU supports, and the JSON record gives, per configuration, the figure the test
bounds for each kernel set and seed, and its range across all of them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import hardware, make_log, mnist_dir, versions

log = make_log("tolerance_noise")
ROOT = Path(__file__).resolve().parents[1]

# name -> the environment that caps PyTorch's and oneDNN's kernels to that set ("native": none).
KERNEL_SETS = {
    "native": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "DNNL_MAX_CPU_ISA": "AVX2"},
    "default": {"ATEN_CPU_CAPABILITY": "default", "DNNL_MAX_CPU_ISA": "SSE41"},
}


def train(shards: Path, run_dir: Path, kernel_env: dict, *args, nproc: int = 1) -> dict:
    """One training run in a fresh process (under torchrun when nproc > 1); its summary.json."""
    command = ["-m", "harness", "train", "--shards", str(shards), "--run-dir", str(run_dir), "--device", "cpu", *map(str, args)]
    if nproc > 1:
        command = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "harness.train", *command[3:]]
    done = subprocess.run([sys.executable, *command], cwd=ROOT, capture_output=True, text=True, env={**os.environ, **kernel_env}, timeout=900)
    if done.returncode != 0:
        sys.exit(f"error: {' '.join(command)} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return json.loads((run_dir / "summary.json").read_text())


def max_weight_difference(a: Path, b: Path) -> float:
    import torch

    wa, wb = (torch.load(d / "model.pt", weights_only=True) for d in (a, b))
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


# Each configuration is the test's own command line; it returns {figure name: value}.
def ddp_world_sizes(shards, work, kernel_env, seed):
    """test_distributed.test_ddp_reaches_single_process_accuracy: 300 LeNet steps at lr 0.02,
    1, 2 and 4 processes of one thread."""
    args = ("--preset", "lenet", "--lr", "0.02", "--max-steps", "300", "--threads", "1", "--seed", seed)
    accuracy = {w: train(shards, work / f"w{w}", kernel_env, *args, nproc=w)["test_accuracy"] for w in (1, 2, 4)}
    return {
        "accuracy_1_process": accuracy[1],
        "accuracy_gap_2_processes": round(abs(accuracy[2] - accuracy[1]), 6),
        "accuracy_gap_4_processes": round(abs(accuracy[4] - accuracy[1]), 6),
    }


def ddp_weights_50_steps(shards, work, kernel_env, seed):
    """test_distributed.test_world_size_invariance (and the URL and Slurm tests that share its
    bound): LeNet's weights after 50 steps at lr 0.02, 1 process vs 2 and 4, and the defect
    the bound must still catch, one step fewer (49 vs 50 steps, one process)."""
    args = ("--preset", "lenet", "--lr", "0.02", "--threads", "1", "--seed", seed)
    for w in (1, 2, 4):
        train(shards, work / f"w{w}", kernel_env, *args, "--max-steps", 50, nproc=w)
    train(shards, work / "w1-49", kernel_env, *args, "--max-steps", 49)
    return {
        "weight_gap_2_processes": max_weight_difference(work / "w1", work / "w2"),
        "weight_gap_4_processes": max_weight_difference(work / "w1", work / "w4"),
        "weight_gap_one_step_fewer": max_weight_difference(work / "w1", work / "w1-49"),
    }


def bf16_30_steps(shards, work, kernel_env, seed):
    """test_device.test_bf16_autocast_from_accelerates_environment: 30 LeNet steps in bf16."""
    args = ("--preset", "lenet", "--max-steps", "30", "--threads", "1", "--precision", "bf16", "--seed", seed)
    return {"accuracy": train(shards, work / "bf16", kernel_env, *args)["test_accuracy"]}


def mse_mlp_300_steps(shards, work, kernel_env, seed):
    """test_train.test_mse_loss_trains: 300 steps of a 64-unit MLP on the squared error."""
    args = ("--preset", "neupy-mlp", "--hidden", "64", "--loss", "mse", "--lr", "0.5", "--momentum", "0.9",
            "--no-nesterov", "--max-steps", "300", "--seed", seed)
    return {"accuracy": train(shards, work / "mse", kernel_env, *args)["test_accuracy"]}


def channels_last_one_step(shards, work, kernel_env, seed):
    """test_device.test_channels_last_gives_the_same_step: one LeNet step in each layout."""
    args = ("--preset", "lenet", "--max-steps", "1", "--threads", "1", "--seed", seed)
    train(shards, work / "contiguous", kernel_env, *args)
    train(shards, work / "channels-last", kernel_env, *args, "--channels-last")
    return {"max_weight_difference": max_weight_difference(work / "contiguous", work / "channels-last")}


CONFIGURATIONS = {f.__name__: f for f in (ddp_world_sizes, ddp_weights_50_steps, bf16_30_steps, mse_mlp_300_steps, channels_last_one_step)}


def kernel_sets_below(native: str) -> list[str]:
    """"native", then each capped set below what this CPU offers (a cap at or above it
    would change nothing)."""
    order = ["default", "avx2", "avx512"]
    native_rank = next((i for i, name in enumerate(order) if native.lower().startswith(name)), 0)
    return ["native", *[name for name in order[:native_rank] if name in KERNEL_SETS][::-1]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configurations", nargs="+", choices=sorted(CONFIGURATIONS), default=list(CONFIGURATIONS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds for every configuration but the ddp_ ones, which run seed 0 as their tests do")
    options = parser.parse_args()
    mnist = mnist_dir()
    import torch

    native = torch.backends.cpu.get_cpu_capability()
    kernel_sets = kernel_sets_below(native)

    from harness.data.pack import pack
    from harness.data.sources import load_source

    started = time.monotonic()
    results = {}
    with tempfile.TemporaryDirectory(prefix="tolerance-noise-") as tmp:
        shards = Path(tmp) / "shards"
        pack(load_source(mnist), shards)
        for name in options.configurations:
            seeds = [0] if name.startswith("ddp_") else options.seeds
            runs = []
            for kernel_set in kernel_sets:
                for seed in seeds:
                    work = Path(tempfile.mkdtemp(dir=tmp))
                    figures = CONFIGURATIONS[name](shards, work, KERNEL_SETS[kernel_set], seed)
                    log(f"{name} {kernel_set} seed {seed}: {figures}")
                    runs.append({"kernel_set": kernel_set, "seed": seed, **figures})
            ranges = {key: [min(r[key] for r in runs), max(r[key] for r in runs)] for key in runs[0] if key not in ("kernel_set", "seed")}
            results[name] = {"test": CONFIGURATIONS[name].__doc__.split(":")[0], "runs": runs, "range": ranges}
    record = {
        "benchmark": "tolerance_noise",
        "hardware": hardware(native_kernel_set=native),
        "versions": versions(),
        "kernel_sets": {name: KERNEL_SETS[name] for name in kernel_sets},
        "configurations": results,
        "seconds": round(time.monotonic() - started, 1),
    }
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
