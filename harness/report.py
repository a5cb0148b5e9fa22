"""Pictures of a run: training curves, filters and the confusion matrix, as PNG files.

`harness report RUN_DIR` draws them from the run's files into RUN_DIR/report/, and
every training run draws them at its end from the same data (and logs them to
TensorBoard). matplotlib's object API with the Agg canvas is used directly, not
pyplot: no global figure state and no display needed.
"""

from __future__ import annotations

import io
import math
import reprlib
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image

from harness.atomic import write_bytes_atomic
from harness.errors import HarnessError
from harness.models import first_layer_weights
from harness.run_files import (
    PICTURES_GO,
    REPORT_DIR,
    RUN_FILES,
    SUMMARY_SCHEMA,
    TEST_REPORT_SCHEMA,
    holds_a_run,
    load_torch_file,
    model_state,
    read_metrics,
    read_run_json,
    refuse_link,
)
from harness.validation import existing_directory

PICTURES = ("training_curves", "filters", "confusion_matrix")
FILTERS_WIDTH = 10.0  # inches; at 100 dpi, 1,000 pixels


# --- figures --------------------------------------------------------------------------------------


LOSS_LABELS = {"cross_entropy": "cross-entropy loss (mean per image)", "mse": "squared error (mean per output)"}


def curves_figure(metrics: list[dict], before_training: dict | None = None, loss: str | None = None) -> Figure:
    """Training and validation loss per epoch, and the validation accuracy. The test accuracy of
    the initial weights goes in the title, not on the axis, where ~10% would squash the curve.
    `loss`: the run's --loss, which says what a loss value is (plain "loss" when unknown:
    a run that has not finished has no summary.json to say)."""
    epochs = [m["epoch"] for m in metrics]
    figure = Figure(figsize=(10, 3.8), layout="constrained")
    losses, accuracy = figure.subplots(1, 2)
    losses.plot(epochs, [m["train_loss"] for m in metrics], "o-", label="training")
    losses.plot(epochs, [m["val_loss"] for m in metrics], "s-", label="validation")
    losses.set(xlabel="epoch", ylabel=LOSS_LABELS.get(loss, "loss") if isinstance(loss, str) else "loss", title="loss")
    if all(m["train_loss"] > 0 and m["val_loss"] > 0 for m in metrics):
        losses.set_yscale("log")
    accuracy.plot(epochs, [100 * m["val_accuracy"] for m in metrics], "o-", color="C2", label="validation")
    best = max(metrics, key=lambda m: m["val_accuracy"])
    title = f"validation accuracy: best {100 * best['val_accuracy']:.2f}% (epoch {best['epoch']})"
    if before_training and "test_accuracy" in before_training:
        title += f"\nbefore training: {100 * before_training['test_accuracy']:.2f}% on the test set"
    accuracy.set(xlabel="epoch", ylabel="accuracy (%)", title=title)
    for axes in (losses, accuracy):
        axes.grid(alpha=0.3)
        axes.legend()
        # min_n_ticks=1: with one or two epochs shown, their own ticks (by default the locator
        # gave up on integers there and ticked 0.72, 0.80, ...).
        axes.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        axes.set_xlim(min(epochs) - 0.3, max(epochs) + 0.3)
    accuracy.set_ylim(top=min(accuracy.get_ylim()[1], 100.5))  # not up to 103%, around a single point
    return figure


def tile_layout(n: int, c: int) -> tuple[int, int]:
    """(rows, columns) of tiles for n filters of c input channels: with several input
    channels, one column per filter and one row per input channel; else one row of up to
    32 tiles, or a near-square grid."""
    columns = n if c > 1 or n <= 32 else math.ceil(math.sqrt(n))
    rows = c if c > 1 else math.ceil(n / columns)
    return rows, columns


def grid_shape(shape) -> tuple[int, int]:
    """tile_array's (height, width) in cells for [n, c, h, w] weights: a NaN cell between tiles."""
    n, c, h, w = shape
    rows, columns = tile_layout(n, c)
    return rows * (h + 1) - 1, columns * (w + 1) - 1


def tile_array(weights: torch.Tensor) -> np.ndarray:
    """[n, c, h, w] → one 2-D array with NaN gaps, tiles laid out as `tile_layout` says.
    Each tile is scaled to its own largest |w|, so that it shows its pattern whatever its norm."""
    n, c, h, w = weights.shape
    tiles = weights.float().cpu().numpy()
    tiles = tiles / np.maximum(np.abs(tiles).max(axis=(2, 3), keepdims=True), 1e-12)
    columns = tile_layout(n, c)[1]
    grid = np.full(grid_shape(weights.shape), np.nan)
    for f in range(n):
        for channel in range(c):
            r, col = (channel, f) if c > 1 else divmod(f, columns)
            grid[r * (h + 1) : r * (h + 1) + h, col * (w + 1) : col * (w + 1) + w] = tiles[f, channel]
    return grid


def filters_figure(layers: list[tuple[str, torch.Tensor]]) -> Figure:
    """conv1 and conv2 grids of a CNN, one above the other, or an MLP's first layer as 28x28 tiles."""
    grids = [(name, weights.shape, tile_array(weights)) for name, weights in layers]
    width = FILTERS_WIDTH
    heights = [panel_height(grid.shape) for _, _, grid in grids]
    figure = Figure(figsize=(width, sum(heights) + 0.4), layout="constrained")
    for axes, (name, shape, grid) in zip(np.atleast_1d(figure.subplots(len(grids), 1, height_ratios=heights)), grids):
        n, c, h, w = shape
        what = f"{n} filters (columns) x {c} input channels (rows), {h}x{w}" if c > 1 else f"{n} filters, {h}x{w}"
        axes.imshow(grid, cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
        axes.set_title(f"{name}: {what if h < 28 else f'{n} units, input weights as 28x28 images'}", fontsize=10)
        axes.set_axis_off()
    figure.suptitle("first-layer weights (each tile scaled to its own largest |w|; red +, blue -)", fontsize=10)
    return figure


def panel_height(grid_shape: tuple[int, int]) -> float:
    """Inches of the filters figure that a grid of `grid_shape` cells takes: its aspect at
    FILTERS_WIDTH, plus room for the title."""
    return FILTERS_WIDTH * grid_shape[0] / grid_shape[1] + 0.5


def confusion_figure(confusion: np.ndarray) -> Figure:
    """Counts in every cell; colour on a log scale, so that errors of 1 or 2 images show
    beside diagonals of ~1,000 (a linear scale leaves only the diagonal visible)."""
    confusion = np.asarray(confusion)
    classes = len(confusion)
    figure = Figure(figsize=(6.4, 5.6), layout="constrained")
    axes = figure.subplots()
    shown = np.ma.masked_equal(confusion, 0)
    image = axes.imshow(shown, cmap="viridis", norm=LogNorm(vmin=1, vmax=max(int(confusion.max()), 2)))
    for (true, predicted), count in np.ndenumerate(confusion):
        if count:
            dark = count < np.sqrt(max(int(confusion.max()), 1))  # light text on the dark end of the scale
            axes.text(predicted, true, str(count), ha="center", va="center", fontsize=8, color="white" if dark else "black")
    axes.set(xticks=range(classes), yticks=range(classes), xlabel="predicted class", ylabel="true class")
    accuracy = np.trace(confusion) / max(confusion.sum(), 1)
    axes.set_title(f"confusion matrix: {confusion.sum():,} images, accuracy {100 * accuracy:.2f}%, {confusion.sum() - np.trace(confusion)} errors")
    figure.colorbar(image, ax=axes, label="images (log scale)")
    return figure


def run_figures(metrics: list[dict], state: dict | None, confusion, before_training: dict | None = None,
                loss: str | None = None) -> dict[str, Figure]:
    """The pictures of a run, by name; those whose data is missing are left out."""
    figures = {}
    if metrics:
        figures["training_curves"] = curves_figure(metrics, before_training, loss)
    if state is not None:
        figures["filters"] = filters_figure(first_layer_weights(state))
    if confusion is not None:
        figures["confusion_matrix"] = confusion_figure(confusion)
    return figures


def render(figures: dict[str, Figure]) -> dict[str, np.ndarray]:
    """Each figure drawn once, as uint8 RGB [H, W, 3]: the pixels of its PNG file and of its
    TensorBoard image alike (constrained layout refines itself on every draw, so a second
    draw would differ from the first by a pixel here and there)."""
    pictures = {}
    for name, figure in figures.items():
        canvas = FigureCanvasAgg(figure)
        canvas.draw()
        pictures[name] = np.asarray(canvas.buffer_rgba())[..., :3].copy()
    return pictures


def save_pictures(pictures: dict[str, np.ndarray], run_dir: Path) -> list[Path]:
    out = Path(run_dir) / REPORT_DIR
    refuse_link(out, PICTURES_GO)  # a run directory from someone else: the pictures would replace files where it points
    if out.exists() and not out.is_dir():
        raise HarnessError(f"{out}: is a file where the pictures go; move it")
    out.mkdir(exist_ok=True)
    paths = []
    for name, pixels in pictures.items():
        path = out / f"{name}.png"
        png = io.BytesIO()
        Image.fromarray(pixels).save(png, format="PNG")
        write_bytes_atomic(path, png.getvalue())  # a reader never sees half a picture; a link there is replaced, not written through
        paths.append(path)
    return paths


# --- from a run directory -------------------------------------------------------------------------


# What tile_array and the filters figure can draw in bounded memory: a grid of at most 16.8M
# cells (134 MB of float64; an MLP of up to ~19,900 units), panels at most 50 inches (5,000
# pixels) high, kernels no larger than the images they filter.
MAX_GRID_CELLS = 1 << 24
MAX_PANEL_INCHES = 50
MAX_KERNEL = 28


def load_weights(path: Path) -> dict:
    """A saved model's state dict, checked to be one the filters figure can draw."""
    state = model_state(load_torch_file(path), path)
    sparse = next((name for name, t in state.items() if t.layout != torch.strided), None)
    if sparse is not None:  # not even reshape works on those
        raise HarnessError(f"{path}: {reprlib.repr(sparse)} is a {state[sparse].layout} tensor; a model's weights are dense")
    try:
        layers = first_layer_weights(state)
    except ValueError as e:
        raise HarnessError(f"{path}: {e}") from None
    for name, weights in layers:
        problem = drawing_problem(weights)
        if problem:
            raise HarnessError(f"{path}: {name} weights {tuple(weights.shape)}: {problem}")
    return state


def drawing_problem(weights: torch.Tensor) -> str | None:
    """Why tile_array could not draw `weights` [n, c, h, w] in bounded memory; None if it can.
    A tensor whose storage is smaller than its elements (expand()ed: stride 0) is refused
    too: a 1 kB file could otherwise make tile_array compute on gigabytes."""
    n, c, h, w = weights.shape
    if weights.device.type != "cpu" or not weights.is_floating_point():
        return f"are a {weights.dtype} tensor on {weights.device}; floating-point CPU weights were expected"
    if weights.numel() == 0:
        return "are empty"
    if weights.untyped_storage().nbytes() < weights.numel() * weights.element_size():
        return f"have {weights.numel()} elements in a storage of {weights.untyped_storage().nbytes()} bytes (an expanded tensor)"
    if max(h, w) > MAX_KERNEL:
        return f"are {h}x{w} kernels; filters of 28x28 images are at most {MAX_KERNEL}x{MAX_KERNEL}"
    if not torch.isfinite(weights).all():  # a run never saves such weights (it refuses a non-finite state)
        return "hold NaN or infinite values"
    height, width = grid_shape(weights.shape)
    if height * width > MAX_GRID_CELLS:
        return f"would be drawn as {height}x{width} cells; at most {MAX_GRID_CELLS} are drawn"
    if panel_height((height, width)) > MAX_PANEL_INCHES:
        return f"would be drawn {panel_height((height, width)):.0f} inches high ({c} input channels for {n} filters); at most {MAX_PANEL_INCHES}"
    return None


def write_report(run_dir: Path) -> tuple[list[Path], list[str]]:
    """Draw a finished (or running) run's pictures into RUN_DIR/report/: (written, skipped reasons)."""
    run_dir = existing_directory(Path(run_dir), "run directory", "give the run directory (the one holding metrics.jsonl)")
    if not holds_a_run(run_dir):
        raise HarnessError(f"{run_dir}: not a run directory (it holds none of {', '.join(RUN_FILES)})")
    metrics = read_metrics(run_dir)
    finished = (run_dir / "summary.json").is_file()
    summary = read_run_json(run_dir / "summary.json", SUMMARY_SCHEMA, "run summary") if finished else {}
    state = load_weights(run_dir / "model.pt") if (run_dir / "model.pt").is_file() else None
    report = read_run_json(run_dir / "test_report.json", TEST_REPORT_SCHEMA, "test report") if (run_dir / "test_report.json").is_file() else None
    figures = run_figures(metrics, state, report and report["confusion"], summary.get("before_training"), summary.get("config", {}).get("loss"))
    why = "" if finished else " (the run has not finished)"  # with summary.json, a file is missing for another reason
    why_not = {"training_curves": "metrics.jsonl holds no epoch yet" if (run_dir / "metrics.jsonl").exists() else f"no metrics.jsonl{why}",
               "filters": f"no model.pt{why}", "confusion_matrix": f"no test_report.json{why}"}
    skipped = []
    for name in (name for name in PICTURES if name not in figures):
        skipped.append(f"{name}: {why_not[name]}")
        if (run_dir / REPORT_DIR / f"{name}.png").is_file():  # an earlier report's (a finished run since extended, say): kept
            skipped[-1] += f"; {REPORT_DIR}/{name}.png is from an earlier report"
    return save_pictures(render(figures), run_dir), skipped
