"""Momentum SGD and its learning-rate schedule: building them, and loading a saved state."""

from __future__ import annotations

import torch

from harness.config import TrainConfig


def build_optimizer(model: torch.nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.SGD:
    # On a GPU one fused kernel updates every parameter (the same arithmetic as the
    # default foreach version); the CPU keeps the default, whose results the tests pin.
    fused = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=config.momentum, nesterov=config.nesterov, weight_decay=config.weight_decay, **fused,
    )


def make_schedule(optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int):
    """The learning-rate schedule: stepped after every epoch (exponential) or every optimizer step (onecycle)."""
    if config.lr_schedule == "onecycle":
        steps = config.epochs * steps_per_epoch
        steps = min(steps, config.max_steps) if config.max_steps else steps
        # cycle_momentum=False: the CUDA-graph step captures the momentum as a constant (only the lr is read from the device).
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=config.lr, total_steps=steps, pct_start=0.25, anneal_strategy="linear", cycle_momentum=False,
            div_factor=25.0, final_div_factor=1e4,
        )
    return torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=config.lr_decay)


IMPLEMENTATION_FLAGS = ("foreach", "fused", "differentiable")  # how an optimizer computes its update, not what


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """Load a saved optimizer state, keeping this run's choice of update kernel.
    Optimizer.load_state_dict takes the saved groups whole, flags included: a CPU
    checkpoint (fused unset) would turn a GPU run's fused update into the foreach one,
    which reads a tensor lr back to the host and so cannot be captured in a CUDA graph;
    a GPU checkpoint would run the CPU's fused kernel instead of the CPU's default."""
    own = [{flag: group[flag] for flag in IMPLEMENTATION_FLAGS if flag in group} for group in optimizer.param_groups]
    optimizer.load_state_dict(saved)
    for group, flags in zip(optimizer.param_groups, own):
        group.update(flags)
