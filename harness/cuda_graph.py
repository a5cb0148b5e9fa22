"""A training step's device work as one CUDA graph (`--compile cuda-graph`).

LeNet's step is some fifty small kernels. Launched one by one from Python, on an H200
they cost more host time than device time, so the GPU idles. Captured once as a CUDA
graph, the step is a single `replay()`: this rank's slice of the global batch, gathered
on the device by a step counter that lives on the device too, then normalisation,
forward, loss and backward into gradients that stay at fixed addresses.

The write of the step's loss into the training loop's window (`losses`) is captured
too, and so is the optimizer's update after the backward (fused SGD, one kernel; with
inductor, its compiled foreach SGD), so a training step is one `replay()` and no Python
optimizer code runs per step. The graph
reads the learning rate from a float32 tensor on the device, which `__call__` refills
whenever the schedule has changed it; the Trainer keeps the lr a float32 value on a GPU
in every mode, so the eager update uses the same number. The captured kernels are those
of the eager step, so in deterministic mode the weights are bitwise those of an eager
run, and a checkpoint moves freely between the two (tests/test_gpu.py; on an H200,
docs/gpu-h200-2026-11-27).

`--compile cuda-graph-inductor` captures the same step with the kernels torch.compile's
inductor generates for it instead of PyTorch's own. The convolutions and matrix products
stay cuDNN's and cuBLAS's calls (as inductor's CPU code shows); the rest (the gather and
normalisation, ReLU and pooling, the loss and its write into `losses`, the step counter,
the backward's pointwise work and bias gradients) fuses into fewer Triton kernels, which
is what a step this small needs: on an H200 LeNet's autotuned step ran 1.33x faster
(README, "On a GPU"). Inductor also compiles the update, from PyTorch's foreach SGD
functions, into kernels that spread over the whole GPU: the fused SGD kernel took 13.4 us
of the 0.2 ms step and a plain update of one flat vector 5.7 us on an H200
(docs/gpu-h200-2026-11-28/check/probe.json). Its results are close to the eager step's,
not bitwise equal.

One rank only: DDP all-reduces gradients from Python hooks that run during backward,
which a replayed backward would not call.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.optim.sgd import sgd  # SGD's update as a function (torch.optim deletes its module name)

from harness.data.stream import MacroBatch, MacroBatchStream
from harness.device import autocast
from harness.models import values_restored

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


def foreach_sgd(params: list[torch.Tensor], grads: list[torch.Tensor], buffers: list, lr: torch.Tensor, **hyper) -> None:
    """SGD's update with PyTorch's foreach functions, as a function of its tensors and
    hyperparameters (compiled, a schedule's lr in the group would be a guard: a recompile
    at each change). Traced, SGD multiplies by the lr tensor rather than reading it back
    to the host. The gradients are scratch that the next replay overwrites (Nesterov
    momentum is added into them in place)."""
    with torch.no_grad():  # a block, not the decorator, which dynamo's full graph refuses
        sgd(params, grads, buffers, lr=lr, foreach=True, **hyper)


class GraphedStep:
    """Static copies of the current macro-batch, a step counter and the lr on the device, and the graph."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.SGD, normalize: Callable, loss_fn: Callable,
                 precision: str, stream: MacroBatchStream, device: torch.device,
                 compiler: Callable[[Callable], Callable] | None = None):
        """`optimizer`: SGD over the model's parameters, one parameter group (fused on a GPU).
        `compiler` (e.g. `compile_with_inductor`) compiles `recorded_batch_loss` (the gather,
        normalisation, forward, loss and its record) and `foreach_sgd` before capture;
        None captures PyTorch's own kernels, and the optimizer's fused update."""
        if len(optimizer.param_groups) != 1:
            raise ValueError("GraphedStep captures an optimizer with one parameter group")
        self.model, self.optimizer, self.normalize, self.loss_fn, self.precision = model, optimizer, normalize, loss_fn, precision
        self.lr = torch.tensor(self.group["lr"], dtype=torch.float32, device=device)  # what the captured update reads
        self.lr_value = self.group["lr"]  # the lr in self.lr
        self.global_batch, self.device = stream.global_batch, device
        rows = len(stream.data) if stream.resident else stream.macro_size
        self.images = torch.zeros(rows, 28, 28, dtype=torch.uint8, device=device)
        self.labels = torch.zeros(rows, dtype=torch.int64, device=device)
        self.order = torch.zeros(stream.macro_size, dtype=torch.int64, device=device)
        self.step = torch.zeros((), dtype=torch.int64, device=device)  # the global batch within the macro-batch
        # Each step's loss, in its step's slot: the training loop's LossWindow reads it, and
        # the graph writing it spares a launch per step to copy it there.
        self.losses = torch.zeros(stream.most_steps_per_macro, device=device)
        self.slots = torch.arange(stream.most_steps_per_macro, device=device)
        self.offsets = torch.arange(self.global_batch, device=device)
        self.source: torch.Tensor | None = None  # the macro-batch images last copied in
        self.graph: torch.cuda.CUDAGraph | None = None
        self.loss: torch.Tensor | None = None  # written by every replay
        self.batch_loss = compiler(self.recorded_batch_loss) if compiler else self.recorded_batch_loss
        self.update = self.foreach_update if compiler else self.fused_update
        self.sgd = compiler(foreach_sgd) if compiler else foreach_sgd

    def load(self, macro: MacroBatch, first_step: int) -> None:
        """Make the next replay train on global batch `first_step` of `macro`. Copies on the
        compute stream, in order with the replays; a resident split is copied once."""
        if macro.images is not self.source:
            self.images[: len(macro.images)].copy_(macro.images)
            self.labels[: len(macro.labels)].copy_(macro.labels)
            self.source = macro.images
        self.order[: len(macro.order)].copy_(macro.order)
        self.step.fill_(first_step)

    def gathered_batch_loss(self) -> torch.Tensor:
        """The loss on the global batch that the device step counter points at."""
        positions = self.step * self.global_batch + self.offsets
        index = self.order.index_select(0, positions)
        images, labels = self.images.index_select(0, index), self.labels.index_select(0, index)
        # No autocast cache: a cached cast made during capture would be stale on replay.
        with autocast(self.device, self.precision, cache=False):
            return self.loss_fn(self.model(self.normalize(images)), labels)

    def recorded_batch_loss(self) -> torch.Tensor:
        """The loss, also written into its step's slot of `losses`; advances the step counter."""
        loss = self.gathered_batch_loss()
        # Two small kernels, also with deterministic algorithms on (index_copy_ then sorts
        # its index: some ten kernels), and no host sync: capturable. Compiled, they fuse
        # into the loss's kernels.
        torch.where(self.slots == self.step, loss.detach().to(self.losses.dtype), self.losses, out=self.losses)
        self.step.add_(1)
        return loss

    @property
    def group(self) -> dict:
        """The optimizer's parameter group, looked up each time: loading a checkpoint
        (Optimizer.load_state_dict) replaces the group's dict."""
        return self.optimizer.param_groups[0]

    def forward_backward(self) -> torch.Tensor:
        """Leaves the gradients in the parameters' .grad, the loss in its step's slot of
        `losses`, and advances the step counter."""
        loss = self.batch_loss()
        loss.backward()
        return loss

    def training_step(self) -> torch.Tensor:
        """The captured work: forward, backward and the optimizer's update, at the lr in self.lr."""
        loss = self.forward_backward()
        self.update()
        return loss

    def fused_update(self) -> None:
        """The optimizer's own step: its fused kernel, which reads the lr from the device."""
        group = self.group
        group["lr"] = self.lr
        try:
            self.optimizer.step()
        finally:
            group["lr"] = self.lr_value

    def foreach_update(self) -> None:
        """The same update with PyTorch's foreach SGD functions (`foreach_sgd`), which
        inductor compiles: it has no lowering of the fused kernel, which it would call as it
        is. The momentum buffers are the optimizer's own (create_momentum_buffers made them,
        or a checkpoint loaded them), updated in place, so its state_dict holds them."""
        group = self.group
        params = group["params"]
        buffers = [self.optimizer.state[p].get("momentum_buffer") for p in params]
        if group["momentum"] and any(b is None for b in buffers):  # the function would make them, in a list of its own, and lose them
            raise RuntimeError("GraphedStep.foreach_update: create_momentum_buffers() first (capture() does)")
        hyper = {name: group[name] for name in ("weight_decay", "momentum", "dampening", "nesterov", "maximize")}
        self.sgd(params, [p.grad for p in params], buffers, self.lr, **hyper)
        # The optimizer has stepped, as PyTorch's lr schedulers note through its step(): without
        # this, the schedule's first step warned that it came before any optimizer step.
        self.optimizer._opt_called = True

    def create_momentum_buffers(self) -> list[torch.Tensor]:
        """SGD's momentum buffers, made now (zeros) where the optimizer has none yet, so that
        the captured update is the one that reads them. From zeros the first update is the
        same arithmetic as PyTorch's first step, which copies the gradient into the buffer
        (momentum x 0 + gradient, exactly); a resumed run's loaded buffers are kept."""
        if self.group["momentum"] == 0:
            return []
        for p in self.group["params"]:
            state = self.optimizer.state[p]
            if state.get("momentum_buffer") is None:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return [self.optimizer.state[p]["momentum_buffer"] for p in self.group["params"]]

    def sync_lr(self) -> None:
        """Copy the group's lr into the tensor the graph reads, if the schedule changed it
        (a fill on the compute stream, in order with the replays: no host sync)."""
        if self.group["lr"] != self.lr_value:
            self.lr_value = self.group["lr"]
            self.lr.fill_(self.lr_value)

    def capture(self) -> None:
        """Warm up on a side stream, capture, and replay once, so that whatever a graph's first
        launch costs (not measured apart) is not in the first epoch's time. Gradients are set
        to None first, so the captured backward allocates them from the graph's pool: every
        replay overwrites them, and nothing may set them to None again; nor may the optimizer
        state be replaced (load a checkpoint before capture). The weights, the momentum
        buffers and BatchNorm's running statistics, which the warm-up runs and the replay
        move, are put back. Every run reads global batch 0 of the (still empty) buffers:
        a macro-batch may hold only one."""
        self.model.zero_grad(set_to_none=True)
        self.sync_lr()  # a resumed run's lr
        state = [*self.model.parameters(), *self.create_momentum_buffers(), *self.model.buffers()]
        with values_restored(state):
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(WARM_UP_RUNS):
                    self.step.zero_()
                    self.training_step()
                    self.model.zero_grad(set_to_none=True)
            torch.cuda.current_stream(self.device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            # thread_local: the stream's prefetch thread may copy the next macro-batch meanwhile.
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                self.loss = self.training_step()
            self.step.zero_()
            self.graph.replay()
        self.step.zero_()
        torch.cuda.synchronize(self.device)

    def __call__(self) -> torch.Tensor:
        """One training step, the optimizer's update included: one replay. Returns its loss
        (also written into its step's slot of `losses`)."""
        self.sync_lr()
        self.graph.replay()
        return self.loss
