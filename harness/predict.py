"""`harness predict`: classify digits with a trained run's weights.

The model comes from a run directory (model.pt with the config in summary.json, or,
for a run that has not finished, lost its summary.json or went on past it, its newest
valid checkpoint) or a checkpoint file.
Inputs are image files, turned into MNIST-style 28x28 images (harness.digit_image),
or images of a packed shard set.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch

from harness.checkpoint import list_checkpoints, load_newest_valid, load_verified, marker_step, stats_problem, structure_mismatch
from harness.config import MAX_HIDDEN_LAYERS, MAX_PARAMETERS, TrainConfig, config_from_saved
from harness.errors import EXIT_USAGE, HarnessError
from harness.models import build_model
from harness.normalize import STATS_USED, Normalizer
from harness.run_files import SUMMARY_SCHEMA, check_run_json, load_torch_file, model_state, read_run_json



@dataclasses.dataclass
class Trained:
    model: torch.nn.Module
    config: TrainConfig
    normalize: Normalizer
    source: Path  # the weights' file


@dataclasses.dataclass
class SavedModel:
    state: dict  # the model's state dict
    config: TrainConfig
    stats: dict | None  # the normalisation statistics it was trained with, when recorded
    weights: Path  # the file the weights came from
    described_in: Path  # the file the config and statistics came from: a checkpoint itself, or summary.json


def saved_run(path: Path) -> SavedModel:
    """The model of a run directory, a checkpoint (verified against its step-N.json marker
    when that is beside it), or a model.pt with the run's summary.json beside it."""
    if path.is_dir():
        return run_directory_model(path)
    if path.suffix == ".json" and path.with_suffix(".pt").is_file():  # a checkpoint's marker, as --resume takes it
        path = path.with_suffix(".pt")
    if not path.is_file():
        raise HarnessError(f"{path}: no such run directory or checkpoint")
    if path.suffix == ".pt" and path.with_suffix(".json").is_file():
        return checkpoint_model(load_verified(path), path)
    saved = load_torch_file(path)
    if isinstance(saved, dict) and "config" in saved:
        return checkpoint_model(saved, path)
    return described_weights(path, saved)


def described_weights(path: Path, weights, summary: dict | None = None) -> SavedModel:
    """Weights alone (a run's model.pt), described by the run's summary.json beside them;
    `summary`: that file's content, when the caller has read it already."""
    summary_path = path.parent / "summary.json"
    if summary is None:
        if not summary_path.is_file():
            raise HarnessError(f"{path}: no summary.json beside it to say which model it holds (give the run directory or a checkpoint)")
        summary = read_run_json(summary_path, SUMMARY_SCHEMA, "run summary")
    check_run_json(summary_path, summary, {**SUMMARY_SCHEMA, "required": ["config"]})
    config = config_from_saved(summary["config"], str(summary_path))
    return SavedModel(model_state(weights, path), config, summary.get("normalization_stats"), path, summary_path)


def run_directory_model(run_dir: Path) -> SavedModel:
    """The run's newest weights: model.pt, which its summary.json describes, unless the run
    went on past it (extended with a larger --max-steps or --epochs, and stopped or still
    training) or has no summary.json (not finished): then its newest valid checkpoint,
    which a note on stderr names."""
    model, summary_path = run_dir / "model.pt", run_dir / "summary.json"
    summary = read_run_json(summary_path, SUMMARY_SCHEMA, "run summary") if model.is_file() and summary_path.is_file() else None
    finished_at = summary.get("steps", 0) if summary is not None else None
    newest = list_checkpoints(run_dir)[:1]
    if finished_at is not None and all(marker_step(marker) <= finished_at for marker in newest):
        return described_weights(model, load_torch_file(model), summary)
    found = load_newest_valid(run_dir)  # each newer one that is damaged is skipped with a warning
    step = marker_step(found[0].with_suffix(".json")) if found else -1
    if finished_at is not None and step <= finished_at:
        return described_weights(model, load_torch_file(model), summary)
    if found is None:
        if model.is_file():
            raise HarnessError(f"{run_dir}: holds model.pt but no summary.json to say which model it is, and no valid checkpoint")
        raise HarnessError(f"{run_dir}: neither model.pt nor a valid checkpoint: not a run directory, or a run that has not saved yet")
    why = f"it went on past its summary.json's step {finished_at}" if finished_at is not None else "it has no summary.json: not finished"
    print(f"note: {run_dir}: {why}; predicting with its newest checkpoint, {found[0].name} (step {step})", file=sys.stderr)
    return checkpoint_model(found[1], found[0])


def checkpoint_model(state: dict, path: Path) -> SavedModel:
    return SavedModel(model_state(state, path), config_from_saved(state["config"], str(path)), state.get("normalization_stats"), path, path)


def load_trained(path: Path, shards: str | Path | None = None) -> Trained:
    """The trained model in eval mode on the CPU, with the input preparation it was trained with."""
    saved = saved_run(Path(path))
    stats = normalization_stats(saved.stats, saved.config, shards, saved.described_in)
    check_weights_fit(saved)
    model = build_model(saved.config)
    model.load_state_dict(saved.state)
    return Trained(model.eval(), saved.config, Normalizer(saved.config.normalize, stats, torch.device("cpu")), saved.weights)


def normalization_stats(stats: dict | None, config: TrainConfig, shards, source: Path) -> dict:
    """The statistics the run normalised its inputs with (those it records, or for a run
    written before they were, the shard set's), checked as a manifest's are."""
    if stats is None and STATS_USED[config.normalize]:  # a run written before the statistics were saved
        if shards is None:
            raise HarnessError(f"{source}: the run's inputs were normalised with '{config.normalize}', whose statistics it does not record; pass --shards DIR")
        from harness.data.shard_set import ShardSource

        stats = ShardSource(shards).manifest["train_stats"]
    problem = stats_problem(stats or {}, STATS_USED[config.normalize])
    if problem:
        raise HarnessError(f"{source}: the run's {problem}")
    return stats or {}


def check_weights_fit(saved: SavedModel) -> None:
    """HarnessError unless the weights fit the config's model, and that model is of a size
    predict builds: checked on the meta device (shapes only), before anything is allocated.
    structure_mismatch also refuses a tensor whose storage does not hold its elements, so
    the weights file holds every weight the model would."""
    config = saved.config
    if config.model == "mlp" and len(config.hidden) > MAX_HIDDEN_LAYERS:
        raise HarnessError(f"{saved.described_in}: its config has {len(config.hidden)} hidden layers; predict builds at most {MAX_HIDDEN_LAYERS}")
    with torch.device("meta"):
        expected = build_model(config).state_dict()
    problem = structure_mismatch(saved.state, expected, "")
    if problem:
        whose = "its" if saved.described_in == saved.weights else f"{saved.described_in.name}'s"
        raise HarnessError(f"{saved.weights}: weights do not fit the {config.model} model of {whose} config ({problem})")
    parameters = sum(t.numel() for t in expected.values())
    if parameters > MAX_PARAMETERS:
        raise HarnessError(f"{saved.described_in}: its config's {config.model} model has {parameters:,} parameters; predict builds at most {MAX_PARAMETERS:,}")
    # A run never saves such weights (it refuses a non-finite state): they would predict
    # NaN probabilities, and --json would print NaN, which is not JSON.
    broken = next((name for name, t in saved.state.items() if t.is_floating_point() and not torch.isfinite(t).all()), None)
    if broken is not None:
        raise HarnessError(f"{saved.weights}: weights {broken} hold NaN or infinite values")


@torch.no_grad()
def predict(trained: Trained, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [n, 28, 28] → (raw outputs, probabilities), each [n, 10]. A cross-entropy model's
    probabilities are the softmax of its logits; an MSE model was trained to output the one-hot
    target, so its outputs, clipped at 0 and divided by their sum, stand in for them."""
    outputs = trained.model(trained.normalize(torch.from_numpy(np.ascontiguousarray(images))))
    if trained.config.loss == "mse":
        clipped = outputs.clamp_min(0)
        probabilities = clipped / clipped.sum(1, keepdim=True).clamp_min(1e-12)
    else:
        probabilities = outputs.softmax(1)
    return outputs.numpy(), probabilities.numpy()


def predictions(names: list[str], images: np.ndarray, trained: Trained, labels: list[int | None]) -> list[dict]:
    outputs, probabilities = predict(trained, images)
    return [
        {"input": name, "predicted": int(p.argmax()), **({"label": label} if label is not None else {}),
         "probabilities": [round(float(v), 6) for v in p], "outputs": [round(float(v), 6) for v in o]}
        for name, o, p, label in zip(names, outputs, probabilities, labels)
    ]


def shard_images(shards: str | Path, split: str, indices: list[int]) -> tuple[list[str], np.ndarray, list[int], list[dict]]:
    """The split's images at `indices`, and an error for each index outside it: as for
    image files, one bad index does not cost the others their predictions."""
    from harness.data.shard_set import ShardSplit, index_problem

    images, labels = ShardSplit(shards, split).load_all()
    problems = {i: index_problem(shards, split, i, len(labels)) for i in indices}
    inside = [i for i in indices if not problems[i]]
    errors = [{"input": f"{split}[{i}]", "error": problems[i]} for i in indices if problems[i]]
    return [f"{split}[{i}]" for i in inside], images[inside], [int(labels[i]) for i in inside], errors


def file_images(paths: list[Path]) -> tuple[list[str], np.ndarray, list[None], list[dict]]:
    """The pictures that could be read, as MNIST-style images, and an error for each that
    could not: one bad file among many does not cost the others their predictions."""
    from harness.digit_image import load_digit

    names, digits, errors = [], [], []
    for path in paths:
        try:
            digits.append(load_digit(path))
            names.append(str(path))
        except HarnessError as e:
            errors.append({"input": str(path), "error": str(e)})
    images = np.stack(digits) if digits else np.zeros((0, 28, 28), np.uint8)
    return names, images, [None] * len(names), errors


def format_prediction(row: dict) -> str:
    label = f"  (label {row['label']})" if "label" in row else ""
    best = row["probabilities"][row["predicted"]]
    spread = "  ".join(f"{c}: {p:.4f}" for c, p in enumerate(row["probabilities"]))
    return f"{row['input']}: {row['predicted']}  probability {best:.4f}{label}\n  {spread}"


def run_predict(args) -> int:
    if args.index is not None and args.shards is None:
        raise HarnessError("--index needs --shards DIR")
    if bool(args.images) == (args.index is not None):
        given = "both" if args.images else "--shards but no --index" if args.shards else "neither"
        raise HarnessError(f"give image files, or --shards DIR --index N (one of the two; {given} given)")
    if args.images and args.split is not None:
        raise HarnessError("--split: chooses the split of --shards DIR --index N, not used for image files")
    trained = load_trained(args.model, args.shards)
    if args.images:
        names, images, labels, errors = file_images(args.images)
    else:
        names, images, labels, errors = shard_images(args.shards, args.split or "test", args.index)
    for error in errors:
        print(f"error: {error['error']}", file=sys.stderr)
    rows = predictions(names, images, trained, labels)  # [] when no picture could be read
    if args.json:
        print(json.dumps({"model": str(trained.source), "predictions": rows, "errors": errors}))
    elif rows:
        print("\n".join(format_prediction(row) for row in rows))
    return EXIT_USAGE if errors else 0
