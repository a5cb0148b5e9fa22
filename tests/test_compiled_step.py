"""The work of the CUDA-graph step, on the CPU: its forward and backward compiled by
torch.compile (`--compile cuda-graph-inductor`), and the optimizer update it captures.

Capture needs a GPU (tests/test_gpu.py), but the work GraphedStep captures does not:
its training_step runs on the CPU as well, compiled or not. Compiled with
fullgraph=True, a graph break anywhere in a preset's step (the gather, the
normalisation, the model, the loss, BatchNorm's in-place statistics) fails here, on a
machine without a GPU, rather than at the start of a GPU run; so does a recompile in the
calls capture makes, which on a GPU would compile inside the capture.
"""

from __future__ import annotations

import shutil
import types

import numpy as np
import pytest
import torch
import torch._dynamo
import torch._dynamo.testing
from helpers import run_cli

from harness.config import TrainConfig, load_preset, preset_names
from harness.cuda_graph import WARM_UP_RUNS, GraphedStep, compile_with_inductor
from harness.models import buffers_restored, build_model
from harness.normalize import Normalizer, make_loss

ROWS = 1024  # four global batches of the largest preset batch (fast: 256)
STEPS = 2
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each GraphedStep compiles the same code object, whose compiled versions dynamo
    counts: a fresh count per test keeps them under its recompile limit."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def graphed_step(preset: str, compiler=None, **overrides) -> GraphedStep:
    """The preset's GraphedStep as the Trainer builds it (loss with its label smoothing,
    inputs in its memory format), on random images of its own; not captured."""
    config = TrainConfig(**{**load_preset(preset), **overrides})
    torch.manual_seed(config.seed)
    model = build_model(config)
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    data = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (ROWS, 28, 28), dtype=torch.uint8, generator=data)
    stats = {"mean": 0.13, "std": 0.31, "pixel_mean": (images.double() / 255).mean(0).tolist()}
    stream = types.SimpleNamespace(global_batch=config.batch_size, resident=True, data=range(ROWS), macro_size=ROWS,
                                   most_steps_per_macro=ROWS // config.batch_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum, nesterov=config.nesterov,
                                weight_decay=config.weight_decay, fused=True)  # fused, as on a GPU
    step = GraphedStep(model, optimizer, Normalizer(config.normalize, stats, CPU, memory_format),
                       make_loss(config.loss, label_smoothing=config.label_smoothing), config.precision, stream, CPU, compiler)
    step.images.copy_(images)
    step.labels.copy_(torch.randint(0, 10, (ROWS,), generator=data))
    step.order.copy_(torch.randperm(ROWS, generator=data))
    return step


def run_steps(step: GraphedStep) -> list[float]:
    """STEPS of forward_backward; the gradients accumulate, so both steps' show in them."""
    return [step.forward_backward().item() for _ in range(STEPS)]


def eager_update(step: GraphedStep) -> None:
    """One eager training step on `step`'s next batch, as the Trainer takes it off the graph."""
    step.model.zero_grad(set_to_none=True)
    step.forward_backward()
    step.optimizer.step()


def lrs_seen_by_updates(step: GraphedStep) -> list:
    """The group's lr as each later optimizer.step() found it (a float, or the device tensor)."""
    seen = []
    step.optimizer.register_step_pre_hook(lambda optimizer, args, kwargs: seen.append(optimizer.param_groups[0]["lr"]))
    return seen


def largest_difference(a: torch.nn.Module, b: torch.nn.Module) -> float:
    """Over every gradient and buffer (BatchNorm's running statistics)."""
    pairs = [(p.grad, q.grad) for p, q in zip(a.parameters(), b.parameters())]
    pairs += [(x.double(), y.double()) for x, y in zip(a.buffers(), b.buffers())]
    return max((x - y).abs().max().item() for x, y in pairs)


CASES = [(preset, {}) for preset in preset_names()] + [("lenet", {"channels_last": True}), ("fast", {"precision": "bf16"})]


@pytest.mark.parametrize(("preset", "overrides"), CASES, ids=[p + "".join(f"-{k}" for k in o) for p, o in CASES])
def test_every_presets_step_compiles_once_as_one_graph_with_the_eager_results(preset, overrides):
    """aot_eager traces the step as torch.compile does for inductor, then runs PyTorch's own
    kernels, so the results are bitwise the uncompiled step's: gradients, running
    statistics, losses, and the step counter that picks each step's batch. The calls that
    GraphedStep.capture makes (warm-up runs, gradients dropped, statistics put back, then
    the captured run) reuse the one compiled graph: a recompile is an error."""
    eager = graphed_step(preset, **overrides)
    eager_losses = run_steps(eager)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    step = graphed_step(preset, lambda f: torch.compile(f, backend=counter, fullgraph=True, dynamic=False), **overrides)
    losses = run_steps(step)
    assert losses == eager_losses and len(set(losses)) == STEPS  # two different batches
    assert step.losses[:STEPS].tolist() == losses  # each in its step's slot, where the training loop's window reads it
    assert largest_difference(step.model, eager.model) == 0.0
    assert step.step.item() == STEPS
    with torch._dynamo.config.patch(error_on_recompile=True), buffers_restored(step.model):
        for _ in range(WARM_UP_RUNS + 1):  # as capture() calls it
            step.step.zero_()
            step.forward_backward()
            step.model.zero_grad(set_to_none=True)
    assert counter.frame_count == 1


def test_the_compiled_update_leaves_the_schedule_nothing_to_warn_about():
    """The compiled update never calls optimizer.step(), through which PyTorch's schedulers
    note that the optimizer has stepped: every run with inductor's graph warned, at the
    schedule's first step, that it came before the optimizer's."""
    import warnings

    step = graphed_step("lenet", lambda f: torch.compile(f, backend="aot_eager", fullgraph=True, dynamic=False))
    schedule = torch.optim.lr_scheduler.ExponentialLR(step.optimizer, gamma=0.9)
    step.create_momentum_buffers()
    step.training_step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        schedule.step()


def test_the_compiled_update_refuses_to_run_without_the_optimizers_momentum_buffers():
    """SGD's function makes missing buffers in a list of its own: the optimizer would never
    hold them, and every step would start its momentum afresh. capture() makes them first;
    without them the update refuses, rather than train without momentum."""
    step = graphed_step("lenet", lambda f: torch.compile(f, backend="aot_eager", fullgraph=True, dynamic=False))
    with pytest.raises(RuntimeError, match=r"create_momentum_buffers\(\) first"):
        step.training_step()


def test_compile_with_inductor_asks_for_no_cuda_graphs_and_deterministic_kernels(monkeypatch):
    """The options go to this one compile, not to inductor's process-wide config: no CUDA
    graphs of inductor's own (GraphedStep captures the whole step), and with deterministic
    algorithms on, no kernel choice by timing."""
    import torch._inductor.config

    calls = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: calls.append(kwargs) or fn)
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        for deterministic in (True, False):
            torch.use_deterministic_algorithms(deterministic)
            compile_with_inductor(lambda: None)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
    assert calls == [{"fullgraph": True, "dynamic": False, "options": {"triton.cudagraphs": False, "deterministic": True}},
                     {"fullgraph": True, "dynamic": False, "options": {"triton.cudagraphs": False}}]
    assert hasattr(torch._inductor.config, "deterministic")  # the option exists in this torch


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("clang++")), reason="inductor's CPU kernels need a C++ compiler")
def test_inductor_kernels_match_the_eager_step_closely():
    """The harness's own compiler, inductor, for the `fast` preset's network (BatchNorm).
    Its fused kernels round differently from PyTorch's, so the results are close, not
    equal: on this repository's 2-core Xeon the largest difference over gradients and
    statistics after two steps was 3.3e-7, the losses equal (1e-5 leaves 30x headroom for
    other CPUs)."""
    eager = graphed_step("fast")
    eager_losses = run_steps(eager)
    step = graphed_step("fast", compile_with_inductor)
    assert step.batch_loss != step.recorded_batch_loss  # compiled (bound methods compare equal; "is not" always holds)
    losses = run_steps(step)
    assert largest_difference(step.model, eager.model) < 1e-5
    assert losses == pytest.approx(eager_losses, rel=1e-5)


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("clang++")), reason="inductor's CPU kernels need a C++ compiler")
@pytest.mark.parametrize("preset", ["lenet", "lenet-plus", "mathspp-mlp"])
def test_the_inductor_step_updates_as_the_fused_step_does_up_to_rounding(preset):
    """With inductor, GraphedStep's update is compiled from SGD's foreach functions rather
    than the fused kernel. Over steps where the schedule changes the lr it stays close to
    the fused update: plain momentum (lenet), Nesterov and weight decay (lenet-plus), no
    momentum (mathspp-mlp). It writes into the momentum buffers made before capture (a
    graph holds their addresses), and a new lr is no recompile (on a GPU that would compile
    inside the capture). On this repository's 2-core Xeon the largest difference over the
    weights and momentum buffers after four steps was 5.2e-8 (lenet-plus); 1e-6 leaves 20x
    for other CPUs' vector code."""
    fused, compiled = graphed_step(preset), graphed_step(preset, compile_with_inductor)
    buffers = compiled.create_momentum_buffers()
    fused.create_momentum_buffers()
    for i, factor in enumerate((1.0, 1.0, 0.9, 0.5)):
        for step in (fused, compiled):
            step.group["lr"] = float(np.float32(step.group["lr"] * factor))
            step.model.zero_grad(set_to_none=True)
            step.sync_lr()
        fused.training_step()
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            compiled.training_step()
    pairs = list(zip(fused.model.parameters(), compiled.model.parameters()))
    if compiled.group["momentum"]:
        assert [compiled.optimizer.state[p]["momentum_buffer"] for p in compiled.model.parameters()] == buffers  # the same tensors
        pairs += [(fused.optimizer.state[p]["momentum_buffer"], compiled.optimizer.state[q]["momentum_buffer"]) for p, q in pairs]
    assert max((a - b).abs().max().item() for a, b in pairs) < 1e-6
    assert not torch.equal(pairs[0][1], next(graphed_step(preset).model.parameters()))  # the weights moved
    assert compiled.step.item() == 4 and compiled.losses[:4].tolist() == pytest.approx(fused.losses[:4].tolist(), rel=1e-6)


def test_a_compiler_that_cannot_build_the_step_is_one_clear_error(quick_shards, tmp_path):
    """torch.compile without a working C++ compiler (inductor's CPU kernels need one, as its
    Triton kernels do on a GPU): one error line naming the option and the cause, no traceback,
    exit status 2, and no run outputs beyond the run directory."""
    result = run_cli("train", "--preset", "lenet", "--shards", quick_shards, "--run-dir", tmp_path / "run", "--max-steps", "1",
                     "--device", "cpu", "--compile", "default",
                     env={"CXX": str(tmp_path / "no-such-compiler"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor-cache")})
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "error: --compile default: torch.compile could not build the step (InvalidCxxCompiler" in result.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize("preset", ["lenet", "fast", "mathspp-mlp"])
def test_the_captured_update_is_the_eager_update(preset):
    """What GraphedStep captures after the backward: SGD's update with the lr read from a
    float32 tensor, and momentum buffers it made as zeros before the first step. Given the
    lr values the Trainer keeps on a GPU (float32 numbers), it is bitwise the eager update
    (PyTorch's first step copies the gradient into new buffers), over steps where the
    schedule changes the lr: momentum and weight decay (lenet), Nesterov and BatchNorm
    (fast), no momentum at all (mathspp-mlp). Each call stands for a replay, which
    overwrites the gradients the previous one left. (This runs the CPU's fused kernel;
    the CUDA kernel's arithmetic is tests/test_gpu.py's to check.)"""
    eager, graphed = graphed_step(preset), graphed_step(preset)
    buffers = graphed.create_momentum_buffers()
    lrs_seen = lrs_seen_by_updates(graphed)
    lrs = [float(np.float32(graphed.group["lr"] * f)) for f in (1.0, 1.0, 0.9, 0.5)]
    for lr in lrs:
        eager.group["lr"] = graphed.group["lr"] = lr
        eager_update(eager)
        graphed.model.zero_grad(set_to_none=True)
        graphed.sync_lr()
        graphed.training_step()
        assert lrs_seen[-1] is graphed.lr and graphed.lr.item() == lr  # the update read the tensor
        assert type(graphed.group["lr"]) is float  # and the group holds a number again
    pairs = list(zip(eager.model.parameters(), graphed.model.parameters()))
    if eager.group["momentum"]:
        pairs += [(eager.optimizer.state[p]["momentum_buffer"], graphed.optimizer.state[q]["momentum_buffer"]) for p, q in pairs]
        # the update wrote into the buffers made before it (a graph holds their addresses)
        assert all(graphed.optimizer.state[q]["momentum_buffer"] is b for q, b in zip(graphed.model.parameters(), buffers))
    assert len(pairs) == len(list(eager.model.parameters())) * (2 if eager.group["momentum"] else 1)
    assert all(torch.equal(a, b) for a, b in pairs)
    assert not torch.equal(pairs[0][0], next(graphed_step(preset).model.parameters()))  # the weights moved


def test_the_update_uses_a_loaded_checkpoints_buffers_and_its_schedules_lr():
    """A resumed run loads its checkpoint before capture. Optimizer.load_state_dict
    replaces the momentum buffers and the parameter group's dict: the update must use the
    loaded buffers (not zeros in their place) and read the lr from the group that the
    schedule now changes."""
    source = graphed_step("lenet")
    eager_update(source)
    step = graphed_step("lenet")
    step.optimizer.load_state_dict(source.optimizer.state_dict())  # as Trainer.restore does
    loaded = [step.optimizer.state[p]["momentum_buffer"] for p in step.model.parameters()]
    made = step.create_momentum_buffers()
    assert len(made) == len(loaded) == len(list(step.model.parameters())) and all(b is a for a, b in zip(loaded, made))
    assert all(a.abs().sum() > 0 for a in loaded)
    step.optimizer.param_groups[0]["lr"] = 0.5  # the schedule's next lr
    step.sync_lr()
    lrs_seen = lrs_seen_by_updates(step)
    step.model.zero_grad(set_to_none=True)
    step.training_step()
    assert lrs_seen == [step.lr] and lrs_seen[0] is step.lr and step.lr.item() == 0.5


class CpuGraph:
    """A stand-in for torch.cuda.CUDAGraph on the CPU: a replay runs the step's work again
    (a real replay relaunches its kernels, which overwrite the gradients)."""

    def __init__(self, step: GraphedStep):
        self.step = step

    def replay(self) -> None:
        self.step.model.zero_grad(set_to_none=True)
        self.step.loss = self.step.training_step()


@pytest.mark.parametrize("preset", ["lenet", "fast"])
def test_capture_leaves_the_state_as_it_was_and_replays_train_as_eager(preset, monkeypatch):
    """GraphedStep.capture with CUDA's streams and graphs stood in for (its warm-up runs,
    the capture and the replay then really run on the CPU; on a GPU the capture only
    records): afterwards the weights, BatchNorm's statistics (fast), the step counter and
    the lr are as they were and the momentum buffers are zeros, so that the replays that
    follow train as the eager step does, bitwise, with a schedule changing the lr. The
    restoring is what a GPU run would otherwise be the first to check."""
    import contextlib

    step, eager = graphed_step(preset), graphed_step(preset)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: types.SimpleNamespace(wait_stream=lambda other: None))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: types.SimpleNamespace(wait_stream=lambda other: None))
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "graph", lambda graph, **kwargs: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: CpuGraph(step))
    before = {name: t.clone() for name, t in step.model.state_dict().items()}
    step.capture()
    after = step.model.state_dict()
    assert all(torch.equal(after[name], t) for name, t in before.items())
    assert all(not b.any() for b in (step.optimizer.state[p]["momentum_buffer"] for p in step.model.parameters()))
    assert step.step.item() == 0 and type(step.group["lr"]) is float and step.lr.item() == np.float32(step.group["lr"])
    for factor in (1.0, 0.5, 0.5):
        lr = float(np.float32(step.group["lr"] * factor))
        eager.group["lr"] = step.group["lr"] = lr
        eager_update(eager)
        step()
    assert all(torch.equal(a, b) for a, b in zip(eager.model.state_dict().values(), step.model.state_dict().values()))
    assert step.step.item() == eager.step.item() == 3
