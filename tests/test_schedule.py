"""Learning-rate schedules against their definitions."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import run_cli

from harness.config import TrainConfig, load_preset
from harness.optimizer import make_schedule


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


def test_a_onecycle_run_ends_on_its_last_step_lr(quick_shards, tmp_path):
    """The schedule is not stepped past the run's last step, whose lr is lr / 25 / 1e4: one
    step further its linear fall would go below 0, and metrics.jsonl would log a negative lr."""
    result = run_cli("train", "--preset", "fast", "--shards", quick_shards, "--run-dir", tmp_path / "run", "--max-steps", "20",
                     "--device", "cpu")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    lr = load_preset("fast")["lr"]
    assert metrics[-1]["lr"] == pytest.approx(lr / 25 / 1e4)


def logged_lrs(shards, run_dir, *schedule: str) -> tuple[dict[int, float], list[float]]:
    """An MLP run of 3 epochs of 10 steps (lr 0.1, with `schedule`'s options), a sync point
    every 2 steps: TensorBoard's train/lr by step, and metrics.jsonl's lr of each epoch."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = run_cli("train", "--shards", shards, "--run-dir", run_dir, "--model", "mlp", "--hidden", "16", "--batch-size", "20",
                     "--epochs", "3", "--lr", "0.1", *schedule, "--log-every", "2", "--device", "cpu", "--threads", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {e.step: e.value for e in events.Scalars("train/lr")}, [m["lr"] for m in metrics]


def test_a_runs_logged_lr_follows_its_one_cycle_schedule(shards, tmp_path):
    """TensorBoard's train/lr at a sync point is the lr then (the next step's): a one-cycle
    schedule moves it every step. It was the lr at the epoch's start, so the curve showed
    steps where the schedule is a smooth rise and fall."""
    logged, per_epoch = logged_lrs(shards, tmp_path / "run", "--lr-schedule", "onecycle")
    seen = lrs(TrainConfig(lr=0.1, epochs=3, lr_schedule="onecycle"), steps_per_epoch=10, steps=30, per_step=True)
    assert sorted(logged) == list(range(2, 31, 2))
    # After step s the next step's lr; after the last, the schedule is not stepped (see the test above).
    assert [logged[s] for s in sorted(logged)] == pytest.approx([seen[min(s, 29)] for s in sorted(logged)], rel=1e-6)  # TensorBoard keeps float32
    assert per_epoch == pytest.approx([logged[10], logged[20], logged[30]], rel=1e-6)


def test_a_runs_exponential_schedule_decays_once_per_epoch(shards, tmp_path):
    """The Trainer steps an exponential schedule at each epoch's end, after its validation:
    every sync point of an epoch logs that epoch's lr, as metrics.jsonl does."""
    logged, per_epoch = logged_lrs(shards, tmp_path / "run", "--lr-schedule", "exponential", "--lr-decay", "0.9")
    assert per_epoch == pytest.approx([0.1, 0.09, 0.081])
    assert [logged[s] for s in sorted(logged)] == pytest.approx([0.1 * 0.9 ** ((s - 1) // 10) for s in sorted(logged)], rel=1e-6)
