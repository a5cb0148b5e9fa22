"""What `--compile` means for a run: eager, a captured CUDA graph of the whole step
(PyTorch's kernels or inductor's), or torch.compile in one of its modes, chosen by
device, world size, augmentation and SyncBatchNorm."""

from __future__ import annotations

from typing import TYPE_CHECKING

from harness.errors import AgreedError

if TYPE_CHECKING:
    from harness import distributed

GRAPHED_MODES = ("cuda-graph", "cuda-graph-inductor")  # --compile values that capture the whole step (harness/cuda_graph.py)


def compile_mode(requested: str, ctx: distributed.DistContext, augmenting: bool = False, sync_batch_norm: bool = False) -> str:
    """What --compile means here: `auto` and `gpu` pick by device, world size, augmentation
    and SyncBatchNorm.

    `auto` (the default) takes the CUDA-graph step wherever it works: its weights are
    bitwise the eager step's, it needs no compiler, and on an H200 it ran LeNet 6.9x
    faster than eager (README, "On a GPU"). Elsewhere it stays eager: `gpu`'s choice for
    several ranks, torch.compile's reduce-overhead, costs a compile at every start.
    `gpu` pays a compile for speed: on one GPU the graph of inductor's kernels (1.33x the
    plain graph's LeNet throughput on an H200, docs/gpu-h200-2026-11-27), for several
    ranks reduce-overhead. It leaves a step with SyncBatchNorm eager: its forward waits
    for the device and all-gathers, which reduce-overhead would have to capture, and that
    has never run. Asked for by name, reduce-overhead is tried even then."""
    cuda = ctx.device.type == "cuda"
    graph_fits = cuda and ctx.world_size == 1 and not augmenting
    if requested == "auto":
        return "cuda-graph" if graph_fits else ""
    if requested == "gpu":
        return "cuda-graph-inductor" if graph_fits else "reduce-overhead" if cuda and not sync_batch_norm else ""
    if requested in GRAPHED_MODES and not cuda:
        raise AgreedError(f"--compile {requested} captures CUDA work, and this rank is on {ctx.device}; use reduce-overhead, or auto")
    if requested in GRAPHED_MODES and ctx.world_size > 1:
        raise AgreedError(
            f"--compile {requested} needs one rank on a GPU (here: {ctx.world_size} ranks): "
            "DDP all-reduces from hooks that a replayed backward would not call; use reduce-overhead, or gpu"
        )
    if requested in GRAPHED_MODES and augmenting:
        raise AgreedError(
            f"--compile {requested} does not capture augmentation (--augment-rotate/-scale/-shift): "
            "use reduce-overhead, or gpu (which picks it when augmenting)"
        )
    return requested


def compiler_unusable() -> tuple[type[Exception], ...]:
    """What torch.compile raises when this machine cannot build kernels: no working C++
    compiler (inductor's CPU kernels), no Triton, or a GPU too old for Triton. Not a graph
    break (a bug, whose traceback is wanted). Looked up when needed: importing dynamo
    takes most of a second."""
    import torch._dynamo.exc
    import torch._inductor.exc

    names = ("TritonMissing", "GPUTooOldForTriton")  # not BackendCompilerFailed's subclasses
    return (torch._dynamo.exc.BackendCompilerFailed, *(getattr(torch._inductor.exc, n) for n in names if hasattr(torch._inductor.exc, n)))
