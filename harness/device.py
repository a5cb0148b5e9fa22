"""Which device a rank trains on, and how: deterministic kernels, numeric precision.

A rank's GPU is its LOCAL_RANK among the GPUs the process can see. Problems that
would otherwise surface as a raw CUDA error, or as a hang in the first collective,
are one clear error at start-up.
"""

from __future__ import annotations

import contextlib
import os

import torch

from harness.errors import AgreedError, HarnessError

# cuBLAS picks reduction orders by workspace; with a fixed workspace per stream its
# results are reproducible (NVIDIA's cuBLAS documentation, "Results reproducibility").
CUBLAS_DETERMINISTIC_WORKSPACE = ":4096:8"

# accelerate exports its mixed_precision setting to the ranks it starts.
ACCELERATE_PRECISION = {"no": "fp32", "bf16": "bf16", "fp16": "fp16", "fp8": "fp8"}


def pick_device(requested: str, local_rank: int) -> torch.device:
    """The rank's device: its LOCAL_RANK-th visible GPU, GPU N for every rank (`cuda:N`,
    ranks sharing a GPU on purpose), or the CPU."""
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        # Every rank of a node meets this alike: each node's first rank prints it.
        raise AgreedError(f"--device {requested} was asked for but CUDA is not available")
    visible = torch.cuda.device_count()
    if requested.startswith("cuda:"):
        index = int(requested.split(":", 1)[1])
        if index >= visible:
            raise AgreedError(f"--device {requested}: this process sees {visible} GPU(s)")
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    if local_rank >= visible:
        devices = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise HarnessError(
            f"LOCAL_RANK {local_rank} needs GPU {local_rank}, but this process sees {visible} GPU(s)"
            + (f" (CUDA_VISIBLE_DEVICES={devices})" if devices is not None else "")
            + f": start at most {visible} rank(s) per node, and let every rank of a node see all its GPUs "
            "(Slurm: --gpus-per-node, not --gpus-per-task; the harness picks GPU LOCAL_RANK itself)"
        )
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def refuse_nccl_off_gpu(requested: str, device: torch.device) -> None:
    """NCCL moves CUDA tensors only; a node's ranks are all on one kind of device. Refused
    for a process alone too, which has no process group: its --backend would be recorded
    in its config, unused."""
    if device.type != "cuda" and requested == "nccl":
        raise AgreedError(f"--backend nccl needs the ranks on GPUs (this one is on {device.type}); use --backend gloo or auto")


def process_group_backend(requested: str, device: torch.device, gpu_shared: bool) -> str:
    """gloo for CPU tensors on every rank (ranks compare devices over it before any NCCL
    work starts); NCCL for CUDA tensors, unless asked for gloo, or ranks share a GPU and
    NCCL cannot: it refuses two ranks on one GPU before version 2.30, and from 2.30 on
    unless NCCL_MULTI_RANK_GPU_ENABLE=1."""
    refuse_nccl_off_gpu(requested, device)
    if device.type != "cuda" or requested == "gloo":
        return "gloo"
    if gpu_shared and not nccl_shares_gpus():
        if requested == "nccl":
            raise HarnessError(
                "--backend nccl with ranks sharing a GPU needs NCCL 2.30 or newer and NCCL_MULTI_RANK_GPU_ENABLE=1 "
                f"(NCCL here: {nccl_version()}); use --backend gloo"
            )
        return "gloo"
    return "cpu:gloo,cuda:nccl"


def nccl_version() -> str:
    try:
        return ".".join(map(str, torch.cuda.nccl.version()))
    except (AttributeError, RuntimeError):
        return "none"


def nccl_shares_gpus() -> bool:
    try:
        return tuple(torch.cuda.nccl.version()) >= (2, 30, 0) and os.environ.get("NCCL_MULTI_RANK_GPU_ENABLE") == "1"
    except (AttributeError, RuntimeError):
        return False


def set_deterministic(on: bool) -> None:
    """Bitwise-reproducible kernels, so that a resumed run ends with the same weights as an
    uninterrupted one on a GPU as it does on the CPU: deterministic cuDNN and cuBLAS
    algorithms, no autotuning, no TF32. Off: PyTorch's defaults (faster kernels allowed)."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_DETERMINISTIC_WORKSPACE)
    torch.use_deterministic_algorithms(on)
    torch.backends.cudnn.deterministic = on
    torch.backends.cudnn.benchmark = not on
    torch.backends.cuda.matmul.allow_tf32 = not on
    torch.backends.cudnn.allow_tf32 = not on


def resolve_precision(requested: str) -> str:
    """fp32 or bf16. `auto` takes accelerate's ACCELERATE_MIXED_PRECISION when it is set."""
    if requested != "auto":
        precision, source, choices = requested, "--precision", "bf16 or fp32"
    else:  # accelerate spells fp32 "no"; an empty value is an unset one
        value = os.environ.get("ACCELERATE_MIXED_PRECISION", "").strip() or "no"
        precision, source, choices = ACCELERATE_PRECISION.get(value, value), "accelerate's mixed_precision (ACCELERATE_MIXED_PRECISION)", "bf16 or no"
    if precision not in ("fp32", "bf16"):
        raise HarnessError(
            f"{source} '{precision}' is not supported: use {choices} (fp16 needs loss scaling, "
            "whose overflow check costs a host sync every step; fp8 is not implemented)"
        )
    return precision


def autocast(device: torch.device, precision: str, cache: bool = True):
    """The forward pass's numeric context: bf16 autocast, or plain fp32."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=cache)
    return contextlib.nullcontext()
