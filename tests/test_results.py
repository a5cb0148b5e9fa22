"""What a run shows: its report pictures, predictions on real image files, and TensorBoard
read back through a real server.

One small real run (neupy-mlp with one hidden layer of 128, 2 epochs on MNIST) serves every
test here. Its inputs are normalised with the per-pixel train mean, so `predict` must find
those statistics in the run. Commands run as real processes where their output is the point,
and in this process (`harness.cli.main`) where only their errors are.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
import types
import urllib.parse
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import MNIST_TEST_HISTOGRAM, cli, final_weights, run_cli, train_ok
from PIL import Image
from matplotlib.backends.backend_agg import FigureCanvasAgg

from harness import predict as predict_module
from harness.digit_image import load_digit, mnist_style
from harness.models import mlp
from harness.report import confusion_figure, curves_figure, filters_figure, tile_array
from harness.tensorboard import tile_grid

HIDDEN = [128]


@pytest.fixture(scope="module")
def run_dir(mnist_shards, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("results") / "run"
    result = run_cli("train", "--preset", "neupy-mlp", "--hidden", "128", "--shards", mnist_shards, "--run-dir", run_dir, "--epochs", "2", "--device", "cpu")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return run_dir


@pytest.fixture(scope="module")
def test_digits(mnist_dir) -> tuple[np.ndarray, np.ndarray]:
    """The first 200 test images and labels, read here from the IDX files."""
    images = gzip.decompress((mnist_dir / "t10k-images-idx3-ubyte.gz").read_bytes())
    labels = gzip.decompress((mnist_dir / "t10k-labels-idx1-ubyte.gz").read_bytes())
    return np.frombuffer(images, np.uint8, offset=16).reshape(-1, 28, 28)[:200], np.frombuffer(labels, np.uint8, offset=8)[:200]


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def rgb(png) -> np.ndarray:
    with Image.open(png) as image:
        return np.asarray(image.convert("RGB"))


# --- report ---------------------------------------------------------------------------------------


def test_training_writes_the_report_pictures(run_dir):
    for name in ("training_curves", "filters", "confusion_matrix"):
        pixels = rgb(run_dir / "report" / f"{name}.png")
        assert pixels.shape[0] > 300 and pixels.shape[1] > 500, (name, pixels.shape)
        assert pixels.std() > 20, f"{name}.png is nearly blank"


def test_report_command_redraws_the_same_pictures_from_the_files(run_dir):
    """`harness report` reads metrics.jsonl, model.pt, test_report.json and summary.json and draws
    what the end of training drew from memory, pixel for pixel."""
    before = {p.name: rgb(p) for p in (run_dir / "report").glob("*.png")}
    for p in (run_dir / "report").glob("*.png"):
        p.unlink()
    result = run_cli("report", run_dir)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("wrote ") == 3
    assert {p.name: rgb(p) for p in (run_dir / "report").glob("*.png")}.keys() == before.keys()
    for name, pixels in before.items():
        assert np.array_equal(rgb(run_dir / "report" / name), pixels), name


def test_report_figures_hold_the_runs_numbers(run_dir):
    rows = metrics(run_dir)
    curves = curves_figure(rows, json.loads((run_dir / "summary.json").read_text())["before_training"])
    losses, accuracy = curves.axes
    assert [list(line.get_ydata()) for line in losses.lines] == [[m["train_loss"] for m in rows], [m["val_loss"] for m in rows]]
    assert list(accuracy.lines[0].get_ydata()) == [100 * m["val_accuracy"] for m in rows]
    assert "before training" in accuracy.get_title()
    # The loss axis says what a value is: MSE averages over the 10 outputs, not per image.
    assert losses.get_ylabel() == "loss"  # not given the run's --loss
    assert curves_figure(rows, None, "mse").axes[0].get_ylabel() == "squared error (mean per output)"
    assert curves_figure(rows, None, "cross_entropy").axes[0].get_ylabel() == "cross-entropy loss (mean per image)"
    confusion = np.array(json.loads((run_dir / "test_report.json").read_text())["confusion"])
    axes = confusion_figure(confusion).axes[0]
    # every non-zero cell is labelled with its count at its place: x = predicted class, y = true class
    labels = {(round(t.get_position()[1]), round(t.get_position()[0])): int(t.get_text()) for t in axes.texts}
    assert labels == {(int(true), int(predicted)): int(confusion[true, predicted]) for true, predicted in zip(*np.nonzero(confusion))}
    assert not np.array_equal(confusion, confusion.T)  # (so that a transposed figure shows)
    shown = axes.images[0].get_array()  # the image is the matrix, row = true class, its zeros masked (no colour on a log scale)
    assert np.array_equal(np.ma.filled(shown, 0), confusion) and np.array_equal(np.ma.getmaskarray(shown), confusion == 0)
    assert confusion.sum(axis=1).tolist() == MNIST_TEST_HISTOGRAM
    layer1 = final_weights(run_dir)["1.weight"].reshape(-1, 1, 28, 28)
    shown = filters_figure([("layer1", layer1)]).axes[0].images[0].get_array()
    assert shown.shape == (11 * 29 - 1, 12 * 29 - 1)  # 128 tiles of 28x28 in 11 rows of 12, 1-pixel gaps
    assert np.allclose(np.ma.filled(shown, np.nan), tile_array(layer1), equal_nan=True)
    assert np.nanmax(np.abs(tile_array(layer1)[:28, :28])) == pytest.approx(1.0)  # each tile scaled to its own max |w|


@pytest.mark.parametrize("shape,upscale", [((16, 1, 3, 3), 8), ((32, 16, 4, 4), 6), ((500, 1, 28, 28), 1)])
def test_tensorboards_weight_grid_puts_each_filter_in_its_tile(shape, upscale):
    """tile_grid (the weight images logged every epoch) against the obvious loop over
    tiles: each filter min-max scaled on its own, upscaled, at its row and column, with one
    pixel of 0 around every tile; a grid of one input channel is near-square, its empty
    tiles 0 (500 units: 23 columns, 22 rows)."""
    n, c, h, w = shape
    weights = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    tiles = weights.reshape(n * c, h, w)
    tiles = (tiles - tiles.amin(dim=(1, 2), keepdim=True)) / (tiles.amax(dim=(1, 2), keepdim=True) - tiles.amin(dim=(1, 2), keepdim=True))
    tiles = tiles.repeat_interleave(upscale, 1).repeat_interleave(upscale, 2)
    h, w = h * upscale, w * upscale
    columns = c if c > 1 else int(np.ceil(np.sqrt(n)))
    rows = -(-n * c // columns)
    expected = np.zeros((1, rows * (h + 1) + 1, columns * (w + 1) + 1), dtype=np.float32)
    for i, tile in enumerate(tiles):
        r, col = divmod(i, columns)
        expected[0, 1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + col * (w + 1) : 1 + col * (w + 1) + w] = tile.numpy()
    np.testing.assert_allclose(tile_grid(weights.numpy(), upscale), expected, rtol=0, atol=1e-6)


def test_a_stalled_event_file_write_does_not_hold_up_the_scalars(tmp_path, monkeypatch):
    """Rank 0 logs the train scalars at sync points, where the other ranks wait in an
    all-reduce that --timeout bounds. SummaryWriter's own thread writes the events; with
    its default queue of 10, add_scalar would wait for a stalled disk from about the 4th
    sync point on (this test fails with it). A
    --timeout's worth of the `lenet` preset's sync points on an H200 (42,000 events; see
    EVENTS_QUEUED) now queue without a wait, and reach the file once the disk is back."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.summary.writer.record_writer import RecordWriter

    from harness.tensorboard import TensorBoardLog

    events = TensorBoardLog(tmp_path, purge_step=0)
    events.open()  # as Trainer.fit does, before the first sync point
    disk_back, write = threading.Event(), RecordWriter.write
    monkeypatch.setattr(RecordWriter, "write", lambda self, data: (disk_back.wait(120), write(self, data))[1])
    sync_points, logged = 14_000, threading.Event()

    def log_scalars():
        for step in range(sync_points):
            events.scalars(step, {"train/loss": 0.1, "train/lr": 0.01, "train/samples_per_s": 1e6})
        logged.set()

    threading.Thread(target=log_scalars, daemon=True).start()
    try:
        assert logged.wait(60), "add_scalar waited for the stalled event file write"
    finally:
        disk_back.set()
    events.close()
    shown = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0}).Reload()
    assert [e.step for e in shown.Scalars("train/loss")] == list(range(sync_points))


def test_the_weight_images_snapshot_is_a_copy():
    """Rank 0 snapshots the weights for the epoch's images and goes on training while the
    writer tiles them: the snapshot must not follow the weights (on the CPU, numpy would
    share their memory)."""
    from harness.models import lenet
    from harness.tensorboard import weight_snapshot

    model = lenet()
    snapshot = weight_snapshot(model)
    before = [layer.copy() for _, layer in snapshot]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1)
    assert [name for name, _ in snapshot] == ["conv1", "conv2"]
    for (_, layer), old in zip(snapshot, before):
        np.testing.assert_array_equal(layer, old)


def test_report_of_an_unfinished_run_draws_the_curves(run_dir, tmp_path, capsys):
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "metrics.jsonl").write_bytes((run_dir / "metrics.jsonl").read_bytes())
    status, out, _ = cli(capsys, "report", unfinished)
    assert status == 0 and sorted(p.name for p in (unfinished / "report").iterdir()) == ["training_curves.png"]
    assert "skipped filters: no model.pt" in out and "skipped confusion_matrix: no test_report.json" in out


def test_report_replaces_links_in_someone_elses_run_and_writes_through_none(run_dir, tmp_path, capsys):
    """A run directory from someone else may hold symbolic links where the pictures or their
    temporary files go: each picture replaces the link, and what it pointed to is left as
    it was (the temporary file had a fixed name, training_curves.png.tmp, and PIL wrote
    the picture through a link there)."""
    theirs, victim = tmp_path / "theirs", tmp_path / "victim.txt"
    (theirs / "report").mkdir(parents=True)
    (theirs / "metrics.jsonl").write_bytes((run_dir / "metrics.jsonl").read_bytes())
    victim.write_text("precious")
    for name in ("training_curves.png", "training_curves.png.tmp", f".training_curves.png.tmp-{os.getpid()}"):
        (theirs / "report" / name).symlink_to(victim)
    status, _, err = cli(capsys, "report", theirs)
    assert status == 0, err
    assert victim.read_text() == "precious"
    picture = theirs / "report" / "training_curves.png"
    assert not picture.is_symlink() and Image.open(picture).format == "PNG"
    assert not (theirs / "report" / f".training_curves.png.tmp-{os.getpid()}").exists()


def test_report_refuses_a_report_directory_that_is_a_link(run_dir, tmp_path, capsys):
    """A `report` link in someone else's run directory: the pictures would replace files
    of the same names in the directory it names. One error, and that directory as it was."""
    theirs, victim = tmp_path / "theirs", tmp_path / "victim"
    theirs.mkdir()
    victim.mkdir()
    (victim / "training_curves.png").write_text("precious")
    (theirs / "metrics.jsonl").write_bytes((run_dir / "metrics.jsonl").read_bytes())
    (theirs / "report").symlink_to(victim, target_is_directory=True)
    status, _, err = cli(capsys, "report", theirs)
    assert status == 2 and f"error: {theirs}/report: is a symbolic link" in err, err
    assert [p.name for p in victim.iterdir()] == ["training_curves.png"] and (victim / "training_curves.png").read_text() == "precious"


def test_report_of_a_run_with_no_epoch_yet_says_so(tmp_path, capsys):
    """An empty metrics.jsonl (a run in its first epoch) drew no curves and said nothing."""
    (tmp_path / "metrics.jsonl").write_text("")
    status, out, _ = cli(capsys, "report", tmp_path)
    assert status == 0 and "skipped training_curves: metrics.jsonl holds no epoch yet" in out, out
    assert not (tmp_path / "report" / "training_curves.png").exists()
    # One left by an earlier report (of a finished run since extended, whose partial epoch's
    # line an extension drops): kept, and said to be older than the pictures beside it
    (tmp_path / "report" / "training_curves.png").write_bytes(b"earlier")
    status, out, _ = cli(capsys, "report", tmp_path)
    assert "skipped training_curves: metrics.jsonl holds no epoch yet; report/training_curves.png is from an earlier report\n" in out, out
    assert (tmp_path / "report" / "training_curves.png").read_bytes() == b"earlier"


def test_report_of_a_finished_run_missing_files_or_of_one_stopped_early(run_dir, tmp_path, capsys):
    """A finished run's missing model.pt was said to be a run that had not finished, and a
    missing metrics.jsonl refused the whole report; a run stopped in its first epoch (a
    checkpoint and stopped.json) was called not a run directory."""
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(run_dir, damaged)
    shutil.rmtree(damaged / "report", ignore_errors=True)
    (damaged / "metrics.jsonl").unlink()
    (damaged / "model.pt").unlink()
    status, out, _ = cli(capsys, "report", damaged)
    assert status == 0 and sorted(p.name for p in (damaged / "report").iterdir()) == ["confusion_matrix.png"], out
    assert "skipped training_curves: no metrics.jsonl\n" in out and "skipped filters: no model.pt\n" in out, out
    running = tmp_path / "running"  # in its first epoch: the lock and TensorBoard's event file
    running.mkdir()
    (running / "lock").write_text("")
    (running / "events.out.tfevents.1.host.2.0").write_bytes(b"")
    status, out, _ = cli(capsys, "report", running)
    assert status == 0 and "skipped training_curves: no metrics.jsonl (the run has not finished)" in out, out
    stopped = tmp_path / "stopped"
    (stopped / "checkpoints").mkdir(parents=True)
    (stopped / "stopped.json").write_text('{"signal": "SIGINT", "step": 300}')
    status, out, _ = cli(capsys, "report", stopped)
    assert status == 0 and out.splitlines() == [
        "skipped training_curves: no metrics.jsonl (the run has not finished)", "skipped filters: no model.pt (the run has not finished)",
        "skipped confusion_matrix: no test_report.json (the run has not finished)"], out


def test_the_curves_of_one_epoch_are_ticked_at_that_epoch():
    """One epoch's curves were ticked at 0.72, 0.80, ... 1.28, and the accuracy axis ran to 103%."""
    figure = curves_figure([{"epoch": 1, "train_loss": 0.3, "val_loss": 0.1, "val_accuracy": 0.9849}])
    FigureCanvasAgg(figure).draw()
    for axes in figure.axes:
        assert [t for t in axes.get_xticks() if axes.get_xlim()[0] <= t <= axes.get_xlim()[1]] == [1]
    assert figure.axes[1].get_ylim()[1] <= 100.5


def test_report_errors_are_clear(tmp_path, capsys):
    assert cli(capsys, "report", tmp_path / "missing")[::2] == (2, f"error: {tmp_path / 'missing'}: run directory not found\n")
    (tmp_path / "model.pt").write_bytes(b"")  # a file of the run, given for the run
    message = f"error: {tmp_path / 'model.pt'}: not a directory; give the run directory (the one holding metrics.jsonl)\n"
    assert cli(capsys, "report", tmp_path / "model.pt")[::2] == (2, message)
    (tmp_path / "model.pt").unlink()
    status, _, err = cli(capsys, "report", tmp_path)
    assert status == 2 and err == (f"error: {tmp_path}: not a run directory (it holds none of lock, events.out.tfevents.*, metrics.jsonl, "
                                   "summary.json, model.pt, test_report.json, stopped.json, checkpoints/)\n")


# --- predict --------------------------------------------------------------------------------------


def independent_classes(run_dir: Path, mnist_shards: Path, images: np.ndarray) -> np.ndarray:
    """What model.pt predicts for `images`, computed here: the manifest's per-pixel mean and a fresh MLP."""
    pixel_mean = torch.tensor(json.loads((mnist_shards / "manifest.json").read_text())["train_stats"]["pixel_mean"]).reshape(28, 28)
    model = mlp(HIDDEN)
    model.load_state_dict(final_weights(run_dir))
    with torch.no_grad():
        return model((torch.from_numpy(images.copy()).float() / 255 - pixel_mean).unsqueeze(1)).argmax(1).numpy()


def test_predict_shard_images(run_dir, mnist_shards, test_digits, capsys):
    indices = list(range(12))
    status, out, err = cli(capsys, "predict", run_dir, "--shards", mnist_shards, "--index", *indices, "--json")
    assert status == 0, err
    rows = json.loads(out)["predictions"]
    images, labels = test_digits
    assert [r["label"] for r in rows] == labels[:12].tolist()
    assert [r["predicted"] for r in rows] == independent_classes(run_dir, mnist_shards, images[:12]).tolist()
    for row in rows:
        # Printed to 6 decimals (predict.py): ten roundings of at most 5e-7 each.
        assert sum(row["probabilities"]) == pytest.approx(1, abs=1e-4) and len(row["probabilities"]) == 10
        assert row["predicted"] == int(np.argmax(row["probabilities"]))
    status, text, _ = cli(capsys, "predict", run_dir, "--shards", mnist_shards, "--index", "0")
    assert status == 0 and re.match(rf"test\[0\]: {rows[0]['predicted']}  probability [01]\.\d{{4}}  \(label 7\)\n  0: ", text)


def on_paper(digit: np.ndarray, size=(300, 260), corner=(40, 20), scale=8, ink=(20, 30, 120), paper=(235, 225, 200)) -> Image.Image:
    """A 28x28 MNIST digit as a colour picture: dark blue ink on beige paper, 8x larger, off centre."""
    strength = np.asarray(Image.fromarray(digit).resize((28 * scale, 28 * scale), Image.Resampling.BILINEAR), dtype=float)[..., None] / 255
    canvas = np.ones((size[1], size[0], 3)) * paper
    x, y = corner
    canvas[y : y + 28 * scale, x : x + 28 * scale] = canvas[y : y + 28 * scale, x : x + 28 * scale] * (1 - strength) + np.array(ink) * strength
    return Image.fromarray(canvas.astype(np.uint8))


def best_shift_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Correlation of two 28x28 images, allowing a shift of up to one pixel (centring rounds)."""
    return max(
        np.corrcoef(np.roll(a.astype(float), (dy, dx), (0, 1)).ravel(), b.astype(float).ravel())[0, 1]
        for dy in (-1, 0, 1) for dx in (-1, 0, 1)
    )


def test_pictures_become_mnist_digits(test_digits, tmp_path):
    """Colour dark-on-light PNG and JPEG, a small light-on-dark greyscale PNG and a drawing on a
    transparent canvas all come back as the original 28x28 digit (up to resampling and a pixel
    of centring): light on dark, fitted in 20x20, centre of mass at the field's centre."""
    images, _ = test_digits
    for i in range(10):
        digit = images[i]
        on_paper(digit).save(tmp_path / f"{i}.png")
        on_paper(digit).save(tmp_path / f"{i}.jpg", quality=85)
        Image.fromarray(digit).resize((60, 60), Image.Resampling.BILINEAR).save(tmp_path / f"{i}-small.png")
        canvas = np.zeros((200, 200, 4), np.uint8)  # black strokes, alpha = ink
        canvas[30:170, 30:170, 3] = np.asarray(Image.fromarray(digit).resize((140, 140), Image.Resampling.BILINEAR))
        Image.fromarray(canvas, "RGBA").save(tmp_path / f"{i}-canvas.png")
        for name in (f"{i}.png", f"{i}.jpg", f"{i}-small.png", f"{i}-canvas.png"):
            converted = load_digit(tmp_path / name)
            assert converted.shape == (28, 28) and converted.dtype == np.uint8 and converted.max() == 255
            rows, columns = np.nonzero(converted)
            assert np.ptp(rows) + 1 <= 21 and np.ptp(columns) + 1 <= 21  # fitted in 20x20 (+1 for resampling's spread)
            mass = converted.astype(float) / converted.sum()
            centre = ((np.indices((28, 28)) * mass).sum(axis=(1, 2)))
            assert np.abs(centre - 14).max() <= 0.5, (name, centre)
            # 0.88-0.99 measured over 30 digits (the 60x60 copies are resampled twice); an inverted,
            # uncentred or unscaled digit scores far lower.
            assert best_shift_correlation(converted, digit) > 0.85, name
    # Polarity: the same picture dark-on-light and light-on-dark gives the same digit.
    grey = np.asarray(on_paper(images[0]).convert("L"))
    assert np.abs(mnist_style(Image.fromarray(grey)).astype(int) - mnist_style(Image.fromarray(255 - grey)).astype(int)).max() <= 1


def test_predict_image_files(run_dir, mnist_shards, test_digits, tmp_path):
    """PNG and JPEG pictures of test digits get the class the model gives the original digit
    (a real `harness predict` process)."""
    images, labels = test_digits
    originals = independent_classes(run_dir, mnist_shards, images[:10])
    files = []
    for i in range(10):
        on_paper(images[i]).save(tmp_path / f"digit-{i}.png")
        on_paper(images[i], ink=(10, 10, 10), paper=(250, 250, 250)).convert("L").save(tmp_path / f"digit-{i}.jpg", quality=90)
        files += [tmp_path / f"digit-{i}.png", tmp_path / f"digit-{i}.jpg"]
    result = run_cli("predict", run_dir, *files, "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)["predictions"]
    assert [r["input"] for r in rows] == [str(f) for f in files]
    predicted = np.array([r["predicted"] for r in rows]).reshape(10, 2)
    agree = (predicted == originals[:, None]).sum()
    assert agree >= 19, (predicted.tolist(), originals.tolist(), labels[:10].tolist())


def test_predict_errors_are_clear(run_dir, tmp_path, capsys):
    (tmp_path / "notes.png").write_text("not a picture")
    Image.new("RGB", (40, 40), (255, 255, 255)).save(tmp_path / "blank.png")
    whole = io.BytesIO()
    on_paper(np.full((28, 28), 255, np.uint8)).save(whole, "PNG")
    (tmp_path / "cut.png").write_bytes(whole.getvalue()[:400])
    for name, message in [("notes.png", "not a readable image (Pillow recognises no image format in it)\n"), ("blank.png", "no digit found"), ("cut.png", "not a readable image"), ("missing.png", "file not found")]:
        status, out, err = cli(capsys, "predict", run_dir, tmp_path / name)
        assert status == 2 and not out, (name, out, err)
        assert err.startswith(f"error: {tmp_path / name}: {message}") and err.count("\n") == 1, (name, err)
    status, _, err = cli(capsys, "predict", tmp_path, tmp_path / "blank.png")
    assert status == 2 and "neither model.pt nor a valid checkpoint" in err
    status, _, err = cli(capsys, "predict", run_dir)
    assert status == 2 and "give image files, or --shards DIR --index N (one of the two; neither given)" in err
    status, _, err = cli(capsys, "predict", run_dir, "--shards", tmp_path)
    assert status == 2 and "(one of the two; --shards but no --index given)" in err
    status, _, err = cli(capsys, "predict", run_dir, tmp_path / "blank.png", "--split", "train")
    assert status == 2 and err == "error: --split: chooses the split of --shards DIR --index N, not used for image files\n"


def test_an_index_outside_the_split_costs_the_others_nothing(run_dir, mnist_shards, capsys):
    """As a bad picture among several: `--index 9999 10000 --json` printed no JSON at all,
    and no prediction for 9999, only the error."""
    status, out, err = cli(capsys, "predict", run_dir, "--shards", mnist_shards, "--index", "9999", "10000", "--json")
    printed = json.loads(out)
    assert status == 2 and [r["input"] for r in printed["predictions"]] == ["test[9999]"]
    line = f"{mnist_shards}: --index 10000 is outside the test split's 10000 images"
    assert printed["errors"] == [{"input": "test[10000]", "error": line}] and err == f"error: {line}\n"


def test_a_bad_picture_among_several_costs_the_others_nothing(run_dir, test_digits, tmp_path, capsys):
    """Each picture that can be read gets its prediction, in the order given, and each that
    cannot gets its error line; the exit status says that some failed."""
    images, _ = test_digits
    on_paper(images[0]).save(tmp_path / "first.png")
    (tmp_path / "notes.png").write_text("not a picture")
    on_paper(images[1]).save(tmp_path / "last.png")
    files = [tmp_path / "first.png", tmp_path / "notes.png", tmp_path / "missing.png", tmp_path / "last.png"]
    status, out, err = cli(capsys, "predict", run_dir, *files)
    assert status == 2
    assert [line.split(": ")[0] for line in out.splitlines() if not line.startswith(" ")] == [str(files[0]), str(files[3])], out
    errors = err.splitlines()
    assert len(errors) == 2, err
    assert errors[0].startswith(f"error: {files[1]}: not a readable image") and errors[1] == f"error: {files[2]}: file not found"
    status, out, err = cli(capsys, "predict", run_dir, *files, "--json")
    printed = json.loads(out)
    assert status == 2 and err.count("\n") == 2
    assert [r["input"] for r in printed["predictions"]] == [str(files[0]), str(files[3])]
    assert [e["input"] for e in printed["errors"]] == [str(files[1]), str(files[2])]
    assert printed["errors"][1]["error"] == f"{files[2]}: file not found"
    alone = [json.loads(cli(capsys, "predict", run_dir, f, "--json")[1])["predictions"][0] for f in (files[0], files[3])]
    for together, by_itself in zip(printed["predictions"], alone):  # as each picture predicted by itself
        # Up to float rounding: a batch of one image or of two may take other conv kernels.
        # Outputs differed by at most 3e-8 (64 test images, 1 and 2 threads), then a printed
        # figure's last of 6 decimals can flip: 1e-5 allows that ten times over.
        assert together["predicted"] == by_itself["predicted"]
        assert together["outputs"] == pytest.approx(by_itself["outputs"], abs=1e-5)


def test_predict_checks_the_runs_normalisation_statistics(run_dir, tmp_path, capsys):
    """summary.json's normalization_stats are checked as the manifest's train_stats are: a
    copied run with them damaged is one error line naming the file, not a traceback."""
    (tmp_path / "model.pt").write_bytes((run_dir / "model.pt").read_bytes())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert len(summary["normalization_stats"]["pixel_mean"]) == 784  # neupy-mlp: inputs minus the per-pixel mean
    for stats, message in [({"pixel_mean": [0.1] * 3}, "normalization_stats.pixel_mean: "), ({}, "'pixel_mean' is a required property")]:
        (tmp_path / "summary.json").write_text(json.dumps({**summary, "normalization_stats": stats}))
        status, out, err = cli(capsys, "predict", tmp_path, "--shards", tmp_path, "--index", "0")
        assert status == 2 and not out and err.count("\n") == 1, err
        assert err.startswith(f"error: {tmp_path / 'summary.json'}: the run's normalization_stats") and message in err, err


def test_predict_uses_batch_norms_running_statistics(shards, tmp_path, capsys):
    """predict runs the model in eval mode: a BatchNorm LeNet (one epoch of the small shard set)
    gives image 3 the same outputs alone as among images 0-3, and those of model.pt in eval mode
    on x/255 ("unit"); in training mode BatchNorm would use each call's batch statistics."""
    from harness.data.shard_set import ShardSplit
    from harness.models import lenet

    train_ok(shards, tmp_path / "run", "--preset", "lenet", "--batch-norm", "--epochs", "1", "--device", "cpu", "--threads", "1")

    def outputs(*indices) -> np.ndarray:
        status, out, err = cli(capsys, "predict", tmp_path / "run", "--shards", shards, "--index", *indices, "--json")
        assert status == 0, err
        return np.array([row["outputs"] for row in json.loads(out)["predictions"]])

    together = outputs(0, 1, 2, 3)
    model = lenet(batch_norm=True)
    model.load_state_dict(final_weights(tmp_path / "run"))
    images = torch.from_numpy(ShardSplit(shards, "test").load_all()[0][:4].copy()).float().div(255).unsqueeze(1)
    with torch.no_grad():
        np.testing.assert_allclose(together, model.eval()(images).numpy(), rtol=0, atol=2e-6)  # 6 decimals in the JSON
    np.testing.assert_allclose(outputs(3)[0], together[3], rtol=0, atol=2e-6)


def test_predict_from_a_checkpoint(run_dir, mnist_shards, tmp_path, capsys):
    """A checkpoint file works as well as the run directory, with the same outputs, beside its
    marker (verified) or copied elsewhere alone; a file of something else is a clear error."""
    checkpoint = sorted((run_dir / "checkpoints").glob("step-*.pt"))[-1]
    (tmp_path / "copy.pt").write_bytes(checkpoint.read_bytes())
    by_run = json.loads(cli(capsys, "predict", run_dir, "--shards", mnist_shards, "--index", "3", "--json")[1])
    for path in (checkpoint, tmp_path / "copy.pt", checkpoint.with_suffix(".json")):  # the marker too, as --resume takes it
        by_checkpoint = json.loads(cli(capsys, "predict", path, "--shards", mnist_shards, "--index", "3", "--json")[1])
        assert by_checkpoint["model"] == str(path.with_suffix(".pt"))
        assert by_checkpoint["predictions"] == by_run["predictions"]
    # A run directory whose summary.json is gone: its newest checkpoint, and without one, an error saying what is missing.
    bare = tmp_path / "bare"
    (bare / "checkpoints").mkdir(parents=True)
    (bare / "model.pt").write_bytes((run_dir / "model.pt").read_bytes())
    status, _, err = cli(capsys, "predict", bare, "--shards", mnist_shards, "--index", "3")
    assert status == 2 and err == f"error: {bare}: holds model.pt but no summary.json to say which model it is, and no valid checkpoint\n"
    for name in (checkpoint.name, checkpoint.with_suffix(".json").name):
        (bare / "checkpoints" / name).write_bytes((run_dir / "checkpoints" / name).read_bytes())
    by_bare = json.loads(cli(capsys, "predict", bare, "--shards", mnist_shards, "--index", "3", "--json")[1])
    assert by_bare["model"] == str(bare / "checkpoints" / checkpoint.name) and by_bare["predictions"] == by_run["predictions"]
    (tmp_path / "junk.pt").write_bytes(b"\x80\x04junk")
    with warnings.catch_warnings(record=True) as warned:  # the one error alone: no torch warning about the file's pickle protocol
        warnings.simplefilter("always")
        status, _, err = cli(capsys, "predict", tmp_path / "junk.pt", "--shards", mnist_shards, "--index", "3")
    assert status == 2 and err.startswith(f"error: {tmp_path / 'junk.pt'}: not a saved model or checkpoint")
    assert [str(w.message) for w in warned] == []


def test_output_piped_into_a_reader_that_stops_early_ends_quietly(shards):
    """`harness show ... | head -1`: the reader closes the pipe, and the command ends as a C
    tool does (status 141, 128 + SIGPIPE) with nothing on stderr, not with a BrokenPipeError."""
    process = subprocess.Popen([sys.executable, "-m", "harness", "show", "--shards", str(shards), "--index", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    process.stdout.close()  # before the command (a second or more of imports) writes anything
    _, err = process.communicate(timeout=120)
    assert (process.returncode, err) == (141, "")


# --- TensorBoard through a real server --------------------------------------------------------------


class TensorBoardServer:
    """`tensorboard --logdir` on a loopback port the OS picks, read over its HTTP data API."""

    def __init__(self, logdir: Path):
        command = [Path(sys.executable).parent / "tensorboard", "--logdir", logdir, "--host", "127.0.0.1", "--port", "0", "--load_fast", "false", "--reload_interval", "1"]
        self.process = subprocess.Popen([str(c) for c in command], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [self.lines.put(line) for line in self.process.stdout], daemon=True).start()
        try:
            self.url = self._wait_for_url(60)
        except BaseException:  # the caller gets no server to stop
            self.stop()
            raise

    def _wait_for_url(self, timeout: float) -> str:
        deadline, seen = time.monotonic() + timeout, []
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                assert self.process.poll() is None, f"tensorboard exited: {''.join(seen)}"
                continue
            seen.append(line)
            found = re.search(r"(http://127\.0\.0\.1:\d+)/", line)
            if found:
                return found.group(1)
        raise AssertionError(f"tensorboard did not start within {timeout} s: {''.join(seen)}")

    def get(self, path_and_query: str) -> bytes:
        with urllib.request.urlopen(self.url + path_and_query, timeout=10) as response:
            return response.read()

    def json(self, path: str, **query):
        return json.loads(self.get(f"{path}?{urllib.parse.urlencode(query)}"))

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def wait_until(read, ready, timeout: float = 60):
    """Poll `read()` until `ready(value)`: the server loads event files in the background."""
    deadline = time.monotonic() + timeout
    while True:
        value = read()
        if ready(value) or time.monotonic() > deadline:
            return value
        time.sleep(0.5)


@pytest.mark.timeout(180)
def test_tensorboard_server_serves_the_runs_scalars_and_pictures(run_dir):
    server = TensorBoardServer(run_dir.parent)
    try:
        run = run_dir.name
        expected = {"val/accuracy", "val/loss", "train/loss", "test/accuracy"}
        tags = wait_until(lambda: server.json("/data/plugin/scalars/tags").get(run, {}), lambda t: expected <= t.keys())
        assert expected <= tags.keys(), tags
        rows, summary = metrics(run_dir), json.loads((run_dir / "summary.json").read_text())
        for tag, key in (("val/accuracy", "val_accuracy"), ("val/loss", "val_loss")):
            points = server.json("/data/plugin/scalars/scalars", run=run, tag=tag)  # [wall time, step, value] each
            assert [p[1] for p in points] == [m["step"] for m in rows]
            assert [p[2] for p in points] == pytest.approx([m[key] for m in rows], rel=1e-6)
        test_points = server.json("/data/plugin/scalars/scalars", run=run, tag="test/accuracy")
        assert [p[1] for p in test_points] == [0, summary["steps"]]
        assert [p[2] for p in test_points] == pytest.approx([summary["before_training"]["test_accuracy"], summary["test_accuracy"]])
        # train/loss: every 100 steps and at each epoch's end (468 steps of 128)
        logged = [p[1] for p in server.json("/data/plugin/scalars/scalars", run=run, tag="train/loss")]
        assert logged == [100, 200, 300, 400, 468, 568, 668, 768, 868, 936]
        images = server.json("/data/plugin/images/tags").get(run, {})
        assert {"test/confusion_matrix", "report/training_curves", "report/filters", "weights/layer1"} <= images.keys(), images
        for tag, png in (("test/confusion_matrix", "confusion_matrix.png"), ("report/training_curves", "training_curves.png")):
            entry = server.json("/data/plugin/images/images", run=run, tag=tag, sample=0)[-1]
            assert entry["step"] == summary["steps"]
            served = server.get("/data/plugin/images/individualImage?" + entry["query"])
            # The labelled figure, pixel for pixel the report's PNG (not a bare intensity square).
            assert np.array_equal(rgb(io.BytesIO(served)), rgb(run_dir / "report" / png)), tag
    finally:
        server.stop()
    assert server.process.returncode is not None


def test_an_mse_models_probabilities_are_its_clipped_outputs_normalised():
    """An MSE model's (mathspp-mlp's) probabilities are its outputs clipped at 0 and normalised: none below 0."""
    outputs = torch.tensor([[-0.5, 0.2, 0.6, 0, 0, 0, 0, 0, 0, 0.2]])
    trained = types.SimpleNamespace(model=lambda x: outputs, normalize=lambda x: x.float(),
                                    config=types.SimpleNamespace(loss="mse"))
    _, probabilities = predict_module.predict(trained, np.zeros((1, 28, 28), np.uint8))
    assert (probabilities >= 0).all() and probabilities.sum() == pytest.approx(1)
    assert probabilities[0, 2] == pytest.approx(0.6) and probabilities[0, 0] == 0
