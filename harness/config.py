"""Training configuration: one dataclass, presets as TOML files, command-line overrides.

Every field of `TrainConfig` is a `harness train` option (`batch_size` is
`--batch-size`, a bool `nesterov` is `--nesterov` / `--no-nesterov`), with the help
text written beside the field. A preset file sets some fields and the command line
wins. The options are generated with the standard library's argparse from the
fields' type hints: the `harness` command's subcommands are argparse already, and
presets must sit between the defaults and the command line, which argparse's
"None = not given" does directly (tyro or jsonargparse would do the generation too,
at the price of a second parser style and several dependencies).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import reprlib
import tomllib
import types
import typing
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from harness.device import resolve_precision
from harness.errors import HarnessError

CHOICES = {
    "model": ("lenet", "mlp"),
    "activation": ("relu", "leaky_relu", "tanh", "sigmoid"),
    "output_activation": ("", "relu", "leaky_relu", "tanh", "sigmoid"),
    "init": ("pytorch", "fan_product_normal"),
    "loss": ("cross_entropy", "mse"),
    "normalize": ("standardize", "unit", "unit_minus_pixel_mean", "raw"),
    "backend": ("auto", "nccl", "gloo"),
    "lr_schedule": ("exponential", "onecycle"),
    "precision": ("auto", "fp32", "bf16"),
    "compile": ("auto", "", "gpu", "cuda-graph", "cuda-graph-inductor", "default", "reduce-overhead", "max-autotune"),
}


def option(default, help: str, **kwargs):
    """A config field with its `--help` text."""
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata={"help": help}, **kwargs)
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)


@dataclass
class TrainConfig:
    """One training run's settings: a preset plus command-line overrides."""

    # model
    model: str = option("lenet", "lenet or mlp")
    hidden: list[int] = option([], "MLP hidden layer sizes, e.g. 500,300")
    activation: str = option("relu", "activation between layers")
    output_activation: str = option("", "also applied after the last layer (the mathspp MLP does); empty = none")
    leaky_slope: float = option(0.01, "negative slope of leaky_relu (PyTorch's default 0.01; mathspp's 0.1)")
    init: str = option(
        "pytorch",
        "initial weights: pytorch (PyTorch's default per layer); fan_product_normal: every weight tensor "
        "~ N(0, std 1/(fan_out x fan_in)), every bias ~ N(0, std 1/fan_out) (mathspp's nn.py)",
    )
    batch_norm: bool = option(
        False, "lenet only: BatchNorm after each conv and the hidden Linear (SyncBatchNorm across GPU ranks, so the "
        "statistics are the global batch's at any world size; refused for several CPU ranks, which PyTorch's SyncBatchNorm does not run on)"
    )
    loss: str = option("cross_entropy", "cross_entropy, or mse against one-hot targets")
    label_smoothing: float = option(0.0, "cross_entropy only: training targets put this much probability mass evenly on all classes (validation and test losses stay plain)")
    normalize: str = option(
        "standardize",
        "standardize: (x/255 - mean)/std; unit: x/255; unit_minus_pixel_mean: x/255 minus the "
        "per-pixel train mean; raw: 0..255 as floats (statistics come from the manifest)",
    )
    # optimisation
    epochs: int = option(15, "passes over the training set")
    batch_size: int = option(64, "global batch: each rank takes batch_size / world_size")
    macro_batch: int = option(60000, "images moved to the device per transfer")
    lr: float = option(0.1, "learning rate")
    momentum: float = option(0.9, "SGD momentum")
    nesterov: bool = option(False, "Nesterov momentum")
    weight_decay: float = option(0.0, "L2 weight decay")
    lr_decay: float = option(1.0, "learning rate multiplied by this after every epoch (exponential schedule)")
    lr_schedule: str = option(
        "exponential", "exponential: x lr_decay after every epoch; onecycle: per step, up linearly from lr/25 to lr over "
        "the first 25% of the run's steps, then down linearly to lr/250,000 (about 0) at its end"
    )
    augment_rotate: float = option(0.0, "augmentation on the device: rotate each training image by up to this many degrees either way")
    augment_scale: float = option(0.0, "augmentation: scale each training image by a factor in [1 - x, 1 + x]")
    augment_shift: float = option(0.0, "augmentation: shift each training image by up to this many pixels along each axis")
    holdout: int = option(0, "validate on the last N training images instead of the test set")
    early_stopping: int = option(0, "stop after this many epochs without a better validation loss (whole epochs: not one cut by --max-steps); 0 = off")
    seed: int = option(0, "initial weights and data order")
    shuffle: bool = option(
        True, "a seeded order every epoch; --no-shuffle walks the training split in file order every epoch (each rank "
        "still takes its slice of every global batch, so the sequence of global batches does not depend on the world size)"
    )
    # running
    device: str = option("auto", "auto (CUDA when present, else CPU), cpu, cuda (GPU LOCAL_RANK), or cuda:N (every rank on GPU N)")
    backend: str = option("auto", "collectives for CUDA tensors: auto (NCCL, or gloo for ranks sharing a GPU), nccl or gloo")
    threads: int = option(0, "CPU threads per rank; 0 = usable cores / ranks on this node")
    max_steps: int = option(0, "stop after this many optimizer steps in all; 0 = no limit")
    log_every: int = option(100, "steps between sync points: train/loss, stop-signal and NaN checks")
    eval_batch: int = option(2000, "batch size for validation and test")
    checkpoint_every: int = option(0, "also checkpoint every N steps; 0 = at epoch ends only")
    keep_checkpoints: int = option(3, "how many checkpoints to keep")
    timeout: float = option(300.0, "seconds any collective may wait, or rank 0 may go silent, before the job fails")
    rank0_timeout: float = option(
        3600.0, "seconds the other ranks wait for rank 0's validation and file writes while its heartbeat goes on"
    )
    # speed and reproducibility
    precision: str = option("auto", "fp32, or bf16 autocast; auto: accelerate's mixed_precision when launched by it, else fp32")
    deterministic: bool = option(
        True, "bitwise-reproducible kernels (and resume) on the GPU; off allows cuDNN autotuning and TF32"
    )
    compile: str = option(
        "auto", "auto: cuda-graph for one rank on a GPU (not when augmenting), else eager; "
        "cuda-graph: the whole step as one CUDA graph (one rank on a GPU); "
        "cuda-graph-inductor: the same, of the kernels torch.compile's inductor fuses for the step; "
        "torch.compile the model with this mode (default, reduce-overhead: CUDA graphs, max-autotune); "
        "gpu: cuda-graph-inductor for one rank on a GPU (reduce-overhead with augmentation), reduce-overhead for several (eager with --batch-norm), eager on the CPU; "
        "'' = eager"
    )
    channels_last: bool = option(False, "channels-last memory layout for the CNN's activations")

    def validate(self) -> None:
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise HarnessError(f"--{flag(name)} '{getattr(self, name)}' is not one of: {', '.join(a or '(none)' for a in allowed)}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise HarnessError(f"--device '{self.device}' is not one of: auto, cpu, cuda, cuda:N")
        if self.batch_norm and self.model != "lenet":
            raise HarnessError(f"--batch-norm is for the lenet model (got --model {self.model}; --no-batch-norm turns it off)")
        if self.model == "mlp" and not self.hidden:
            raise HarnessError("--hidden is required for the mlp model (e.g. --hidden 500,300)")
        if any(size < 1 for size in self.hidden):
            raise HarnessError(f"--hidden {','.join(map(str, self.hidden))}: every layer needs at least 1 unit")
        for name, value in dataclasses.asdict(self).items():
            # Training runs in float32: a larger value would become inf on the way.
            if isinstance(value, float) and not (math.isfinite(value) and abs(value) <= FLOAT32_MAX):
                raise HarnessError(f"--{flag(name)} must be a finite number of at most {FLOAT32_MAX:.3g} in size (got {value})")
        for name in ("epochs", "batch_size", "macro_batch", "log_every", "eval_batch", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise HarnessError(f"--{flag(name)} must be at least 1 (got {getattr(self, name)})")
        for name in ("seed", "holdout", "early_stopping", "max_steps", "checkpoint_every", "threads", "momentum", "weight_decay"):
            if getattr(self, name) < 0:
                raise HarnessError(f"--{flag(name)} must be 0 or more (got {getattr(self, name)})")
        if self.seed > MAX_SEED:
            raise HarnessError(f"--seed must be at most {MAX_SEED} (2**64 - 1, what torch.manual_seed takes; got {self.seed})")
        if self.threads > MAX_THREADS:
            raise HarnessError(f"--threads must be at most {MAX_THREADS} (got {self.threads}); 0 = usable cores / ranks on this node")
        for name in ("timeout", "rank0_timeout"):
            if not 0 < getattr(self, name) <= MAX_WAIT_SECONDS:
                raise HarnessError(f"--{flag(name)} must be positive and at most {MAX_WAIT_SECONDS:g} s, a week (got {getattr(self, name)})")
        for name in ("lr", "lr_decay"):
            if getattr(self, name) <= 0:
                raise HarnessError(f"--{flag(name)} must be positive (got {getattr(self, name)})")
        if self.batch_norm and self.batch_size < 2:
            raise HarnessError("--batch-norm needs --batch-size 2 or more: BatchNorm normalises over the batch")
        if self.nesterov and self.momentum <= 0:
            raise HarnessError("--nesterov needs a positive --momentum")
        if not 0 <= self.label_smoothing < 1 or (self.label_smoothing and self.loss != "cross_entropy"):
            raise HarnessError(f"--label-smoothing {self.label_smoothing}: needs --loss cross_entropy and a value in [0, 1)")
        if min(self.augment_rotate, self.augment_scale, self.augment_shift) < 0 or self.augment_scale >= 1:
            raise HarnessError("--augment-rotate, --augment-scale and --augment-shift must be >= 0, and --augment-scale < 1")


FLOAT32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max

# A wait across ranks longer than this is a hang by another name; and torch's timedelta-based
# timeouts overflow on numbers far larger.
MAX_WAIT_SECONDS = 7 * 24 * 3600.0

MAX_SEED = 2**64 - 1  # torch.manual_seed's range
MAX_THREADS = 4096  # torch.set_num_threads takes a C int; far more threads than any node's cores
# The largest preset model, fast's LeNet with BatchNorm, has 841,002 parameters, and the presets' MLPs 2 hidden
# layers. A config may ask for about 1,200 times that, 10**9 parameters (4 GB of float32),
# in up to 1,000 hidden layers: beyond that train refuses the config, and predict a run's.
MAX_PARAMETERS = 10**9
MAX_HIDDEN_LAYERS = 1000
MLP_ONLY = ("hidden", "activation", "output_activation", "leaky_slope")  # options that shape only the MLP

FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
TYPES = typing.get_type_hints(TrainConfig)
DEFAULTS = TrainConfig()

# Fields that may differ when a run resumes; any other change would make the resumed
# run a different experiment, so it is refused.
RESUMABLE_CHANGES = {
    "epochs", "max_steps", "log_every", "eval_batch", "device", "backend", "threads", "checkpoint_every", "keep_checkpoints",
    "timeout", "rank0_timeout", "deterministic", "compile", "channels_last",
}


def config_from_saved(saved, where: str) -> TrainConfig:
    """The config a run recorded (its summary.json or a checkpoint), checked as the command
    line's is: a run directory may come from someone else. Fields it lacks (added since)
    keep their defaults; fields this version does not know are ignored."""
    if not isinstance(saved, dict):
        raise HarnessError(f"{where}: its config is not a mapping")
    config = TrainConfig(**typed_values({name: value for name, value in saved.items() if name in FIELDS}, f"{where}: config."))
    try:
        config.validate()
    except HarnessError as e:
        raise HarnessError(f"{where}: its config: {e}") from None
    return config


def typed_values(values: dict, where: str) -> dict:
    """`values` checked against TrainConfig's field types, the integers given for float
    fields made floats (so that validate's bounds apply to them: an integer of 400 digits
    overflowed in the model); HarnessError naming `where` + the field otherwise."""
    typed = {}
    for name, value in values.items():
        kind = TYPES[name]
        if not _of_type(value, kind):
            raise HarnessError(f"{where}{name} is {reprlib.repr(value)}, not of type {getattr(kind, '__name__', kind)}")
        try:
            typed[name] = float(value) if kind is float else value
        except OverflowError:
            raise HarnessError(f"{where}{name} is {reprlib.repr(value)}, too large for a float") from None
    return typed


def _of_type(value, kind) -> bool:
    if kind is bool or kind is int:
        return type(value) is kind
    if kind is float:
        return type(value) in (int, float)
    if kind is str:
        return isinstance(value, str)
    return isinstance(value, list) and all(type(v) is int for v in value)  # list[int], the one container field


def flag(name: str) -> str:
    return name.replace("_", "-")


# --- presets --------------------------------------------------------------------------------------


def preset_names() -> list[str]:
    return sorted(p.name.removesuffix(".toml") for p in resources.files("harness.presets").iterdir() if p.name.endswith(".toml"))


def load_preset(name: str) -> dict:
    """A preset's values by field, type-checked. A name only, not a path (`../x` named a
    TOML file anywhere, and the default run directory runs/../x-TIME, outside runs/)."""
    if name not in preset_names():
        raise HarnessError(f"unknown preset '{name}' (choose from {', '.join(preset_names())})")
    path = resources.files("harness.presets") / f"{name}.toml"
    try:
        values = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:  # an edited checkout's
        raise HarnessError(f"preset {path.name}: not a TOML file ({str(e).splitlines()[0]})") from None
    unknown = set(values) - set(FIELDS)
    if unknown:
        raise HarnessError(f"preset {path.name}: unknown field(s) {', '.join(sorted(unknown))}")
    return typed_values(values, f"preset {path.name}: ")


# --- command-line options -------------------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'") from None


def _or_none(parse):
    """Parse a value of an optional field; `none` sets it to None."""
    return lambda text: None if text.lower() == "none" else parse(text)


SCALAR_PARSERS = {int: int, float: float, str: str, Path: Path}


def _argparse_kwargs(name: str, hint) -> dict:
    """argparse keywords for a field typed `hint`: int, float, str, Path, bool, list[int], or X | None."""
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)
    base = next(a for a in typing.get_args(hint) if a is not type(None)) if optional else hint
    if base is bool:
        return {"action": argparse.BooleanOptionalAction}
    if base == list[int]:
        parse, metavar = _int_list, "N,N,..."
    elif base in SCALAR_PARSERS:
        parse, metavar = SCALAR_PARSERS[base], name.upper()
    else:
        raise TypeError(f"TrainConfig.{name}: no command-line form for type {hint}")
    if name in CHOICES:
        metavar = "{" + ",".join(c or "''" for c in CHOICES[name]) + "}"
    return {"type": _or_none(parse) if optional else parse, "metavar": metavar}


def add_config_options(parser: argparse.ArgumentParser) -> None:
    """One option per config field; an option not given stays None: 'keep the preset's value'."""
    group = parser.add_argument_group("training config (override the preset)")
    defaults = TrainConfig()
    for name, field in FIELDS.items():
        default = getattr(defaults, name)
        shown = ",".join(map(str, default)) if isinstance(default, list) else default
        group.add_argument(
            f"--{flag(name)}",
            dest=name,
            default=None,
            help=f"{field.metadata['help']} (default {shown!r})".replace("%", "%%"),  # argparse formats help with %
            **_argparse_kwargs(name, TYPES[name]),
        )


def build_config(preset: str | None, args: argparse.Namespace) -> TrainConfig:
    values = load_preset(preset) if preset else {}
    values.update({name: getattr(args, name) for name in FIELDS if getattr(args, name, None) is not None})
    config = TrainConfig(**values)
    config.validate()
    check_mlp_options(config)
    if config.lr_schedule == "onecycle" and config.lr_decay != DEFAULTS.lr_decay:
        raise HarnessError(f"--lr-decay {config.lr_decay:g} is for the exponential schedule, not --lr-schedule onecycle "
                           "(from the preset or the command line)")
    config.precision = resolve_precision(config.precision)  # recorded as what the run used
    return config


def check_mlp_options(config: TrainConfig) -> None:
    """A new run's MLP options: refused for another model, which would ignore them but
    record them in summary.json (runs recorded so before are still read: config_from_saved
    does not ask); an MLP too large to build is one error, before anything is allocated."""
    if config.model != "mlp":
        unused = [f"--{flag(name)}" for name in MLP_ONLY if getattr(config, name) != getattr(DEFAULTS, name)]
        if unused:
            raise HarnessError(f"{', '.join(unused)} {'is' if len(unused) == 1 else 'are'} for the mlp model, "
                               f"not --model {config.model} (from the preset or the command line)")
        return
    if len(config.hidden) > MAX_HIDDEN_LAYERS:
        raise HarnessError(f"--hidden: {len(config.hidden)} hidden layers; at most {MAX_HIDDEN_LAYERS}")
    sizes = [28 * 28, *config.hidden, 10]
    parameters = sum(a * b + b for a, b in zip(sizes, sizes[1:]))
    if parameters > MAX_PARAMETERS:
        raise HarnessError(f"--hidden {','.join(map(str, config.hidden))}: the mlp would have {parameters:,} parameters; at most {MAX_PARAMETERS:,}")


# What a checkpoint written before a field existed ran with.
VALUES_BEFORE_FIELD = {"precision": "fp32"}


def changed_fields(saved: dict, config: TrainConfig) -> list[str]:
    """Fields whose change would make a resumed run a different experiment."""
    current, defaults = dataclasses.asdict(config), dataclasses.asdict(DEFAULTS)
    before = {**defaults, **VALUES_BEFORE_FIELD}
    resumable = RESUMABLE_CHANGES - ({"epochs", "max_steps"} if config.lr_schedule == "onecycle" else set())  # they set its length
    if config.model != "mlp":  # unused (a run may have recorded, say, --activation tanh before they were refused)
        resumable = resumable | set(MLP_ONLY)
    return sorted(k for k in current if k not in resumable and saved.get(k, before[k]) != current[k])
