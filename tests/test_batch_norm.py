"""LeNet with BatchNorm (--batch-norm, the `fast` preset's network) on the CPU: its running
statistics are part of the trained state, the warm-up before the clock leaves them (and
everything else a checkpoint holds) alone, and several CPU ranks are refused rather than
trained with statistics that depend on the world size."""

from __future__ import annotations

import pytest
import torch
from helpers import final_weights, run, summary, train_command, train_ok

from harness import distributed
from harness.config import TrainConfig, load_preset
from harness.data.idx import read_idx
from harness.data.shard_set import ShardSource
from harness.errors import HarnessError
from harness.models import buffers_restored, lenet, parameter_checksum
from harness.train import Trainer

# lenet's exponential schedule: unlike onecycle's, it does not depend on --max-steps, so
# a run stopped at step 30 and resumed to 60 follows the uninterrupted run's schedule.
RUN = ("--preset", "lenet", "--batch-norm", "--epochs", "1", "--device", "cpu", "--threads", "1")


def test_batch_norm_sits_after_each_conv_and_the_hidden_layer():
    model = lenet(batch_norm=True)
    kinds = [type(m).__name__ for m in model]
    assert kinds == ["Conv2d", "BatchNorm2d", "MaxPool2d", "ReLU", "Conv2d", "BatchNorm2d", "MaxPool2d", "ReLU",
                     "Flatten", "Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert [type(m).__name__ for m in lenet()] == [k for k in kinds if not k.startswith("BatchNorm")]


def test_batch_norm_is_for_the_cnn_only():
    with pytest.raises(HarnessError, match="--batch-norm is for the lenet model"):
        TrainConfig(model="mlp", hidden=[10], batch_norm=True).validate()


def test_buffers_restored_puts_the_running_statistics_back():
    """Training-mode passes move BatchNorm's running statistics; on leaving the block they
    are bitwise what they were, in the same tensors (a captured CUDA graph holds their addresses)."""
    torch.manual_seed(0)
    model = lenet(batch_norm=True)
    model(torch.randn(8, 1, 28, 28))  # statistics that are not the initial zeros and ones
    before = {name: b.clone() for name, b in model.named_buffers()}
    addresses = [b.data_ptr() for b in model.buffers()]
    with buffers_restored(model):
        for _ in range(3):
            model(torch.zeros(8, 1, 28, 28)).sum().backward()
        assert not torch.equal(model[1].running_var, before["1.running_var"])
    assert all(torch.equal(b, before[name]) for name, b in model.named_buffers())
    assert [b.data_ptr() for b in model.buffers()] == addresses


def test_warm_up_leaves_the_training_state_as_it_was(mnist_shards, tmp_path):
    """Trainer.warm_up runs before the clock when the step is compiled or graphed (on a GPU):
    three passes on batches of zeros and a rehearsed update on throwaway tensors. Run here on
    the CPU's eager step, it leaves the weights, running statistics, optimizer, schedule and
    RNG as they were."""
    config = TrainConfig(**{**load_preset("fast"), "device": "cpu", "threads": 1})
    ctx = distributed.init_distributed("cpu")
    trainer = Trainer(config, ShardSource(mnist_shards), tmp_path / "run", ctx, resume="never")
    try:
        before = (parameter_checksum(trainer.model), trainer.scheduler.state_dict(), torch.get_rng_state())
        trainer.warm_up()
        after = (parameter_checksum(trainer.model), trainer.scheduler.state_dict(), torch.get_rng_state())
        assert after[:2] == before[:2] and torch.equal(after[2], before[2])
        assert trainer.optimizer.state_dict()["state"] == {} and all(p.grad is None for p in trainer.model.parameters())
    finally:
        trainer.outputs.close()
        distributed.shutdown(ctx)


@pytest.fixture(scope="module")
def whole_run(mnist_shards, tmp_path_factory):
    """60 steps of lenet with --batch-norm in one go."""
    run_dir = tmp_path_factory.mktemp("batch-norm") / "whole"
    train_ok(mnist_shards, run_dir, *RUN, "--max-steps", "60")
    return run_dir


def test_running_statistics_are_checkpointed_and_resume_exactly(mnist_shards, tmp_path, whole_run):
    """60 steps in one go, and 30 then 30 more from the checkpoint, end bitwise equal,
    running statistics included (the checksum covers the whole state dict)."""
    train_ok(mnist_shards, tmp_path / "split", *RUN, "--max-steps", "30")
    resumed = train_ok(mnist_shards, tmp_path / "split", *RUN, "--max-steps", "60")
    assert "resuming from" in resumed.stdout
    assert summary(tmp_path / "split")["param_checksum"] == summary(whole_run)["param_checksum"]
    weights = final_weights(whole_run)
    assert int(weights["1.num_batches_tracked"]) == 60
    assert weights["10.running_mean"].abs().sum() > 0 and not torch.equal(weights["1.running_var"], torch.ones(16))


def test_the_reported_test_figures_use_the_running_statistics(mnist_dir, whole_run):
    """summary.json's test loss is model.pt's in eval mode (the running statistics), computed
    here from the IDX files; normalising with each batch's own statistics gives another."""
    model = lenet(batch_norm=True)
    model.load_state_dict(final_weights(whole_run))
    images = torch.from_numpy(read_idx(mnist_dir / "t10k-images-idx3-ubyte.gz", 3).copy()).float().div(255).unsqueeze(1)
    labels = torch.from_numpy(read_idx(mnist_dir / "t10k-labels-idx1-ubyte.gz", 1).astype("int64"))

    def test_loss() -> float:
        with torch.no_grad():
            return sum(torch.nn.functional.cross_entropy(model(images[i : i + 2000]), labels[i : i + 2000], reduction="sum").item()
                       for i in range(0, 10000, 2000)) / 10000

    reported = summary(whole_run)["test_loss"]
    model.eval()
    # float32 sums over other batches than the harness's: ~1e-6 relative. Each batch's own
    # statistics instead of the running ones change the loss by well over 1e-3.
    assert test_loss() == pytest.approx(reported, rel=1e-4)
    model.train()  # (which also moves the running statistics: so second)
    assert test_loss() != pytest.approx(reported, rel=1e-3)


def test_sync_batch_norm_keeps_the_state_dict_of_batch_norm():
    """Several GPU ranks train SyncBatchNorm layers; their checkpoint loads into the plain
    model (one rank, predict) and back, key for key."""
    plain = lenet(batch_norm=True)
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(lenet(batch_norm=True))
    assert isinstance(synced[1], torch.nn.SyncBatchNorm)
    assert list(synced.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(synced.state_dict())
    synced.load_state_dict(plain.state_dict())


def test_batch_norm_over_each_half_alone_would_show_in_the_shared_gpu_test(mnist_dir):
    """tests/test_gpu.py's two ranks with --batch-norm must match one rank within 1e-5 after
    one step (lr 0.02, batch 100). BatchNorm over each rank's half alone, which SyncBatchNorm
    prevents, ends that step far outside it: measured here on MNIST's first 100 test images,
    in the weights and in rank 0's running statistics (DDP broadcasts rank 0's buffers)."""
    torch.manual_seed(0)
    model = lenet(batch_norm=True)
    images = torch.from_numpy(read_idx(mnist_dir / "t10k-images-idx3-ubyte.gz", 3)[:100].copy()).float().div(255).unsqueeze(1)
    labels = torch.from_numpy(read_idx(mnist_dir / "t10k-labels-idx1-ubyte.gz", 1)[:100].astype("int64"))

    def one_step(ranks: int) -> dict[str, torch.Tensor]:
        """Each rank's copy on its slice; gradients averaged (DDP); rank 0's model after the step."""
        copies = []
        for rows in torch.arange(100).chunk(ranks):
            copy = lenet(batch_norm=True)
            copy.load_state_dict(model.state_dict())
            torch.nn.functional.cross_entropy(copy(images[rows]), labels[rows]).backward()
            copies.append(copy)
        with torch.no_grad():
            for p, *grads in zip(copies[0].parameters(), *(c.parameters() for c in copies)):
                p -= 0.02 * sum(g.grad for g in grads) / ranks
        return copies[0].state_dict()

    one, two = one_step(1), one_step(2)
    weights = max((one[k] - two[k]).abs().max().item() for k, _ in model.named_parameters())
    statistics = max((one[k] - two[k]).abs().max().item() for k in one if "running" in k)
    print(f"per-rank BatchNorm after one step: weights {weights:.1e}, running statistics {statistics:.1e}")
    assert weights > 10 * 1e-5 and statistics > 10 * 1e-5


def test_several_cpu_ranks_are_refused_at_start_up(mnist_shards, tmp_path):
    result = run(train_command(mnist_shards, tmp_path / "run", *RUN, "--max-steps", "10", nproc=2), timeout=120)
    assert result.returncode != 0
    assert "--batch-norm with 2 ranks on the cpu: PyTorch's SyncBatchNorm runs on GPUs only" in result.stdout + result.stderr
    assert not (tmp_path / "run" / "summary.json").exists()
