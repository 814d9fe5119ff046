"""The transfer run config: fine-tuning or linear probing a pretrained MLP on a downstream dataset.

Precedence: dataclass defaults < per-mode defaults (paper section 4.2 and appendix A.3)
< YAML file < overrides. Fields left at None take their mode's default.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, fields
from typing import Any, Mapping

from mlpscale.config import _base_type, coerce_field, read_yaml
from mlpscale.errors import MlpscaleError

MODES = ("finetune", "linear")
OPTIMIZERS = ("sgd", "lion", "adamw")
SCHEDULES = ("none", "cosine")
PRECISIONS = ("auto", "bf16", "fp32")

# Paper section 4.2 (fine-tuning: SGD with momentum, head 0.01, body 0.001, 50 epochs) and
# appendix A.3 (linear probe: LION lr 1e-5 for 50 epochs, body frozen).
MODE_DEFAULTS: dict[str, dict[str, Any]] = {
    "finetune": {"optimizer": "sgd", "lr_head": 0.01, "lr_body": 0.001, "augment": True},
    "linear": {"optimizer": "lion", "lr_head": 1e-5, "lr_body": 0.0, "augment": False},
}
JOB_TAGS = {"finetune": "finetune", "linear": "linear_probe"}


@dataclass
class TransferConfig:
    """One downstream run; `source` names the pretrained model, the rest comes from its run."""

    source: str = ""
    dataset: str = "cifar10"
    mode: str = "finetune"
    data_dir: str | None = None
    data_resolution: int | None = None
    n_train: int | None = None
    # optimisation (None: the mode's default)
    epochs: int = 50
    batch_size: int = 256
    optimizer: str | None = None
    lr_head: float | None = None
    lr_body: float | None = None
    momentum: float = 0.9
    weight_decay: float = 0.0
    label_smoothing: float = 0.0
    mixup_alpha: float = 0.0
    schedule: str = "cosine"
    # augmentation while training (None: on for finetune, off for linear, which then caches features)
    augment: bool | None = None
    crop_scale: tuple[float, float] = (0.35, 1.0)
    crop_ratio: tuple[float, float] = (0.75, 4.0 / 3.0)
    flip: bool = True
    # evaluation
    tta: int = 0
    tta_scale: tuple[float, float] = (0.35, 1.0)
    tta_ratio: tuple[float, float] = (0.75, 4.0 / 3.0)
    tta_flip: bool = False
    real_labels: str | None = None
    # execution
    loader_workers: int | None = None  # decoder threads; none: 1 on CPU, all of the process's on a GPU
    precision: str = "auto"
    device: str = "auto"
    seed: int = 0
    # tracking
    experiment: str = "transfer"
    run_name: str | None = None
    tracking_uri: str | None = None
    register: str | None = None
    log_model: bool = True

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        return {key: list(value) if isinstance(value, tuple) else value for key, value in out.items()}

    @property
    def job(self) -> str:
        """The mlpscale.job tag: finetune or linear_probe."""
        return JOB_TAGS[self.mode]


FIELD_NAMES = tuple(f.name for f in fields(TransferConfig))
_HINTS = typing.get_type_hints(TransferConfig)


def coerce_value(key: str, value: Any) -> Any:
    """A YAML/CLI value converted to the field's type; MlpscaleError naming the key when it cannot be."""
    return coerce_field(TransferConfig, key, value, label="transfer config")


def apply(cfg: TransferConfig, values: Mapping[str, Any]) -> TransferConfig:
    """A copy of `cfg` with `values` (keys may use - or _) coerced and set; unknown keys rejected."""
    changes = {str(key).replace("-", "_"): value for key, value in values.items()}
    return dataclasses.replace(cfg, **{key: coerce_value(key, value) for key, value in changes.items()})


def resolve_mode_defaults(cfg: TransferConfig) -> TransferConfig:
    """Fill the fields left at None with the mode's defaults."""
    if cfg.mode not in MODES:
        raise MlpscaleError(f"mode={cfg.mode!r} is not allowed; choose one of: {', '.join(MODES)}")
    defaults = MODE_DEFAULTS[cfg.mode]
    return dataclasses.replace(cfg, **{key: value for key, value in defaults.items() if getattr(cfg, key) is None})


def validate(cfg: TransferConfig) -> TransferConfig:
    """Choices and ranges; raises MlpscaleError naming the key, the value and what is allowed."""
    if not cfg.source:
        raise MlpscaleError("source is empty; pass --source RUN_ID, models:/name/version, name@alias "
                            "or a checkpoint directory")
    if not cfg.dataset:
        raise MlpscaleError("dataset is empty; pass --dataset with a converted dataset (e.g. cifar10)")
    for key, allowed in (("mode", MODES), ("optimizer", OPTIMIZERS), ("schedule", SCHEDULES),
                         ("precision", PRECISIONS)):
        if getattr(cfg, key) not in allowed:
            raise MlpscaleError(f"{key}={getattr(cfg, key)!r} is not allowed; choose one of: {', '.join(allowed)}")
    for key in ("epochs", "batch_size", "lr_head"):
        if not getattr(cfg, key) > 0:
            raise MlpscaleError(f"{key}={getattr(cfg, key)!r} must be positive")
    for key in ("lr_body", "momentum", "weight_decay", "mixup_alpha", "tta", "seed"):
        if getattr(cfg, key) < 0:
            raise MlpscaleError(f"{key}={getattr(cfg, key)!r} must be >= 0")
    for key in ("n_train", "data_resolution", "loader_workers"):
        if getattr(cfg, key) is not None and getattr(cfg, key) <= 0:
            raise MlpscaleError(f"{key}={getattr(cfg, key)!r} must be positive (or none for the default)")
    if not 0 <= cfg.label_smoothing < 1:
        raise MlpscaleError(f"label_smoothing={cfg.label_smoothing} must be in [0, 1)")
    for key in ("crop_scale", "tta_scale"):
        low, high = getattr(cfg, key)
        if not 0 < low <= high <= 1:
            raise MlpscaleError(f"{key}={list(getattr(cfg, key))} must satisfy 0 < low <= high <= 1")
    for key in ("crop_ratio", "tta_ratio"):
        low, high = getattr(cfg, key)
        if not 0 < low <= high:
            raise MlpscaleError(f"{key}={list(getattr(cfg, key))} must satisfy 0 < low <= high")
    if cfg.mode == "linear" and cfg.lr_body:
        raise MlpscaleError(f"lr_body={cfg.lr_body} with mode=linear: the body is frozen; "
                            "leave lr_body unset or use mode=finetune")
    if cfg.mixup_alpha and cfg.mode == "linear" and not cfg.augment:
        raise MlpscaleError("mixup_alpha > 0 needs augment=true with mode=linear "
                            "(cached features are computed once, without MixUp)")
    return cfg


def load_transfer_config(path: str | os.PathLike | None = None,
                         overrides: Mapping[str, Any] | None = None) -> TransferConfig:
    """Defaults, then the YAML file, then the overrides, then the mode's defaults; validated."""
    cfg = TransferConfig()
    if path:
        cfg = apply(cfg, read_yaml(path))
    if overrides:
        cfg = apply(cfg, overrides)
    return validate(resolve_mode_defaults(cfg))


def add_transfer_arguments(parser) -> None:
    """`--config` and one `--field-name` option per field (unset by default: the file's or mode's value)."""
    parser.add_argument("--config", help="YAML file of transfer config fields")
    defaults = TransferConfig()
    for name in FIELD_NAMES:
        kind, _ = _base_type(_HINTS[name])
        flags = ["--" + name.replace("_", "-")] + (["--" + name] if "_" in name else [])
        default = MODE_DEFAULTS["finetune"].get(name, getattr(defaults, name))
        help_text = f"default {default!r}" + (" (finetune; linear: "
                                              f"{MODE_DEFAULTS['linear'][name]!r})" if name in MODE_DEFAULTS["linear"]
                                              else "")
        parser.add_argument(*flags, dest=f"cfg__{name}", nargs=2 if kind is tuple else None, default=None,
                            metavar=name.upper(), help=help_text)


def config_from_args(args) -> TransferConfig:
    overrides = {key[len("cfg__"):]: value for key, value in vars(args).items()
                 if key.startswith("cfg__") and value is not None}
    return load_transfer_config(getattr(args, "config", None), overrides)
