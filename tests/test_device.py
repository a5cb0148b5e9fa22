"""Device choice, backends, precision, determinism and CPU-only files: the CPU-side checks
of the GPU path. Checks that need CUDA itself are in test_gpu.py."""

from __future__ import annotations

import io
import json
import re
import types

import numpy as np
import pytest
import torch
from helpers import run_cli, summary

from harness import device as device_module
from harness.atomic import cpu_tensors, torch_bytes
from harness.device import pick_device, process_group_backend, resolve_precision
from harness.errors import HarnessError

CUDA0 = torch.device("cuda", 0)


@pytest.fixture
def two_gpus(monkeypatch):
    """A process that sees two GPUs, as far as the device checks can tell."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: None)


def test_local_rank_beyond_the_visible_gpus_is_one_clear_error(two_gpus, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5")  # e.g. Slurm's --gpus-per-task: one GPU per process
    with pytest.raises(HarnessError) as e:
        pick_device("auto", 2)
    message = str(e.value)
    assert "LOCAL_RANK 2 needs GPU 2, but this process sees 2 GPU(s) (CUDA_VISIBLE_DEVICES=5)" in message
    assert "--gpus-per-node" in message


def test_each_local_rank_gets_its_gpu_and_cuda_n_pins_every_rank(two_gpus):
    assert pick_device("auto", 1) == torch.device("cuda", 1)
    assert pick_device("cuda", 0) == CUDA0
    assert pick_device("cuda:1", 0) == pick_device("cuda:1", 1) == torch.device("cuda", 1)
    with pytest.raises(HarnessError, match="--device cuda:2: this process sees 2 GPU"):
        pick_device("cuda:2", 0)


def test_cuda_without_cuda_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto", 3) == torch.device("cpu")
    with pytest.raises(HarnessError, match="--device cuda was asked for but CUDA is not available"):
        pick_device("cuda", 0)


def test_nccl_is_refused_off_the_gpu_for_a_process_alone_too(monkeypatch):
    """A plain process has no process group: --backend nccl on the CPU ran, and its config
    recorded nccl, unused; under a launcher the same option is refused."""
    from harness.distributed import init_distributed

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(HarnessError, match=r"^--backend nccl needs the ranks on GPUs \(this one is on cpu\)"):
        init_distributed("cpu", backend="nccl")


def test_backend_choice(monkeypatch):
    cpu = torch.device("cpu")
    assert process_group_backend("auto", cpu, False) == "gloo"
    assert process_group_backend("auto", CUDA0, False) == "cpu:gloo,cuda:nccl"
    assert process_group_backend("gloo", CUDA0, False) == "gloo"
    with pytest.raises(HarnessError, match=r"^--backend nccl needs the ranks on GPUs \(this one is on cpu\); use --backend gloo or auto$"):
        process_group_backend("nccl", cpu, False)  # it was gloo, silently, and summary.json said gloo beside a config saying nccl
    # Ranks sharing a GPU: NCCL only where it allows it.
    monkeypatch.setattr(device_module, "nccl_shares_gpus", lambda: False)
    assert process_group_backend("auto", CUDA0, True) == "gloo"
    with pytest.raises(HarnessError, match="NCCL 2.30 or newer and NCCL_MULTI_RANK_GPU_ENABLE=1"):
        process_group_backend("nccl", CUDA0, True)
    monkeypatch.setattr(device_module, "nccl_shares_gpus", lambda: True)
    assert process_group_backend("auto", CUDA0, True) == "cpu:gloo,cuda:nccl"


def test_precision_follows_accelerate_unless_given(monkeypatch):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert resolve_precision("auto") == "fp32"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert resolve_precision("auto") == "bf16"
    assert resolve_precision("fp32") == "fp32"  # the command line wins
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    assert resolve_precision("auto") == "fp32"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "")  # an empty export is an unset one
    assert resolve_precision("auto") == "fp32"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")  # accelerate's own name for fp32 is "no": it refuses "fp32"
    with pytest.raises(HarnessError, match="accelerate's mixed_precision .* 'fp16' is not supported: use bf16 or no "):
        resolve_precision("auto")
    with pytest.raises(HarnessError, match="^--precision 'fp16' is not supported: use bf16 or fp32 "):
        resolve_precision("fp16")


def test_deterministic_mode_sets_and_clears_every_switch(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        device_module.set_deterministic(True)
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        import os

        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        device_module.set_deterministic(False)
        assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic
    finally:
        device_module.set_deterministic(False)
        torch.backends.cudnn.benchmark = False


def test_saved_files_hold_cpu_tensors():
    """Files are written with CPU tensors (here from the meta device, which holds no data
    and stands in for a GPU on a machine without one), so they load anywhere."""
    state = {"model": {"w": torch.ones(2, device="meta")}, "rng": [torch.zeros(3, dtype=torch.uint8)], "step": 4}
    with pytest.raises(NotImplementedError):
        cpu_tensors(state)  # meta tensors have no data to copy: the conversion really copies
    with pytest.raises(NotImplementedError):
        torch_bytes(state)  # and the save path converts before it writes
    state = {"model": {"w": torch.ones(2)}, "rng": [torch.zeros(3, dtype=torch.uint8)], "step": 4}
    loaded = torch.load(io.BytesIO(torch_bytes(state)), weights_only=True)
    assert loaded["step"] == 4 and loaded["model"]["w"].device.type == "cpu"


def test_bf16_autocast_from_accelerates_environment(quick_shards, tmp_path):
    """accelerate exports its mixed_precision to the ranks; bf16 autocast then really runs:
    the weights differ from an fp32 run's, and training still works."""
    args = ("train", "--preset", "lenet", "--shards", quick_shards, "--max-steps", "30", "--threads", "1", "--device", "cpu")
    bf16 = run_cli(*args, "--run-dir", tmp_path / "bf16", env={"ACCELERATE_MIXED_PRECISION": "bf16"})
    fp32 = run_cli(*args, "--run-dir", tmp_path / "fp32", env={"ACCELERATE_MIXED_PRECISION": "no"})
    assert bf16.returncode == 0 and fp32.returncode == 0, bf16.stderr + fp32.stderr
    s_bf16, s_fp32 = summary(tmp_path / "bf16"), summary(tmp_path / "fp32")
    assert s_bf16["config"]["precision"] == "bf16" and s_fp32["config"]["precision"] == "fp32"
    assert s_bf16["param_checksum"] != s_fp32["param_checksum"]
    # Chance is 0.10. bench/tolerance_noise.py measured 30 bf16 steps at 0.866-0.871 for this
    # test's seed 0 under each of the CPU kernel sets (AVX-512, AVX2, none) and 0.79-0.87
    # over seeds 0-2: 0.7 sits below all of them and far above a run that does not learn.
    assert s_bf16["test_accuracy"] > 0.7
    fp16 = run_cli(*args, "--run-dir", tmp_path / "fp16", env={"ACCELERATE_MIXED_PRECISION": "fp16"})
    assert fp16.returncode == 2 and "'fp16' is not supported" in fp16.stderr
    # A run may not change precision on resume: that would be another experiment.
    resumed = run_cli(*args, "--run-dir", tmp_path / "bf16", "--max-steps", "40", "--precision", "fp32")
    assert resumed.returncode == 2 and "different --precision" in resumed.stderr


def test_channels_last_gives_the_same_step(quick_shards, tmp_path):
    """A memory layout, not a different computation: one step agrees within float noise."""
    args = ("train", "--preset", "lenet", "--shards", quick_shards, "--max-steps", "1", "--threads", "1", "--device", "cpu")
    assert run_cli(*args, "--run-dir", tmp_path / "a").returncode == 0
    assert run_cli(*args, "--run-dir", tmp_path / "b", "--channels-last").returncode == 0
    a, b = (torch.load(tmp_path / d / "model.pt", weights_only=True) for d in "ab")
    # bench/tolerance_noise.py: at most 1.5e-8 (seeds 0-2, each CPU kernel set); a wrong
    # gradient would move a weight by about lr x gradient, ~1e-3.
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["config"]["channels_last"] is True
    # The layout was used, not only recorded: model.pt keeps the weights' strides. (The
    # first convolution's one input channel makes both layouts the same; the second has 16.)
    assert b["3.weight"].is_contiguous(memory_format=torch.channels_last) and not b["3.weight"].is_contiguous()
    assert a["3.weight"].is_contiguous()


def test_compile_modes_by_device_and_world_size():
    """`--compile auto` (the default) replays the whole step as one CUDA graph for one rank
    on a GPU and is eager elsewhere; `gpu` replays the graph of inductor's kernels for one
    rank on a GPU, compiles with CUDA graphs for several ranks (but eager with
    SyncBatchNorm) and is eager on the CPU; `cuda-graph` and `cuda-graph-inductor`
    where they cannot work are one clear error."""
    from harness.config import TrainConfig
    from harness.distributed import DistContext
    from harness.compile_choice import compile_mode

    one_gpu, two_gpus, cpu = DistContext(device=CUDA0), DistContext(world_size=2, device=CUDA0), DistContext()
    assert TrainConfig().compile == "auto"
    assert compile_mode("auto", one_gpu) == "cuda-graph"
    assert compile_mode("auto", two_gpus) == compile_mode("auto", cpu) == compile_mode("auto", one_gpu, augmenting=True) == ""
    assert compile_mode("gpu", one_gpu) == "cuda-graph-inductor"
    assert compile_mode("gpu", two_gpus) == "reduce-overhead"
    assert compile_mode("gpu", two_gpus, sync_batch_norm=True) == compile_mode("auto", two_gpus, sync_batch_norm=True) == ""
    assert compile_mode("cuda-graph-inductor", one_gpu) == "cuda-graph-inductor"
    assert compile_mode("gpu", cpu) == "" and compile_mode("", one_gpu) == ""
    # Augmentation is not captured: gpu compiles instead, and cuda-graph says why not.
    assert compile_mode("gpu", one_gpu, augmenting=True) == "reduce-overhead"
    for graphed in ("cuda-graph", "cuda-graph-inductor"):
        with pytest.raises(HarnessError, match=f"--compile {graphed} does not capture augmentation"):
            compile_mode(graphed, one_gpu, augmenting=True)
        with pytest.raises(HarnessError, match=re.escape(f"--compile {graphed} captures CUDA work, and this rank is on cpu")):
            compile_mode(graphed, cpu)  # not DDP's hooks, which one process does not have
        with pytest.raises(HarnessError, match=re.escape(f"--compile {graphed} needs one rank on a GPU (here: 2 ranks): DDP")):
            compile_mode(graphed, two_gpus)


def test_cuda_graph_on_the_cpu_is_one_clear_error(quick_shards, tmp_path):
    result = run_cli("train", "--preset", "lenet", "--shards", quick_shards, "--run-dir", tmp_path / "run", "--max-steps", "1",
                     "--device", "cpu", "--compile", "cuda-graph")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "--compile cuda-graph captures CUDA work, and this rank is on cpu" in result.stderr


def test_on_a_gpu_the_learning_rate_stays_a_float32_value():
    """The CUDA-graph step's update reads the lr from a float32 tensor; so that the eager
    update does the same arithmetic, the Trainer rounds the lr to float32 on a GPU, at
    every change of the schedule (whose next lr is computed from the rounded one). The
    CPU keeps float64 values."""
    from harness.train import Trainer

    for device in ("cpu", "cuda"):
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        trainer = types.SimpleNamespace(ctx=types.SimpleNamespace(device=torch.device(device)), optimizer=optimizer,
                                        scheduler=torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.9))
        trainer.keep_lr_float32 = lambda: Trainer.keep_lr_float32(trainer)
        trainer.keep_lr_float32()
        optimizer.step()  # no gradients: changes nothing, and the schedule does not warn
        expected = 0.1 if device == "cpu" else float(np.float32(0.1))
        for _ in range(3):
            assert optimizer.param_groups[0]["lr"] == expected
            Trainer.step_schedule(trainer)
            expected = expected * 0.9 if device == "cpu" else float(np.float32(expected * 0.9))
