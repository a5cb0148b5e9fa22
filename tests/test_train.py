"""End to end on real MNIST: one LeNet epoch through the CLI, and the run-output contract."""

from __future__ import annotations

import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import run_cli

from harness.config import load_preset

SCALAR_TAGS = {"train/loss", "train/lr", "train/samples_per_s", "val/loss", "val/accuracy"}
METRIC_KEYS = {"epoch", "train_loss", "val_loss", "val_accuracy", "lr", "epoch_seconds", "train_samples_per_s"}


@pytest.fixture(scope="module")
def lenet_run(mnist_shards, tmp_path_factory):
    """One epoch of the lenet preset on the CPU, as `harness train` runs it."""
    run_dir = tmp_path_factory.mktemp("lenet") / "run"
    result = run_cli("train", "--preset", "lenet", "--shards", mnist_shards, "--run-dir", run_dir, "--epochs", "1", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    return run_dir, result


@pytest.mark.slow
def test_one_lenet_epoch_reaches_98_percent(lenet_run):
    """The acceptance bar. At lr 0.1 / momentum 0.9 the end of epoch 1 is sensitive to float
    summation order (the CPU model, the thread count). With the preset's batch of 100, seeds
    0-3 on 2 threads and seeds 0-1 on 1 thread gave 98.28-98.58% on an AMD EPYC; batch 64
    gave 97.79-98.40% there (seed 0: 97.79%), and 98.07% for seed 0 on another CPU."""
    run_dir, result = lenet_run
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["test_accuracy"] >= 0.98, summary
    assert summary["steps"] == 60000 // load_preset("lenet")["batch_size"]
    assert summary["world_size"] == 1
    assert len(summary["param_checksum"]) == 64
    assert "epoch 1/1  train loss" in result.stdout and "val acc" in result.stdout


def test_metrics_jsonl_contract(lenet_run):
    run_dir, _ = lenet_run
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1
    assert METRIC_KEYS <= rows[0].keys()
    assert 0.98 <= rows[0]["val_accuracy"] <= 1.0  # a fraction, not a percentage
    assert rows[0]["lr"] == pytest.approx(0.1)
    assert rows[0]["train_samples_per_s"] > 0


def test_tensorboard_reader_finds_every_tag(lenet_run):
    run_dir, _ = lenet_run
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    tags = events.Tags()
    assert SCALAR_TAGS <= set(tags["scalars"]), tags["scalars"]
    assert {"weights/conv1", "weights/conv2", "val/confusion_matrix"} <= set(tags["images"]), tags["images"]
    # train/loss is logged every 100 steps and at the end of each macro-batch.
    steps = 60000 // load_preset("lenet")["batch_size"]
    assert len(events.Scalars("train/loss")) == steps // 100 + (steps % 100 != 0)
    assert events.Scalars("val/accuracy")[-1].value >= 0.98
    conv1 = events.Images("weights/conv1")[-1]
    assert conv1.width > 20 and conv1.height > 20  # 3x3 kernels are upscaled to be visible


def test_test_report_is_consistent(lenet_run):
    run_dir, result = lenet_run
    report = json.loads((run_dir / "test_report.json").read_text())
    confusion = report["confusion"]
    assert sum(map(sum, confusion)) == 10000
    assert [sum(row) for row in confusion] == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert len(report["classes"]) == 10
    assert all(0.9 < c["f1"] <= 1.0 for c in report["classes"])
    assert "confusion matrix" in result.stdout


def test_mlp_run_logs_first_layer_tiles(mnist_shards, tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli(
        "train", "--preset", "neupy-mlp", "--shards", mnist_shards, "--run-dir", run_dir,
        "--epochs", "1", "--max-steps", "50", "--device", "cpu",
    )
    assert result.returncode == 0, result.stderr
    events = EventAccumulator(str(run_dir), size_guidance={"images": 0})
    events.Reload()
    image = events.Images("weights/layer1")[-1]
    # 500 tiles of 28x28 in a 23-column grid with 1-pixel gaps
    assert image.width == 23 * 29 + 1


def test_rerunning_a_finished_run_changes_nothing(lenet_run, mnist_shards):
    """The default --resume auto picks up the final checkpoint: no step is redone."""
    run_dir, _ = lenet_run
    before = json.loads((run_dir / "summary.json").read_text())
    metrics = (run_dir / "metrics.jsonl").read_bytes()
    result = run_cli("train", "--preset", "lenet", "--shards", mnist_shards, "--run-dir", run_dir, "--epochs", "1", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    after = json.loads((run_dir / "summary.json").read_text())
    assert after["param_checksum"] == before["param_checksum"] and after["steps"] == before["steps"]
    assert (run_dir / "metrics.jsonl").read_bytes() == metrics


def test_bad_options_are_clear_errors(mnist_shards, tmp_path):
    result = run_cli("train", "--preset", "nope", "--shards", mnist_shards, "--run-dir", tmp_path / "r")
    assert result.returncode == 2 and "unknown preset 'nope'" in result.stderr
    result = run_cli("train", "--preset", "lenet", "--shards", tmp_path / "missing", "--run-dir", tmp_path / "r")
    assert result.returncode == 2 and "shard directory not found" in result.stderr
    result = run_cli("train", "--preset", "lenet", "--shards", mnist_shards, "--run-dir", tmp_path / "r", "--normalize", "zscore")
    assert result.returncode == 2 and "--normalize 'zscore'" in result.stderr
