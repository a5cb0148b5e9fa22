"""`harness predict`: classify digits with a trained run's weights.

The model comes from a run directory (model.pt with the config in summary.json, or,
for a run that has not finished or lost its summary.json, its newest valid checkpoint)
or a checkpoint file.
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

from harness.checkpoint import load_newest_valid, load_verified, stats_problem, structure_mismatch
from harness.config import MAX_HIDDEN_LAYERS, MAX_PARAMETERS, TrainConfig, config_from_saved
from harness.errors import EXIT_USAGE, HarnessError
from harness.models import build_model
from harness.normalize import STATS_USED, Normalizer
from harness.run_files import SUMMARY_SCHEMA, load_torch_file, model_state, read_run_json



@dataclasses.dataclass
class Trained:
    model: torch.nn.Module
    config: TrainConfig
    normalize: Normalizer
    source: Path  # the weights' file


def saved_run(path: Path) -> tuple[dict, TrainConfig, dict | None, Path]:
    """(state dict, config, normalisation statistics or None, weights file) from a run
    directory, a checkpoint (verified against its step-N.json marker when that is beside
    it), or a model.pt with the run's summary.json beside it."""
    if path.is_dir():
        if (path / "model.pt").is_file() and (path / "summary.json").is_file():
            return saved_run(path / "model.pt")
        found = load_newest_valid(path)  # a run not finished, or whose summary.json, which says what model.pt is, is gone
        if found is None:
            if (path / "model.pt").is_file():
                raise HarnessError(f"{path}: holds model.pt but no summary.json to say which model it is, and no valid checkpoint")
            raise HarnessError(f"{path}: neither model.pt nor a valid checkpoint: not a run directory, or a run that has not saved yet")
        return checkpoint_parts(found[1], found[0])
    if not path.is_file():
        raise HarnessError(f"{path}: no such run directory or checkpoint")
    if path.suffix == ".pt" and path.with_suffix(".json").is_file():
        return checkpoint_parts(load_verified(path), path)
    saved = load_torch_file(path)
    if isinstance(saved, dict) and "config" in saved:
        return checkpoint_parts(saved, path)
    summary_path = path.parent / "summary.json"
    if not summary_path.is_file():
        raise HarnessError(f"{path}: no summary.json beside it to say which model it holds (give the run directory or a checkpoint)")
    summary = read_run_json(summary_path, {**SUMMARY_SCHEMA, "required": ["config"]}, "run summary")
    return model_state(saved, path), config_from_saved(summary["config"], str(summary_path)), summary.get("normalization_stats"), path


def checkpoint_parts(state: dict, path: Path) -> tuple[dict, TrainConfig, dict | None, Path]:
    return model_state(state, path), config_from_saved(state["config"], str(path)), state.get("normalization_stats"), path


def load_trained(path: Path, shards: str | Path | None = None) -> Trained:
    """The trained model in eval mode on the CPU, with the input preparation it was trained with."""
    state, config, stats, source = saved_run(Path(path))
    stats = normalization_stats(stats, config, shards, source)
    check_weights_fit(state, config, source)
    model = build_model(config)
    model.load_state_dict(state)
    return Trained(model.eval(), config, Normalizer(config.normalize, stats, torch.device("cpu")), source)


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


def check_weights_fit(state: dict, config: TrainConfig, source: Path) -> None:
    """HarnessError unless the weights fit the config's model, and that model is of a size
    predict builds: checked on the meta device (shapes only), before anything is allocated.
    structure_mismatch also refuses a tensor whose storage does not hold its elements, so
    the weights file holds every weight the model would."""
    if config.model == "mlp" and len(config.hidden) > MAX_HIDDEN_LAYERS:
        raise HarnessError(f"{source}: its config has {len(config.hidden)} hidden layers; predict builds at most {MAX_HIDDEN_LAYERS}")
    with torch.device("meta"):
        expected = build_model(config).state_dict()
    problem = structure_mismatch(state, expected, "")
    if problem:
        raise HarnessError(f"{source}: weights do not fit the {config.model} model of its config ({problem})")
    parameters = sum(t.numel() for t in expected.values())
    if parameters > MAX_PARAMETERS:
        raise HarnessError(f"{source}: its config's {config.model} model has {parameters:,} parameters; predict builds at most {MAX_PARAMETERS:,}")


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


def shard_images(shards: str | Path, split: str, indices: list[int]) -> tuple[list[str], np.ndarray, list[int]]:
    from harness.data.shard_set import ShardSplit

    images, labels = ShardSplit(shards, split).load_all()
    for i in indices:
        if not 0 <= i < len(labels):
            raise HarnessError(f"{shards}: --index {i} is outside the {split} split's {len(labels)} images")
    return [f"{split}[{i}]" for i in indices], images[indices], [int(labels[i]) for i in indices]


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
    if bool(args.images) == (args.index is not None):
        given = "both" if args.images else "neither"
        raise HarnessError(f"give image files, or --shards DIR --index N (one of the two; {given} given)")
    trained = load_trained(args.model, args.shards)
    errors = []
    if args.images:
        names, images, labels, errors = file_images(args.images)
    else:
        names, images, labels = shard_images(args.shards, args.split, args.index)
    for error in errors:
        print(f"error: {error['error']}", file=sys.stderr)
    rows = predictions(names, images, trained, labels)  # [] when no picture could be read
    if args.json:
        print(json.dumps({"model": str(trained.source), "predictions": rows, "errors": errors}))
    elif rows:
        print("\n".join(format_prediction(row) for row in rows))
    return EXIT_USAGE if errors else 0
