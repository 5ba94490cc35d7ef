"""Fine-tuning configuration: typed dataclasses, YAML recipes, and command-line overrides.

Precedence (lowest first): built-in defaults, the config saved in ``last.pt`` (on ``--resume``),
the recipe file, command-line flags. Unknown keys and values of the wrong type are refused with
a ``UserInputError`` that names the key (``train.lr``).

A recipe may name a model that is not converted yet (``model: resnet18`` + ``convert:``): then
``finetune`` builds and converts it first (and fits it to the budget) when no checkpoint is given.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import UserInputError
from .data import AugmentConfig
from .outputs import normalize_output

__all__ = ["TrainConfig", "ConvertPolicy", "FinetuneConfig", "load_recipe", "config_from_dict", "merge_config",
           "check_resumable"]


@dataclass
class TrainConfig:
    """Optimisation hyperparameters (``train:`` section of a recipe)."""

    epochs: int | None = None  # default 1 epoch when neither epochs nor steps is set
    steps: int | None = None
    batch_size: int = 64  # per process
    opt: str = "sgd"  # any timm.optim name: sgd, momentum, adamw, lamb, ...
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    scale_lr: float = 0.0  # learning rate of the DynOPool strides by their gradient (default 0: the sizes come from the
    # budget fit and the held-out size search; in our runs the gradient cost 1.5-2 points, docs/RESULTS.md §6)
    sched: str = "cosine"  # any timm.scheduler name
    warmup_steps: int | None = None  # default: 5% of the steps
    warmup_lr: float = 1e-5
    min_lr: float = 0.0
    label_smoothing: float = 0.1
    penalty_weight: float = 1.0  # lambda of the budget penalty
    budget_mode: str = "ceiling"  # ceiling: penalise only above the budget | target: also below it
    clip_grad: float | None = 5.0  # max global gradient norm (None: off)
    seed: int = 0
    workers: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: str = "auto"  # auto (bf16 on CUDA when supported, off on CPU) | bf16 | off
    log_every: int = 20
    val_limit: int | None = None  # validate on at most this many validation images (a fixed random sample; default all)
    checkpoint_every: int | None = None  # also save last.pt every N steps (default: per epoch)
    # the size schedule (training/size_control.py): jitter while learning, held-out search, settle
    size_jitter: int = 0  # each step, move every group's size by up to this many pixels (default off: it cost 4 points, docs/RESULTS.md §6)
    # choose the sizes on held-out training data, then settle (off: it kept the start in every run, RESULTS §6.5)
    size_search: bool = False
    settle: float = 0.3  # fraction of the steps, at the end, trained with the searched sizes frozen
    holdout: float = 0.1  # fraction of the training data held out for the size search ...
    holdout_max: int = 5000  # ... at most this many images (with `steps`: at most steps x batch, 256 at least)
    size_refresh_every: int = 1  # sizes re-read from the strides every N steps, held in between (needs size_jitter 0)
    # evaluate and save an exponential moving average of the weights (timm's ModelEmaV3 with its warm-up; strides
    # not averaged: training/weight_average.py)
    model_ema: bool = False
    model_ema_decay: float = 0.9998
    # which output the loss reads where forward returns a tuple/list/dict (training/outputs.py): auto | index | key
    output: str | int = "auto"


@dataclass
class ConvertPolicy:
    """Conversion policy used when the recipe names an unconverted model (``convert:`` section)."""

    placement: str | None = None  # default: exact with weights/pretrained, else before
    aggregate: str | None = None
    include: list[str] | None = None
    exclude: list[str] | None = None
    input_site: bool = False  # a learnable input resolution in front of the model
    patchify: bool | None = None  # the patchify rule under placement before (default: on)
    axis_fill: bool = False  # the budget fit then raises single sides of maps while the budget allows


@dataclass
class FinetuneConfig:
    """Everything a recipe can say."""

    model: str | None = None  # model source to build and convert when no checkpoint is given
    build_args: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None  # a state dict file loaded into the model before converting it
    pretrained: bool = False  # timm's/torchvision's own pretrained weights, from the local cache
    num_classes: int | None = None  # the classifier's class count (replaced when it differs); default the data's
    input_size: list[int] | None = None  # (C, H, W) for a model converted here
    convert: ConvertPolicy = field(default_factory=ConvertPolicy)
    budget: str | None = None  # default: the checkpoint's budget
    data: str | None = None  # --data spec; default the bundled Fashion-MNIST subset
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _check(key: str, value: Any, hint: Any) -> Any:
    """Return ``value`` coerced to ``hint`` or raise UserInputError naming ``key``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        for option in options:
            try:
                return _check(key, value, option)
            except UserInputError:
                continue
        raise UserInputError(f"recipe key {key!r}: expected {_name(hint)}, got {value!r}")
    if hint is Any:
        return value
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint in (int, str, bool) and type(value) is hint:
        return value
    if origin in (list, tuple) and isinstance(value, (list, tuple)):
        if origin is tuple and len(args) == 2 and args[1] is not Ellipsis and len(value) != 2:
            raise UserInputError(f"recipe key {key!r}: expected {_name(hint)}, got {value!r}")
        inner = args[0] if args else Any
        return origin(_check(f"{key}[{i}]", v, inner) for i, v in enumerate(value))
    if origin is dict and isinstance(value, dict):
        return dict(value)
    raise UserInputError(f"recipe key {key!r}: expected {_name(hint)}, got {value!r}")


def _name(hint: Any) -> str:
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


def _update(obj: Any, data: dict[str, Any], prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    for key, value in data.items():
        name = f"{prefix}{key}"
        if key not in hints:
            known = ", ".join(sorted(hints))
            raise UserInputError(f"unknown recipe key {name!r} (known here: {known})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise UserInputError(f"recipe key {name!r}: expected a mapping, got {value!r}")
            _update(current, value, prefix=f"{name}.")
        else:
            setattr(obj, key, _check(name, value, hints[key]))


def config_from_dict(data: dict[str, Any], base: FinetuneConfig | None = None) -> FinetuneConfig:
    """A new config: ``base`` (or the defaults) updated with the nested mapping ``data``."""
    cfg = config_from_dict(base.to_dict()) if base is not None else FinetuneConfig()
    if not isinstance(data, dict):
        raise UserInputError(f"a recipe must be a mapping of keys to values, got {type(data).__name__}")
    train = data.get("train") if isinstance(data.get("train"), dict) else {}
    if "steps" in train and train["steps"] is not None:  # the later source picks the stopping rule
        cfg.train.epochs = None
    if "epochs" in train and train["epochs"] is not None:
        cfg.train.steps = None
    _update(cfg, data)
    if cfg.train.epochs is not None and cfg.train.steps is not None:
        raise UserInputError("give either train.epochs or train.steps, not both")
    for key in ("batch_size", "log_every", "epochs", "steps", "checkpoint_every", "holdout_max", "size_refresh_every",
                "val_limit"):
        value = getattr(cfg.train, key)
        if value is not None and value < 1:
            raise UserInputError(f"recipe key 'train.{key}' must be >= 1, got {value}")
    _check_ranges(cfg.train)
    cfg.train.output = normalize_output(cfg.train.output)  # a recipe's 0 and the flag's "0" alike
    if cfg.train.size_jitter < 0:
        raise UserInputError(f"recipe key 'train.size_jitter' must be >= 0 pixels, got {cfg.train.size_jitter}")
    if cfg.train.size_refresh_every > 1 and cfg.train.size_jitter > 0:
        raise UserInputError("train.size_refresh_every > 1 holds the sizes between refreshes, which size jitter "
                             "changes every step: set train.size_jitter: 0 with it")
    if cfg.train.amp not in ("auto", "bf16", "off"):
        raise UserInputError(f"recipe key 'train.amp' must be auto, bf16 or off, got {cfg.train.amp!r}")
    if cfg.train.budget_mode not in ("ceiling", "target"):
        raise UserInputError(f"recipe key 'train.budget_mode' must be ceiling or target, got {cfg.train.budget_mode!r}")
    return cfg


# (low, high, low_open): finite values in [low, high] (or (low, high] when low_open)
_RANGES = {
    "lr": (0.0, math.inf, True), "scale_lr": (0.0, math.inf, False), "warmup_lr": (0.0, math.inf, False),
    "min_lr": (0.0, math.inf, False), "momentum": (0.0, 1.0, False), "weight_decay": (0.0, math.inf, False),
    "label_smoothing": (0.0, 1.0, False), "penalty_weight": (0.0, math.inf, False), "clip_grad": (0.0, math.inf, True),
    "settle": (0.0, 0.9, False), "holdout": (0.0, 0.5, True), "model_ema_decay": (0.0, 1.0, False),
}


def _check_ranges(train: TrainConfig) -> None:
    """Finite hyperparameters in their ranges (a NaN learning rate would train NaNs silently)."""
    for key, (low, high, low_open) in _RANGES.items():
        value = getattr(train, key)
        if value is None:
            continue
        ok = math.isfinite(value) and (value > low if low_open else value >= low) and value <= high
        if not ok:
            bounds = f"{'>' if low_open else '>='} {low:g}" + (f" and <= {high:g}" if math.isfinite(high) else "")
            raise UserInputError(f"recipe key 'train.{key}' must be a finite number {bounds}, got {value}")


def load_recipe(path: str | Path) -> dict[str, Any]:
    """Read a YAML recipe into a nested mapping (validated by :func:`config_from_dict`)."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"recipe not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise UserInputError(f"recipe {path} is not valid YAML: {' '.join(str(err).split())}") from err
    data = {} if data is None else data
    if isinstance(data, dict) and "budget" in data and isinstance(data["budget"], (int, float)):
        data["budget"] = str(data["budget"])
    config_from_dict(data)  # validate now, with the file's keys
    return data


def merge_config(*layers: dict[str, Any] | None) -> FinetuneConfig:
    """Defaults updated with each nested mapping in turn (later layers win; None is skipped)."""
    cfg = FinetuneConfig()
    for layer in layers:
        if layer:
            cfg = config_from_dict(layer, base=cfg)
    return cfg


#: train settings that the saved optimiser, scheduler and data position fix: a resumed run
#: cannot change them (the restored state would silently override a new value)
FIXED_ON_RESUME = ("opt", "lr", "momentum", "weight_decay", "scale_lr", "sched", "warmup_steps", "warmup_lr",
                   "min_lr", "epochs", "steps", "batch_size", "size_jitter", "size_search", "settle", "holdout",
                   "holdout_max", "model_ema", "model_ema_decay", "output")


def check_resumable(saved: dict, wanted: dict, last: Path) -> None:
    """UserInputError when the run asks for a setting the resumed state fixes differently."""
    for key in FIXED_ON_RESUME:
        if key in saved and saved[key] != wanted.get(key):
            raise UserInputError(
                f"--resume continues the saved schedule, which has train.{key} = {saved[key]!r}, not {wanted.get(key)!r}: "
                f"drop the change, or start a new run with {last} as its checkpoint and another --out"
            )
