"""Training configuration: one dataclass, presets as TOML files, command-line overrides.

Every field of `TrainConfig` is a `harness train` option (`batch_size` is
`--batch-size`); a preset file sets some of them, and the command line wins.
"""

from __future__ import annotations

import argparse
import dataclasses
import tomllib
from dataclasses import dataclass, field
from importlib import resources

from harness.errors import HarnessError

CHOICES = {
    "model": ("lenet", "mlp"),
    "activation": ("relu", "leaky_relu", "tanh", "sigmoid"),
    "output_activation": ("", "relu", "leaky_relu", "tanh", "sigmoid"),
    "loss": ("cross_entropy", "mse"),
    "normalize": ("standardize", "unit", "unit_minus_pixel_mean", "raw"),
    "device": ("auto", "cpu", "cuda"),
}


# What each field means; `harness train --help` shows these with the defaults.
HELP = {
    "model": "lenet or mlp",
    "hidden": "MLP hidden layer sizes, e.g. 500,300",
    "activation": "activation between layers",
    "output_activation": "also applied after the last layer (the mathspp MLP does); empty = none",
    "loss": "cross_entropy, or mse against one-hot targets",
    "normalize": "standardize: (x/255 - mean)/std; unit: x/255; unit_minus_pixel_mean: x/255 minus the "
    "per-pixel train mean; raw: 0..255 as floats (statistics come from the manifest)",
    "epochs": "passes over the training set",
    "batch_size": "global batch: each rank takes batch_size / world_size",
    "macro_batch": "images moved to the device per transfer",
    "lr": "learning rate",
    "momentum": "SGD momentum",
    "nesterov": "Nesterov momentum",
    "weight_decay": "L2 weight decay",
    "lr_decay": "learning rate multiplied by this after every epoch",
    "holdout": "validate on the last N training images instead of the test set",
    "early_stopping": "stop after this many epochs without a better validation loss; 0 = off",
    "seed": "initial weights and data order",
    "device": "auto (CUDA when present, else CPU), cpu or cuda",
    "threads": "CPU threads per rank; 0 = usable cores / ranks on this node",
    "max_steps": "stop after this many optimizer steps in all; 0 = no limit",
    "log_every": "steps between sync points: train/loss, stop-signal and NaN checks",
    "eval_batch": "batch size for validation and test",
    "checkpoint_every": "also checkpoint every N steps; 0 = at epoch ends only",
    "keep_checkpoints": "how many checkpoints to keep",
    "timeout": "seconds any collective may wait before the job fails",
}


@dataclass
class TrainConfig:
    """One training run's settings (a preset plus command-line overrides); see HELP."""

    model: str = "lenet"
    hidden: list[int] = field(default_factory=list)
    activation: str = "relu"
    output_activation: str = ""
    loss: str = "cross_entropy"
    normalize: str = "standardize"
    epochs: int = 15
    batch_size: int = 64
    macro_batch: int = 60000
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    lr_decay: float = 1.0
    holdout: int = 0
    early_stopping: int = 0
    seed: int = 0
    device: str = "auto"
    threads: int = 0
    max_steps: int = 0
    log_every: int = 100
    eval_batch: int = 2000
    checkpoint_every: int = 0
    keep_checkpoints: int = 3
    timeout: float = 300.0

    def validate(self) -> None:
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise HarnessError(f"--{name.replace('_', '-')} '{getattr(self, name)}' is not one of: {', '.join(a or '(none)' for a in allowed)}")
        if self.model == "mlp" and not self.hidden:
            raise HarnessError("--hidden is required for the mlp model (e.g. --hidden 500,300)")
        for name in ("epochs", "batch_size", "macro_batch", "log_every", "eval_batch", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise HarnessError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(self, name)})")
        if self.timeout <= 0:
            raise HarnessError(f"--timeout must be positive (got {self.timeout})")
        if self.lr <= 0:
            raise HarnessError(f"--lr must be positive (got {self.lr})")
        if self.nesterov and self.momentum <= 0:
            raise HarnessError("--nesterov needs a positive --momentum")


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def preset_names() -> list[str]:
    return sorted(p.name.removesuffix(".toml") for p in resources.files("harness.presets").iterdir() if p.name.endswith(".toml"))


def load_preset(name: str) -> dict:
    path = resources.files("harness.presets") / f"{name}.toml"
    if not path.is_file():
        raise HarnessError(f"unknown preset '{name}' (choose from {', '.join(preset_names())})")
    values = tomllib.loads(path.read_text())
    unknown = set(values) - set(FIELDS)
    if unknown:
        raise HarnessError(f"preset {path.name}: unknown field(s) {', '.join(sorted(unknown))}")
    return values


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got '{text}'")


def _parse_int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'") from None


def add_config_options(parser: argparse.ArgumentParser) -> None:
    """One option per config field; default None means 'keep the preset's value'."""
    group = parser.add_argument_group("training config (override the preset)")
    parsers = {int: int, float: float, str: str, bool: _parse_bool, "list[int]": _parse_int_list}
    defaults = TrainConfig()
    for name, f in FIELDS.items():
        kind = f.type if f.type in ("list[int]",) else {"int": int, "float": float, "str": str, "bool": bool}[f.type]
        group.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            type=parsers[kind],
            default=None,
            metavar=name.upper() if kind is not bool else "BOOL",
            help=f"{HELP[name]} (default {getattr(defaults, name)!r})",
        )


def build_config(preset: str | None, args: argparse.Namespace) -> TrainConfig:
    values = load_preset(preset) if preset else {}
    values.update({name: getattr(args, name) for name in FIELDS if getattr(args, name, None) is not None})
    config = TrainConfig(**values)
    config.validate()
    return config


# Fields that may differ when a run resumes; any other change would make the resumed
# run a different experiment, so it is refused.
RESUMABLE_CHANGES = {"epochs", "max_steps", "log_every", "eval_batch", "device", "threads", "checkpoint_every", "keep_checkpoints", "timeout"}


def changed_fields(saved: dict, config: TrainConfig) -> list[str]:
    current = dataclasses.asdict(config)
    return sorted(k for k in current if k not in RESUMABLE_CHANGES and saved.get(k) != current[k])
