#!/usr/bin/env python
"""Where a LeNet training step's GPU time goes: one JSON record on stdout.

bench_gpu.py times whole runs; this times the step alone, in one process, for each
combination of the options that change its kernels (deterministic or not, fp32 or bf16,
channels-last or not) at the lenet preset's batch (100) and the earlier fast preset's
(512); then the fast preset's network (BatchNorm) at its batch, 256, beside the plain
network at that batch.
Each step is the one harness/cuda_graph.py captures (forward and backward as one CUDA
graph, then the fused SGD step), on random resident data: the values do not change the
kernels' time. The first step after each capture is timed apart: in the first
combination it includes what a process pays once (the optimizer's first kernels), a
suspect for the `fast` preset's slower first epoch. It also lists the eager step's ten
most expensive kernels (torch.profiler) for the deterministic and the autotuned kernels,
to show which layer a slow step spends on, and the optimizer's update alone, fused
against foreach and against a plain update of one flat vector. Last, the step as the
harness now captures it (the SGD update inside the graph, its lr read from the device)
against the update launched after the replay, alternated in one process, with the
host's time to launch each (whether the loop is bound by the host or by the GPU).

With --inductor it times only the step as `--compile cuda-graph-inductor` captures it
(inductor's forward and backward kernels, autotuned cuDNN), with inductor's default
kernel choice and with max_autotune (Triton templates for the convolutions and matmuls,
benchmarked at compile time), alternated, at the lenet preset's batch; and how long each
compile took. The question it answers: whether a faster step than 0.216 ms (the H200's
lenet run on 2026-11-28) is there to take. Before that, the harness's own GraphedStep
with inductor, its update compiled (as it is) against the fused SGD kernel (as it was).

Usage: python bench/gpu_step_probe.py > probe.json   (needs a CUDA GPU)
       python bench/gpu_step_probe.py --inductor > inductor.jsonl   (one JSON line a part)
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
import types

import torch
from common import capture_step

from harness.cuda_graph import GraphedStep, compile_with_inductor, foreach_sgd
from harness.device import CUBLAS_DETERMINISTIC_WORKSPACE, autocast, set_deterministic
from harness.models import lenet
from harness.normalize import Normalizer, make_loss

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_DETERMINISTIC_WORKSPACE)  # before cuBLAS starts
DEVICE = torch.device("cuda")
TIMED_STEPS = 500
ROWS = 10_000


def make_step(batch: int, precision: str, channels_last: bool, batch_norm: bool = False, compiler=None):
    """A model, its optimizer and a forward+backward over resident random data; `compiler`
    (e.g. torch.compile with options) compiles the batch's loss, as the harness's does."""
    torch.manual_seed(0)
    model = lenet(batch_norm=batch_norm).to(DEVICE)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, fused=True)
    images = torch.randint(0, 256, (ROWS, 1, 28, 28), dtype=torch.uint8, device=DEVICE)
    labels = torch.randint(0, 10, (ROWS,), device=DEVICE)
    step = torch.zeros((), dtype=torch.int64, device=DEVICE)
    offsets = torch.arange(batch, device=DEVICE)

    def batch_loss(cache: bool) -> torch.Tensor:
        index = (step * batch + offsets) % ROWS
        x = images.index_select(0, index).float().div_(255)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(DEVICE, precision, cache=cache):
            return torch.nn.functional.cross_entropy(model(x), labels.index_select(0, index))

    loss_of = compiler(batch_loss) if compiler else batch_loss

    def forward_backward(cache: bool = True) -> None:
        loss_of(cache).backward()
        step.add_(1)

    return model, optimizer, forward_backward


def graphed_step_ms(batch: int, precision: str, channels_last: bool, batch_norm: bool = False, compiler=None) -> tuple[float, float]:
    """Milliseconds of the first step after capture (the optimizer's first step, its state
    and kernels, included) and of a step in steady state."""
    model, optimizer, forward_backward = make_step(batch, precision, channels_last, batch_norm, compiler)
    graph = capture_step(lambda: forward_backward(cache=False), model)  # no autocast cache in a graph
    torch.cuda.synchronize()
    started = time.perf_counter()
    graph.replay()
    optimizer.step()
    torch.cuda.synchronize()
    first_ms = 1e3 * (time.perf_counter() - started)
    return first_ms, steady_step_ms(lambda: (graph.replay(), optimizer.step()))


def steady_step_ms(run) -> float:
    """Milliseconds per `run()` (a step) over TIMED_STEPS, after 50 untimed ones."""
    for _ in range(50):
        run()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(TIMED_STEPS):
        run()
    torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - started) / TIMED_STEPS


def top_kernels(batch: int) -> list[dict]:
    """The eager step's ten most expensive device kernels, per step."""
    model, optimizer, forward_backward = make_step(batch, "fp32", False)
    for _ in range(20):
        optimizer.zero_grad(set_to_none=True)
        forward_backward()
        optimizer.step()
    torch.cuda.synchronize()
    steps = 50
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            forward_backward()
            optimizer.step()
        torch.cuda.synchronize()
    rows = sorted(prof.key_averages(), key=lambda e: e.device_time_total, reverse=True)[:10]
    return [{"kernel": e.key[:90], "us_per_step": round(e.device_time_total / steps, 2)} for e in rows]


def optimizer_update_us() -> dict:
    """Device microseconds of one momentum-SGD update of LeNet's 838,858 parameters, from
    the profiler's kernel times over 100 updates: the fused kernel the harness's eager and
    plain CUDA-graph steps use (18-26 us per step in the H200's eager profile, among the
    step's largest), the foreach kernels, inductor's kernels compiled from them (the
    update of the harness's inductor step), and two elementwise kernels over one flat
    vector of the same size, which only the memory traffic bounds (the yardstick)."""
    results = {}
    for how in ("fused", "foreach", "compiled", "flat"):
        torch.manual_seed(0)
        model = lenet().to(DEVICE)
        if how == "compiled":  # as GraphedStep's with inductor: SGD's foreach functions, compiled, the lr a tensor
            params = list(model.parameters())
            grads, buffers = [torch.randn_like(p) for p in params], [torch.zeros_like(p) for p in params]
            lr, sgd = torch.tensor(0.01, device=DEVICE), compile_with_inductor(foreach_sgd)

            def update(params=params, grads=grads, buffers=buffers, lr=lr, sgd=sgd) -> None:
                sgd(params, grads, buffers, lr, weight_decay=0.0, momentum=0.9, dampening=0.0, nesterov=False, maximize=False)
        elif how == "flat":
            size = sum(p.numel() for p in model.parameters())
            weights, gradient, momentum = (torch.randn(size, device=DEVICE) for _ in range(3))

            def update() -> None:
                momentum.mul_(0.9).add_(gradient)
                weights.add_(momentum, alpha=-0.01)
        else:
            for p in model.parameters():
                p.grad = torch.randn_like(p)
            update = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, **{how: True}).step
        try:
            for _ in range(10):  # the first creates the momentum buffers
                update()
            torch.cuda.synchronize()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(100):
                    update()
                torch.cuda.synchronize()
            results[how] = round(sum(e.self_device_time_total for e in prof.key_averages()) / 100, 2)
        except Exception as e:  # one way failing must not lose the others
            results[how] = f"failed: {type(e).__name__}: {str(e)[:300]}"
    return results


def update_in_graph_ms(batch: int, batch_norm: bool) -> dict:
    """Milliseconds per step with the fused SGD update launched after the graph's replay,
    as the probe's other figures are (`after`), and captured inside the graph (`inside`),
    3 rounds alternated; and microseconds of host time to launch a step (20 steps
    launched on an idle GPU, so the queue never makes the host wait), lowest of 3."""
    results = {"after": [], "inside": [], "launch_us_after": [], "launch_us_inside": []}
    steps = {}
    # A graph replays on the memory of the tensors it was captured with (the resident data,
    # the step counter) and does not keep them alive: each way's closure must be. Without
    # this, "after"'s data was freed when "inside" was made, and the reused memory gave
    # nll_loss labels out of range (the H200 check of 2026-11-28).
    kept_alive = []
    for how in ("after", "inside"):
        model, optimizer, forward_backward = make_step(batch, "fp32", False, batch_norm)
        kept_alive.append(forward_backward)
        if how == "inside":
            optimizer.param_groups[0]["lr"] = torch.tensor(0.01, dtype=torch.float32, device=DEVICE)

            def work(forward_backward=forward_backward, optimizer=optimizer) -> None:
                forward_backward(cache=False)
                optimizer.step()

            graph = capture_step(work, model)
            steps[how] = graph.replay
        else:
            graph = capture_step(lambda forward_backward=forward_backward: forward_backward(cache=False), model)
            steps[how] = lambda graph=graph, optimizer=optimizer: (graph.replay(), optimizer.step())
    for _ in range(3):
        for how, run in steps.items():
            results[how].append(round(steady_step_ms(run), 4))
            started = time.perf_counter()
            for _ in range(20):
                run()
            results[f"launch_us_{how}"].append(round(1e6 * (time.perf_counter() - started) / 20, 1))
            torch.cuda.synchronize()
    for key in ("launch_us_after", "launch_us_inside"):
        results[key] = min(results[key])
    return results


def inductor_compiler(max_autotune: bool):
    """torch.compile as harness/cuda_graph.py's compile_with_inductor calls it (autotuned
    kernels: deterministic mode off), with or without max_autotune."""
    options = {"triton.cudagraphs": False, "max_autotune": max_autotune}
    return lambda batch_loss: torch.compile(batch_loss, fullgraph=True, dynamic=False, options=options)


def inductor_steps(rounds: int = 3) -> dict:
    """The lenet step (batch 100, fp32) with inductor's kernels, default and max_autotune:
    the compile-and-capture seconds of each, then `rounds` alternated timings of each."""
    set_deterministic(False)
    results = {"compile_and_capture_s": {}, "graphed_step_ms": {"default": [], "max_autotune": []}}
    steps, kept_alive = {}, []  # see update_in_graph_ms: each way's data must outlive its graph's replays
    for name in ("default", "max_autotune"):
        # No torch.compiler.reset() between the two: the first graph replays kernels its
        # compiled code holds. Each make_step's loss is a new closure, and the options are
        # part of inductor's cache key, so the second compiles afresh anyway.
        started = time.perf_counter()
        model, optimizer, forward_backward = make_step(100, "fp32", False, compiler=inductor_compiler(name == "max_autotune"))
        graph = capture_step(lambda forward_backward=forward_backward: forward_backward(cache=False), model)
        torch.cuda.synchronize()
        results["compile_and_capture_s"][name] = round(time.perf_counter() - started, 2)
        kept_alive.append(forward_backward)
        steps[name] = lambda graph=graph, optimizer=optimizer: (graph.replay(), optimizer.step())
    for _ in range(rounds):
        for name, run in steps.items():
            results["graphed_step_ms"][name].append(round(steady_step_ms(run), 4))
    return results


def harness_update_steps(rounds: int = 3) -> dict:
    """The lenet step as GraphedStep captures it with inductor (batch 100, fp32, 60,000
    resident random images), its update compiled from SGD's foreach functions (`compiled`,
    the harness's since 2026-11-29) against the fused SGD kernel after inductor's forward
    and backward (`fused`, the harness's before): ms per replay, `rounds` alternated."""
    set_deterministic(False)
    rows, batch = 60_000, 100
    results = {"graphed_step_ms": {"compiled": [], "fused": []}}
    steps = {}  # each GraphedStep holds the tensors its graph replays on
    for how in ("compiled", "fused"):
        torch.manual_seed(0)
        model = lenet().to(DEVICE)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, fused=True)
        stream = types.SimpleNamespace(global_batch=batch, resident=True, data=range(rows), macro_size=rows, most_steps_per_macro=rows // batch)
        step = GraphedStep(model, optimizer, Normalizer("unit", {}, DEVICE), make_loss("cross_entropy"), "fp32", stream, DEVICE,
                           compile_with_inductor)
        if how == "fused":
            step.update = step.fused_update
        step.images.copy_(torch.randint(0, 256, (rows, 28, 28), dtype=torch.uint8, device=DEVICE))
        step.labels.copy_(torch.randint(0, 10, (rows,), device=DEVICE))
        step.order.copy_(torch.randperm(rows, device=DEVICE))
        step.capture()
        steps[how] = step
    for _ in range(rounds):
        for how, step in steps.items():
            step.step.zero_()  # 550 replays, under the 600 global batches of its macro-batch
            results["graphed_step_ms"][how].append(round(steady_step_ms(step), 4))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inductor", action="store_true", help="time only inductor's step, default against max_autotune")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_step_probe.py: no CUDA GPU here (it times GPU kernels)")
    record = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
              "cudnn": torch.backends.cudnn.version(), "graphed_step_ms": {}, "first_step_ms": {}, "eager_top_kernels": {}}
    if args.inductor:
        # One JSON line a part, as it ends: a call cut off by its time limit keeps the parts before.
        header = {key: record[key] for key in ("gpu", "torch", "cuda", "cudnn")}
        for part, measure in (("harness_update", harness_update_steps), ("inductor", inductor_steps)):
            try:
                result = measure()
            except Exception as e:  # the other part's figures are kept
                result = f"failed: {type(e).__name__}: {str(e)[:300]}"
            print(json.dumps({**header, part: result}), flush=True)
        return
    combinations = [(*c, False) for c in itertools.product((True, False), ("fp32", "bf16"), (False, True), (100, 512))]
    combinations += [(deterministic, "fp32", False, 256, batch_norm) for deterministic in (False, True) for batch_norm in (False, True)]
    for deterministic, precision, channels_last, batch, batch_norm in combinations:
        set_deterministic(deterministic)
        name = (f"{'det' if deterministic else 'nondet'}/{precision}/{'channels_last' if channels_last else 'nchw'}/batch{batch}"
                + ("/batch_norm" if batch_norm else ""))
        try:
            first, steady = graphed_step_ms(batch, precision, channels_last, batch_norm)
            record["graphed_step_ms"][name], record["first_step_ms"][name] = round(steady, 4), round(first, 3)
        except Exception as e:  # one combination failing must not lose the others
            record["graphed_step_ms"][name] = f"failed: {type(e).__name__}: {str(e)[:300]}"
    for deterministic in (True, False):
        set_deterministic(deterministic)
        record["eager_top_kernels"]["det" if deterministic else "nondet"] = top_kernels(100)
    record["optimizer_update_us"] = optimizer_update_us()
    set_deterministic(False)
    record["update_in_graph_ms"] = {}
    for batch, batch_norm in ((100, False), (256, True)):
        name = f"nondet/fp32/nchw/batch{batch}" + ("/batch_norm" if batch_norm else "")
        try:
            record["update_in_graph_ms"][name] = update_in_graph_ms(batch, batch_norm)
        except Exception as e:  # the others' figures are kept
            record["update_in_graph_ms"][name] = f"failed: {type(e).__name__}: {str(e)[:300]}"
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
