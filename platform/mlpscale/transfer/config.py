"""The transfer run config: fine-tuning or linear probing a pretrained MLP on a downstream dataset.

Precedence: dataclass defaults < YAML file < overrides < per-mode defaults (paper section 4.2 and
appendix A.3), which fill only the fields left at None. The machinery (coercion, options, YAML,
field table) is config_fields.py's, as for the pretrain config.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from mlpscale import config_fields
from mlpscale.config_fields import RunConfig, apply, check_choices, check_range, read_yaml, setting
from mlpscale.errors import MlpscaleError
from mlpscale.train.choices import OPTIMIZERS, PRECISIONS, SCHEDULES

MODES = ("finetune", "linear")
# No warmup_epochs here, so warmup_cosine would run as plain cosine: it is not offered.
TRANSFER_SCHEDULES = tuple(schedule for schedule in SCHEDULES if schedule != "warmup_cosine")

# Paper section 4.2 (fine-tuning: SGD with momentum, head 0.01, body 0.001, 50 epochs) and
# appendix A.3 (linear probe: LION lr 1e-5 for 50 epochs, body frozen).
MODE_DEFAULTS: dict[str, dict[str, Any]] = {
    "finetune": {"optimizer": "sgd", "lr_head": 0.01, "lr_body": 0.001, "augment": True},
    "linear": {"optimizer": "lion", "lr_head": 1e-5, "lr_body": 0.0, "augment": False},
}
JOB_TAGS = {"finetune": "finetune", "linear": "linear_probe"}


@dataclass
class TransferConfig(RunConfig):
    """One downstream run; `source` names the pretrained model, the rest comes from its run."""

    label: ClassVar[str] = "transfer config"

    source: str = setting(
        "",
        "the pretrained model: an MLflow run id, models:/name/version, models:/name@alias, "
        "name@alias, models:/m-<id> or a pretrain checkpoint directory",
    )
    dataset: str = setting("cifar10", "converted downstream dataset (e.g. cifar10, cifar100, imagenet64)")
    mode: str = setting(
        "finetune",
        "finetune: a new head and the whole model trained; linear: a new head on the frozen body",
        choices=MODES,
    )
    data_dir: str | None = setting(
        None, "root of the converted datasets; none: $MLPSCALE_DATA, else data/ at the repo root"
    )
    data_resolution: int | None = setting(
        None,
        "stored resolution to read; none: the model's, else the largest stored one below it (upscaled to the model's)",
    )
    n_train: int | None = setting(
        None, "training examples: the nested subset train_n<N>.beton; none: the whole train split"
    )
    # optimisation (None: the mode's default)
    epochs: int = setting(50, "passes over the downstream training set")
    batch_size: int = setting(256, "examples per optimizer step (at most the training set)")
    optimizer: str | None = setting(
        None, "optimizer of head and body; biases and norms get no weight decay", choices=OPTIMIZERS
    )
    lr_head: float | None = setting(None, "learning rate of the new head")
    lr_body: float | None = setting(None, "learning rate of the pretrained body (mode linear: 0, it is frozen)")
    momentum: float = setting(0.9, "SGD's momentum; lion and adamw ignore it")
    weight_decay: float = setting(0.0, "the optimizer's weight decay, on weight matrices only")
    label_smoothing: float = setting(0.0, "label smoothing of the cross-entropy loss, in [0, 1)")
    mixup_alpha: float = setting(
        0.0, "MixUp: mixing weights drawn from Beta(alpha, alpha); 0: off (mode linear: needs augment)"
    )
    schedule: str = setting(
        "cosine",
        "both learning rates per optimizer step: none (constant) or cosine (to zero); no warm-up",
        choices=TRANSFER_SCHEDULES,
    )
    # augmentation while training (None: on for finetune, off for linear, which then caches features)
    augment: bool | None = setting(
        None,
        "train on random crops (and flips) of the images; off: the whole images, "
        "and a linear probe computes the body's features once and caches them",
    )
    crop_scale: tuple[float, float] = setting(
        (0.35, 1.0), "random resized crop: range of the crop's area as a fraction of the image (with augment)"
    )
    crop_ratio: tuple[float, float] = setting(
        (0.75, 4.0 / 3.0), "random resized crop: range of the crop's aspect ratio (with augment)"
    )
    flip: bool = setting(True, "random horizontal flips (with augment)")
    # evaluation
    tta: int = setting(
        0,
        "test-time augmentation after training: logits averaged over this many random crops of "
        "each test image -> val_top1_tta; 0: off",
    )
    tta_scale: tuple[float, float] = setting(
        (0.35, 1.0), "TTA crops: range of the crop's area as a fraction of the image"
    )
    tta_ratio: tuple[float, float] = setting((0.75, 4.0 / 3.0), "TTA crops: range of the crop's aspect ratio")
    tta_flip: bool = setting(False, "TTA crops are also flipped at random")
    real_labels: str | None = setting(
        None,
        "JSON file of the acceptable labels of each test image, in stored order "
        "(ImageNet-ReaL) -> val_real_top1; none: not evaluated",
    )
    # execution
    loader_workers: int | None = setting(None, "FFCV decoder threads; none: 1 on a CPU, torch's thread count on a GPU")
    precision: str = setting(
        "auto",
        "bf16 autocast or fp32; auto: bf16 where it is native (Ampere+ GPUs, CPUs with avx512_bf16 or AMX)",
        choices=PRECISIONS,
    )
    device: str = setting("auto", "torch device to train on (cpu, cuda, cuda:1, ...); auto: a GPU when one is visible")
    seed: int = setting(0, "seed of the new head and of crops, flips, order, MixUp and TTA crops")
    # tracking
    experiment: str = setting("transfer", "MLflow experiment of the run")
    run_name: str | None = setting(None, "MLflow run name; none: <finetune|linear_probe>-<arch>-<dataset>")
    tracking_uri: str | None = setting(
        None, "MLflow tracking URI; none: $MLFLOW_TRACKING_URI, else sqlite mlflow.db at the repo root"
    )
    register: str | None = setting(
        None, "also register the logged model in the MLflow model registry under this name; none: only log it"
    )
    log_model: bool = setting(
        True, "log the trained model to the MLflow run at the end; false: no model (and nothing to register)"
    )

    @property
    def job(self) -> str:
        """The mlpscale.job tag: finetune or linear_probe."""
        return JOB_TAGS[self.mode]


def resolve_mode_defaults(cfg: TransferConfig) -> TransferConfig:
    """Fill the fields left at None with the mode's defaults."""
    if cfg.mode not in MODES:
        raise MlpscaleError(f"mode={cfg.mode!r} is not allowed; choose one of: {', '.join(MODES)}")
    defaults = MODE_DEFAULTS[cfg.mode]
    return dataclasses.replace(cfg, **{key: value for key, value in defaults.items() if getattr(cfg, key) is None})


def validate(cfg: TransferConfig) -> TransferConfig:
    """Choices and ranges; raises MlpscaleError naming the key, the value and what is allowed."""
    if not cfg.source:
        raise MlpscaleError(
            "source is empty; pass --source RUN_ID, models:/name/version, name@alias or a checkpoint directory"
        )
    if not cfg.dataset:
        raise MlpscaleError("dataset is empty; pass --dataset with a converted dataset (e.g. cifar10)")
    check_choices(cfg)
    check_range(cfg, "positive", "epochs", "batch_size", "lr_head")
    check_range(cfg, "non_negative", "lr_body", "momentum", "weight_decay", "mixup_alpha", "tta", "seed")
    check_range(cfg, "positive_or_none", "n_train", "data_resolution", "loader_workers")
    check_range(cfg, "fraction", "label_smoothing")
    check_range(cfg, "scale_range", "crop_scale", "tta_scale")
    check_range(cfg, "ratio_range", "crop_ratio", "tta_ratio")
    if cfg.mode == "linear" and cfg.lr_body:
        raise MlpscaleError(
            f"lr_body={cfg.lr_body} with mode=linear: the body is frozen; leave lr_body unset or use mode=finetune"
        )
    if cfg.mixup_alpha and cfg.mode == "linear" and not cfg.augment:
        raise MlpscaleError(
            "mixup_alpha > 0 needs augment=true with mode=linear (cached features are computed once, without MixUp)"
        )
    return cfg


def load_transfer_config(
    path: str | os.PathLike | None = None, overrides: Mapping[str, Any] | None = None
) -> TransferConfig:
    """Defaults, then the YAML file, then the overrides, then the mode's defaults; validated."""
    cfg = TransferConfig()
    if path:
        cfg = apply(cfg, read_yaml(path))
    if overrides:
        cfg = apply(cfg, overrides)
    return validate(resolve_mode_defaults(cfg))


def _default_text(name: str, value: Any) -> str:
    """A field's default as --help and the table say it: a mode default names both modes'."""
    if name in MODE_DEFAULTS["linear"]:
        return f"{MODE_DEFAULTS['finetune'][name]!r} (finetune; linear: {MODE_DEFAULTS['linear'][name]!r})"
    return repr(value)


def add_transfer_arguments(parser: argparse.ArgumentParser) -> None:
    """`--config` and one `--field-name` option per field (unset by default: the file's or mode's value)."""
    parser.add_argument("--config", help="YAML file of transfer config fields")
    config_fields.add_field_arguments(
        parser, TransferConfig, default_text=_default_text, title="transfer config fields (override the --config file)"
    )


def config_from_args(args: argparse.Namespace) -> TransferConfig:
    """The validated config from parsed `add_transfer_arguments` options."""
    return load_transfer_config(overrides=config_fields.user_overrides(args, TransferConfig))


def fields_table() -> str:
    """The Markdown table of the fields (docs/transfer.md holds it; `python -m mlpscale.config_fields` rewrites it)."""
    return config_fields.fields_table(TransferConfig, _default_text)
