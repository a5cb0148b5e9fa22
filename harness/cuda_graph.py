"""A training step's device work as one CUDA graph (`--compile cuda-graph`).

LeNet's step is some fifty small kernels. Launched one by one from Python, on an H200
they cost more host time than device time, so the GPU idles. Captured once as a CUDA
graph, the step is a single `replay()`: this rank's slice of the global batch, gathered
on the device by a step counter that lives on the device too, then normalisation,
forward, loss and backward into gradients that stay at fixed addresses.

The optimizer step (one fused kernel) and the schedule run outside the graph, so the
learning rate may change at every step. The captured kernels are those of the eager
step, so in deterministic mode the weights are bitwise those of an eager run, and a
checkpoint moves freely between the two.

`--compile cuda-graph-inductor` captures the same step with the kernels torch.compile's
inductor generates for it instead of PyTorch's own. The convolutions and matrix products
stay cuDNN's and cuBLAS's calls (as inductor's CPU code shows); the rest (the gather and
normalisation, ReLU and pooling, the loss, the backward's pointwise work and bias
gradients) is expected to fuse into fewer Triton kernels, which is what a step this
small needs (README, "On a GPU"). Not yet run on a GPU. Its results are close to the
eager step's, not bitwise equal.

One rank only: DDP all-reduces gradients from Python hooks that run during backward,
which a replayed backward would not call.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from harness.data.stream import MacroBatch, MacroBatchStream
from harness.device import autocast
from harness.models import buffers_restored

WARM_UP_RUNS = 3  # PyTorch's CUDA graph notes: run a few iterations on a side stream before capture


def compile_with_inductor(batch_loss: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """`batch_loss` compiled by inductor for capture: one graph (a graph break is an error,
    not a silent split), static shapes, and no CUDA graphs of its own (GraphedStep captures
    the whole step). With deterministic algorithms on, inductor also skips the on-device
    benchmarking whose choice of kernel could differ between processes, so that a resumed
    run can replay the kernels of an uninterrupted one. Both options apply to this compile
    only."""
    import torch._inductor.config

    options = {"triton.cudagraphs": False}
    if torch.are_deterministic_algorithms_enabled() and hasattr(torch._inductor.config, "deterministic"):
        options["deterministic"] = True  # torch 2.8 and later; 2.13 has it
    return torch.compile(batch_loss, fullgraph=True, dynamic=False, options=options)


class GraphedStep:
    """Static copies of the current macro-batch, a step counter on the device, and the graph."""

    def __init__(self, model: torch.nn.Module, normalize: Callable, loss_fn: Callable, precision: str,
                 stream: MacroBatchStream, device: torch.device,
                 compiler: Callable[[Callable], Callable] | None = None):
        """`compiler` (e.g. `compile_with_inductor`) compiles `eager_batch_loss` (the gather,
        normalisation, forward and loss) before capture; None captures PyTorch's own kernels."""
        self.model, self.normalize, self.loss_fn, self.precision = model, normalize, loss_fn, precision
        self.global_batch, self.device = stream.global_batch, device
        rows = len(stream.data) if stream.resident else stream.macro_size
        self.images = torch.zeros(rows, 28, 28, dtype=torch.uint8, device=device)
        self.labels = torch.zeros(rows, dtype=torch.int64, device=device)
        self.order = torch.zeros(stream.macro_size, dtype=torch.int64, device=device)
        self.step = torch.zeros((), dtype=torch.int64, device=device)  # the global batch within the macro-batch
        self.offsets = torch.arange(self.global_batch, device=device)
        self.source: torch.Tensor | None = None  # the macro-batch images last copied in
        self.graph: torch.cuda.CUDAGraph | None = None
        self.loss: torch.Tensor | None = None  # written by every replay
        self.batch_loss = compiler(self.eager_batch_loss) if compiler else self.eager_batch_loss

    def load(self, macro: MacroBatch, first_step: int) -> None:
        """Make the next replay train on global batch `first_step` of `macro`. Copies on the
        compute stream, in order with the replays; a resident split is copied once."""
        if macro.images is not self.source:
            self.images[: len(macro.images)].copy_(macro.images)
            self.labels[: len(macro.labels)].copy_(macro.labels)
            self.source = macro.images
        self.order[: len(macro.order)].copy_(macro.order)
        self.step.fill_(first_step)

    def eager_batch_loss(self) -> torch.Tensor:
        """The loss on the global batch that the device step counter points at."""
        positions = self.step * self.global_batch + self.offsets
        index = self.order.index_select(0, positions)
        images, labels = self.images.index_select(0, index), self.labels.index_select(0, index)
        # No autocast cache: a cached cast made during capture would be stale on replay.
        with autocast(self.device, self.precision, cache=False):
            return self.loss_fn(self.model(self.normalize(images)), labels)

    def forward_backward(self) -> torch.Tensor:
        """The captured work. Leaves the gradients in the parameters' .grad and advances the step."""
        loss = self.batch_loss()
        loss.backward()
        self.step.add_(1)
        return loss

    def capture(self) -> None:
        """Warm up on a side stream, capture, and replay once, so that whatever a graph's first
        launch costs (not measured apart) is not in the first epoch's time. Gradients are set
        to None first, so the captured backward allocates them from the graph's pool: every
        replay overwrites them, and nothing may set them to None again. The weights are not
        touched, and BatchNorm's running statistics, which the warm-up runs and the replay
        move, are put back. Every run reads global batch 0 of the (still empty) buffers:
        a macro-batch may hold only one."""
        self.model.zero_grad(set_to_none=True)
        with buffers_restored(self.model):
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(WARM_UP_RUNS):
                    self.step.zero_()
                    self.forward_backward()
                    self.model.zero_grad(set_to_none=True)
            torch.cuda.current_stream(self.device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            # thread_local: the stream's prefetch thread may copy the next macro-batch meanwhile.
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                self.loss = self.forward_backward()
            self.step.zero_()
            self.graph.replay()
        self.step.zero_()
        torch.cuda.synchronize(self.device)

    def __call__(self) -> torch.Tensor:
        """One step's gradients and loss: one replay."""
        self.graph.replay()
        return self.loss
