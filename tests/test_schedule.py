"""Learning-rate schedules against their definitions."""

from __future__ import annotations

import pytest
import torch

from harness.config import TrainConfig
from harness.train import make_schedule


def lrs(config: TrainConfig, steps_per_epoch: int, steps: int, per_step: bool) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=config.lr, momentum=0.9)
    schedule = make_schedule(optimizer, config, steps_per_epoch)
    seen = []
    for step in range(steps):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        if per_step or (step + 1) % steps_per_epoch == 0:
            schedule.step()
    return seen


def test_onecycle_rises_to_lr_over_a_quarter_then_falls_to_zero():
    config = TrainConfig(lr=0.4, epochs=4, lr_schedule="onecycle")
    seen = lrs(config, steps_per_epoch=100, steps=400, per_step=True)
    assert seen[0] == pytest.approx(0.4 / 25)
    assert max(seen) == pytest.approx(0.4) and seen.index(max(seen)) == 99  # the peak at 25% of 400 steps
    assert all(a <= b for a, b in zip(seen[:99], seen[1:100])) and all(a >= b for a, b in zip(seen[99:], seen[100:]))
    assert seen[-1] < 0.4 / 100


def test_onecycle_ends_at_max_steps_when_they_come_first():
    config = TrainConfig(lr=0.4, epochs=10, max_steps=200, lr_schedule="onecycle")
    assert lrs(config, steps_per_epoch=100, steps=200, per_step=True)[-1] < 0.4 / 100


def test_exponential_decays_once_per_epoch():
    config = TrainConfig(lr=0.1, lr_decay=0.9, epochs=3)
    seen = lrs(config, steps_per_epoch=10, steps=30, per_step=False)
    assert seen[:10] == [0.1] * 10 and seen[10] == pytest.approx(0.09) and seen[29] == pytest.approx(0.081)
