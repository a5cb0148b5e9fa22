"""The CUDA-graph step's work compiled by torch.compile (`--compile cuda-graph-inductor`), on the CPU.

Capture needs a GPU (tests/test_gpu.py), but the work GraphedStep captures does not:
its forward_backward runs on the CPU as well, compiled or not. Compiled with
fullgraph=True, a graph break anywhere in a preset's step (the gather, the
normalisation, the model, the loss, BatchNorm's in-place statistics) fails here, on a
machine without a GPU, rather than at the start of a GPU run.
"""

from __future__ import annotations

import shutil
import types

import pytest
import torch
from helpers import run_cli

from harness.config import TrainConfig, load_preset, preset_names
from harness.cuda_graph import GraphedStep, inductor
from harness.models import build_model
from harness.normalize import Normalizer, make_loss

ROWS = 1024  # four global batches of the largest preset batch (fast: 256)
STEPS = 2


def run_steps(preset: str, compiler=None) -> tuple[torch.nn.Module, list[float], GraphedStep]:
    """STEPS of the preset's step through GraphedStep.forward_backward (no capture) on random
    images; the gradients accumulate over the steps, so both steps' show in them."""
    config = TrainConfig(**load_preset(preset))
    torch.manual_seed(config.seed)
    model = build_model(config)
    data = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (ROWS, 28, 28), dtype=torch.uint8, generator=data)
    stats = {"mean": 0.13, "std": 0.31, "pixel_mean": (images.double() / 255).mean(0).tolist()}
    stream = types.SimpleNamespace(global_batch=config.batch_size, resident=True, data=range(ROWS), macro_size=ROWS)
    step = GraphedStep(model, Normalizer(config.normalize, stats, torch.device("cpu")), make_loss(config.loss),
                       "fp32", stream, torch.device("cpu"), compiler)
    step.images.copy_(images)
    step.labels.copy_(torch.randint(0, 10, (ROWS,), generator=data))
    step.order.copy_(torch.randperm(ROWS, generator=data))
    losses = [step.forward_backward().item() for _ in range(STEPS)]
    return model, losses, step


def largest_difference(a: torch.nn.Module, b: torch.nn.Module) -> float:
    """Over every gradient and buffer (BatchNorm's running statistics)."""
    pairs = [(p.grad, q.grad) for p, q in zip(a.parameters(), b.parameters())]
    pairs += [(x.double(), y.double()) for x, y in zip(a.buffers(), b.buffers())]
    return max((x - y).abs().max().item() for x, y in pairs)


@pytest.mark.parametrize("preset", preset_names())
def test_every_presets_step_compiles_as_one_graph_with_the_eager_results(preset):
    """aot_eager traces the step as torch.compile does for inductor, then runs PyTorch's own
    kernels, so the results are bitwise the uncompiled step's: gradients, running
    statistics, losses, and the step counter that picks each step's batch."""
    eager_model, eager_losses, _ = run_steps(preset)
    model, losses, step = run_steps(preset, lambda f: torch.compile(f, backend="aot_eager", fullgraph=True, dynamic=False))
    assert losses == eager_losses and len(set(losses)) == STEPS  # two different batches
    assert largest_difference(model, eager_model) == 0.0
    assert step.step.item() == STEPS


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("clang++")), reason="inductor's CPU kernels need a C++ compiler")
def test_inductor_kernels_match_the_eager_step_closely():
    """The harness's own compiler: inductor, for the `fast` preset's network (BatchNorm).
    Its fused kernels round differently from PyTorch's, so the results are close, not equal:
    on this repository's 2-core Xeon the largest difference over gradients and statistics
    after two steps was 3.3e-7, the losses equal (1e-5 leaves 30x headroom for other CPUs). With deterministic
    algorithms on, inductor is told to skip the on-device benchmarking that could pick
    different kernels in a resumed process."""
    import torch._inductor.config

    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with torch._inductor.config.patch(deterministic=False):
            eager_model, eager_losses, _ = run_steps("fast")
            model, losses, _ = run_steps("fast", inductor)
            assert torch._inductor.config.deterministic is True
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
    assert largest_difference(model, eager_model) < 1e-5
    assert losses == pytest.approx(eager_losses, rel=1e-5)


def test_a_compiler_that_cannot_build_the_step_is_one_clear_error(mnist_shards, tmp_path):
    """torch.compile without a working C++ compiler (inductor's CPU kernels need one, as its
    Triton kernels do on a GPU): one error line naming the option and the cause, no traceback,
    exit status 2, and no run outputs beyond the run directory."""
    result = run_cli("train", "--preset", "lenet", "--shards", mnist_shards, "--run-dir", tmp_path / "run", "--max-steps", "1",
                     "--device", "cpu", "--compile", "default",
                     env={"CXX": str(tmp_path / "no-such-compiler"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor-cache")})
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "error: --compile default: torch.compile could not build the step (InvalidCxxCompiler" in result.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
