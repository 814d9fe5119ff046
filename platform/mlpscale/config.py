"""The pretraining run config: one typed dataclass, presets, YAML files, CLI overrides and validation.

Precedence: dataclass defaults < preset < YAML file < overrides. Every field can be set
from the command line as `--field-name value` (argparse is generated from the fields).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

import yaml

from mlpscale.errors import MlpscaleError

OPTIMIZERS = ("lion", "adamw", "sgd")
SCHEDULES = ("none", "cosine", "warmup_cosine")
PRECISIONS = ("auto", "bf16", "fp32")
ACTIVATIONS = ("gelu", "relu")
NORMALIZATIONS = ("layer", "batch", "none")
ORDERS = ("random", "quasi_random")

# Default image side per dataset when `resolution` is not given (matches data/prepare.py).
DEFAULT_RESOLUTIONS = {"digits": 16, "cifar10": 32, "cifar100": 32, "imagenet64": 64, "folder": 64}


@dataclass
class PretrainConfig:
    """Everything one pretraining run needs; the defaults are the small CPU run on the bundled digits."""

    # model
    arch: str = "B_4-Wi_256"
    expansion: int = 4
    activation: str = "gelu"
    normalization: str = "layer"
    dropout: float = 0.0
    # data
    dataset: str = "digits"
    data_dir: str | None = None
    resolution: int | None = None
    n_train: int | None = None
    crop_scale: tuple[float, float] = (0.5, 1.0)
    crop_ratio: tuple[float, float] = (0.75, 4.0 / 3.0)
    flip: bool = False
    mixup_alpha: float = 0.0
    order: str = "random"
    loader_workers: int | None = None  # decoder threads; none: 1 on CPU (the step has the cores), the worker's CPUs on a GPU
    # optimisation
    epochs: int = 20
    batch_size: int = 128
    accumulation_steps: int = 1
    optimizer: str = "lion"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    label_smoothing: float = 0.0
    grad_clip: float = 0.0
    schedule: str = "warmup_cosine"
    warmup_epochs: float = 1.0
    # execution
    num_workers: int = 1
    use_gpu: bool | None = None
    precision: str = "auto"
    compile: bool = False
    seed: int = 0
    checkpoint_every: int = 1
    keep_checkpoints: int = 2
    max_failures: int = 2
    storage_path: str | None = None
    # tracking
    experiment: str = "mlpscale"
    run_name: str | None = None
    tracking_uri: str | None = None
    register: str | None = None
    log_model: bool = True  # false: no MLflow model at the end (checkpoints and the run record stay)

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML/JSON-friendly values (tuples become lists)."""
        out = dataclasses.asdict(self)
        for key, value in out.items():
            if isinstance(value, tuple):
                out[key] = list(value)
        return out

    @property
    def image_resolution(self) -> int:
        """The resolution to train at: the explicit one or the dataset's default."""
        if self.resolution:
            return int(self.resolution)
        return DEFAULT_RESOLUTIONS.get(self.dataset, 64)


PRESETS: dict[str, dict[str, Any]] = {
    # Paper section 4 (training from scratch): LION lr 5e-5, label smoothing 0.3, MixUp.
    "from-scratch": {
        "dataset": "cifar10", "arch": "B_12-Wi_1024", "optimizer": "lion", "lr": 5e-5,
        "label_smoothing": 0.3, "mixup_alpha": 0.8, "flip": True, "crop_scale": (0.08, 1.0),
        "batch_size": 1024, "epochs": 500, "schedule": "warmup_cosine", "warmup_epochs": 10,
    },
    # Paper appendix A.4 (ImageNet-21k pretraining for the scaling laws): batch 16384, LION lr 1e-5,
    # weight decay 1e-3, label smoothing 0.3, MixUp 0.8, flips and crops. The whole batch fits one
    # 24 GB card (paper sec. 6; B_12-Wi_1024 is estimated at ~9 GiB); raise accumulation_steps for
    # smaller cards.
    "in21k": {
        "dataset": "imagenet64", "arch": "B_12-Wi_1024", "optimizer": "lion", "lr": 1e-5,
        "weight_decay": 1e-3, "label_smoothing": 0.3, "mixup_alpha": 0.8, "flip": True,
        "crop_scale": (0.08, 1.0), "batch_size": 16384, "accumulation_steps": 1, "epochs": 800,
        "schedule": "warmup_cosine", "warmup_epochs": 5, "grad_clip": 1.0,
    },
}

CHOICES: dict[str, tuple[str, ...]] = {
    "optimizer": OPTIMIZERS, "schedule": SCHEDULES, "precision": PRECISIONS,
    "activation": ACTIVATIONS, "normalization": NORMALIZATIONS, "order": ORDERS,
}
POSITIVE = ("expansion", "epochs", "batch_size", "accumulation_steps", "num_workers", "checkpoint_every",
            "keep_checkpoints", "lr")
NON_NEGATIVE = ("weight_decay", "momentum", "grad_clip", "warmup_epochs", "mixup_alpha",
                "max_failures", "seed", "dropout", "label_smoothing")
FIELD_NAMES = tuple(f.name for f in fields(PretrainConfig))
_HINTS = typing.get_type_hints(PretrainConfig)


def _base_type(hint) -> tuple[type, bool]:
    """(the concrete type, whether None is allowed) of a field's annotation."""
    args = typing.get_args(hint)
    if args and type(None) in args and typing.get_origin(hint) is not tuple:
        inner = [a for a in args if a is not type(None)][0]
        return _base_type(inner)[0], True
    origin = typing.get_origin(hint)
    return (origin or hint), False


def _parse_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise MlpscaleError(f"{key}={value!r} is not a boolean; use true or false")


def coerce_field(config_class: type, key: str, value: Any, *, label: str = "config") -> Any:
    """Convert a YAML/CLI value to the type of `config_class`'s field `key`; MlpscaleError naming the key."""
    names = tuple(f.name for f in fields(config_class))
    if key not in names:
        raise MlpscaleError(f"unknown {label} key {key!r}; known keys: {', '.join(names)}")
    kind, optional = _base_type(typing.get_type_hints(config_class)[key])
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
        if optional:
            return None
        raise MlpscaleError(f"{key} must not be empty")
    try:
        if kind is bool:
            return _parse_bool(key, value)
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            number = float(value) if isinstance(value, str) else value
            if isinstance(number, float) and not number.is_integer():
                raise ValueError
            return int(number)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if kind is tuple:
            items = value.replace(",", " ").split() if isinstance(value, str) else list(value)
            if len(items) != 2:
                raise ValueError
            return (float(items[0]), float(items[1]))
        if kind is str:
            if not isinstance(value, (str, int, float)):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        raise MlpscaleError(f"{key}={value!r} is not a valid {_type_name(kind, optional)}") from None
    return value


def coerce_value(key: str, value: Any) -> Any:
    """Convert a YAML/CLI value to the PretrainConfig field's type; MlpscaleError naming the key when it cannot."""
    return coerce_field(PretrainConfig, key, value)


def _type_name(kind: type, optional: bool) -> str:
    name = {bool: "boolean (true/false)", int: "integer", float: "number", str: "string",
            tuple: "pair of numbers (e.g. 0.08 1.0)"}.get(kind, str(kind))
    return name + (" or none" if optional else "")


def validate(cfg: PretrainConfig) -> PretrainConfig:
    """Check choices and ranges; raises MlpscaleError naming the key, the value and what is allowed."""
    for key, allowed in CHOICES.items():
        if getattr(cfg, key) not in allowed:
            raise MlpscaleError(f"{key}={getattr(cfg, key)!r} is not allowed; choose one of: {', '.join(allowed)}")
    for key in POSITIVE:
        if not getattr(cfg, key) > 0:
            raise MlpscaleError(f"{key}={getattr(cfg, key)!r} must be positive")
    for key in NON_NEGATIVE:
        if getattr(cfg, key) < 0:
            raise MlpscaleError(f"{key}={getattr(cfg, key)!r} must be >= 0")
    for key in ("resolution", "n_train", "loader_workers"):
        if getattr(cfg, key) is not None and getattr(cfg, key) <= 0:
            raise MlpscaleError(f"{key}={getattr(cfg, key)!r} must be positive (or none for the default)")
    if not 0 <= cfg.label_smoothing < 1:
        raise MlpscaleError(f"label_smoothing={cfg.label_smoothing} must be in [0, 1)")
    if not 0 <= cfg.dropout < 1:
        raise MlpscaleError(f"dropout={cfg.dropout} must be in [0, 1)")
    low, high = cfg.crop_scale
    if not 0 < low <= high <= 1:
        raise MlpscaleError(f"crop_scale={list(cfg.crop_scale)} must satisfy 0 < low <= high <= 1")
    low, high = cfg.crop_ratio
    if not 0 < low <= high:
        raise MlpscaleError(f"crop_ratio={list(cfg.crop_ratio)} must satisfy 0 < low <= high")
    if cfg.warmup_epochs >= cfg.epochs and cfg.schedule == "warmup_cosine":
        raise MlpscaleError(f"warmup_epochs={cfg.warmup_epochs} must be smaller than epochs={cfg.epochs}")
    per_step = cfg.accumulation_steps * cfg.num_workers
    if cfg.batch_size % per_step:
        raise MlpscaleError(
            f"batch_size={cfg.batch_size} must be divisible by accumulation_steps*num_workers={per_step} "
            f"(each worker steps on micro-batches of batch_size/(accumulation_steps*num_workers))")
    if not cfg.arch or not isinstance(cfg.arch, str):
        raise MlpscaleError("arch must name an architecture such as B_6-Wi_256")
    if not cfg.experiment:
        raise MlpscaleError("experiment must not be empty")
    return cfg


def apply(cfg: PretrainConfig, values: Mapping[str, Any]) -> PretrainConfig:
    """A copy of `cfg` with `values` (keys may use - or _) coerced and set; unknown keys rejected."""
    changes = {}
    for raw_key, value in values.items():
        key = str(raw_key).replace("-", "_")
        changes[key] = coerce_value(key, value)
    return dataclasses.replace(cfg, **changes)


def load_config(path: str | os.PathLike | None = None, overrides: Mapping[str, Any] | None = None,
                preset: str | None = None) -> PretrainConfig:
    """Defaults, then the preset, then the YAML file, then the overrides; validated."""
    cfg = PretrainConfig()
    if preset:
        if preset not in PRESETS:
            raise MlpscaleError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
        cfg = apply(cfg, PRESETS[preset])
    if path:
        cfg = apply(cfg, read_yaml(path))
    if overrides:
        cfg = apply(cfg, overrides)
    return validate(cfg)


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML mapping from a file; MlpscaleError when missing or not a mapping."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise MlpscaleError(f"config file {str(file)!r} does not exist; pass an existing YAML file to --config")
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as error:
        raise MlpscaleError(f"config file {str(file)!r} is not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise MlpscaleError(f"config file {str(file)!r} must hold a mapping of key: value")
    return data


def save_yaml(obj: Any, path: str | os.PathLike) -> Path:
    """Write a config (dataclass or mapping) as YAML that load_config(path) reads back."""
    data = obj.to_dict() if hasattr(obj, "to_dict") else dict(obj)
    data = {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}
    file = Path(path)
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(yaml.safe_dump(data, sort_keys=False))
    return file


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """`--config`, `--preset` and one `--field-name` option per config field (default: unset)."""
    parser.add_argument("--config", help="YAML file of config fields (written by save_yaml or by hand)")
    parser.add_argument("--preset", help=f"paper recipe: {', '.join(PRESETS)}")
    group = parser.add_argument_group("config fields (override the preset and the --config file)")
    defaults = PretrainConfig()
    for name in FIELD_NAMES:
        flag = "--" + name.replace("_", "-")
        kind, optional = _base_type(_HINTS[name])
        help_text = f"{_type_name(kind, optional)}; default {getattr(defaults, name)!r}"
        if name in CHOICES:
            help_text += f"; one of {', '.join(CHOICES[name])}"
        nargs = 2 if kind is tuple else None
        aliases = [flag] if "_" not in name else [flag, "--" + name]
        group.add_argument(*aliases, dest=f"cfg__{name}", nargs=nargs, default=None, metavar=name.upper(),
                           help=help_text)


def config_from_args(args: argparse.Namespace) -> PretrainConfig:
    """The validated config from parsed `add_config_arguments` options."""
    overrides = {key[len("cfg__"):]: value for key, value in vars(args).items()
                 if key.startswith("cfg__") and value is not None}
    return load_config(getattr(args, "config", None), overrides, getattr(args, "preset", None))


def fields_table() -> str:
    """A Markdown table of the fields, their types and defaults (for docs/pretrain.md)."""
    defaults = PretrainConfig()
    rows = ["| field | type | default |", "|---|---|---|"]
    for name in FIELD_NAMES:
        rows.append(f"| `{name}` | {_type_name(*_base_type(_HINTS[name]))} | `{getattr(defaults, name)!r}` |")
    return "\n".join(rows)
