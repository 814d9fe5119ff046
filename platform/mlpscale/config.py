"""The pretraining run config: one typed dataclass, presets, YAML files, CLI overrides and validation.

Precedence: dataclass defaults < preset < YAML file < overrides. Every field can be set
from the command line as `--field-name value` (argparse is generated from the fields, each
option's help from the field's description); the machinery is config_fields.py's.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mlpscale import config_fields
from mlpscale.config_fields import (
    RunConfig,
    apply,
    check_choices,
    check_range,
    field_choices,
    field_names,
    read_yaml,
    save_yaml,  # noqa: F401  (this module's API too: writes a config that load_config reads back)
    setting,
)
from mlpscale.data.choices import DEFAULT_RESOLUTIONS, TRAINING_ORDERS
from mlpscale.errors import MlpscaleError
from mlpscale.model_choices import ACTIVATIONS, NORMALIZATIONS
from mlpscale.train.choices import OPTIMIZERS, PRECISIONS, SCHEDULES


@dataclass
class PretrainConfig(RunConfig):
    """Everything one pretraining run needs; the defaults are the small CPU run on the bundled digits."""

    # model
    arch: str = setting(
        "B_4-Wi_256", "architecture: B_<depth>-Wi_<width> (inverted bottleneck) or S_<depth>-Wi_<width> (standard)"
    )
    expansion: int = setting(4, "a B-block's hidden width is expansion * width; S-MLPs ignore it")
    activation: str = setting("gelu", "activation inside each block", choices=ACTIVATIONS)
    normalization: str = setting(
        "layer", "norm at the start of each block: LayerNorm, BatchNorm or none", choices=NORMALIZATIONS
    )
    dropout: float = setting(0.0, "dropout after each block's activation (and after a B-block's second linear)")
    # data
    dataset: str = setting("digits", "converted dataset to train on (digits, cifar10, cifar100, imagenet64, folder)")
    data_dir: str | None = setting(
        None, "root of the converted datasets; none: $MLPSCALE_DATA, else data/ at the repo root"
    )
    resolution: int | None = setting(
        None,
        "image side in px (the res<R> files read); none: the dataset's default "
        "(digits 16, cifar 32, imagenet64 and folder 64)",
    )
    n_train: int | None = setting(
        None, "training examples: the nested subset train_n<N>.beton; none: the whole train split"
    )
    crop_scale: tuple[float, float] = setting(
        (0.5, 1.0), "random resized crop: range of the crop's area as a fraction of the image"
    )
    crop_ratio: tuple[float, float] = setting(
        (0.75, 4.0 / 3.0), "random resized crop: range of the crop's aspect ratio"
    )
    flip: bool = setting(False, "random horizontal flips of the training images")
    mixup_alpha: float = setting(0.0, "MixUp: mixing weights drawn from Beta(alpha, alpha); 0: off")
    order: str = setting(
        "random",
        "training order: random (a new permutation each epoch) or quasi_random (FFCV's "
        "page-wise shuffle from a process cache, for data larger than RAM; one worker "
        "only)",
        choices=TRAINING_ORDERS,
    )
    loader_workers: int | None = setting(
        None,
        "FFCV decoder threads per worker; none: 1 on a CPU (the training "
        "step's threads have the cores), the worker's CPUs on a GPU",
    )
    # optimisation
    epochs: int = setting(20, "passes over the training set")
    batch_size: int = setting(128, "effective batch of one optimizer step, over all workers and accumulation steps")
    accumulation_steps: int = setting(
        1,
        "micro-batches whose gradients are summed before each optimizer step "
        "(each of batch_size / (accumulation_steps * num_workers) per worker)",
    )
    optimizer: str = setting(
        "lion", "LION, AdamW or SGD (Nesterov momentum); biases and norms get no weight decay", choices=OPTIMIZERS
    )
    lr: float = setting(1e-3, "peak learning rate (the schedule scales it)")
    weight_decay: float = setting(0.0, "the optimizer's weight decay, on weight matrices only")
    momentum: float = setting(0.9, "SGD's momentum (Nesterov when above 0); lion and adamw ignore it")
    label_smoothing: float = setting(0.0, "label smoothing of the cross-entropy loss, in [0, 1)")
    grad_clip: float = setting(0.0, "clip the gradients' global norm to this before each step; 0: no clipping")
    schedule: str = setting(
        "warmup_cosine",
        "learning rate per optimizer step: none (constant), cosine (to zero), "
        "warmup_cosine (linear warm-up, then cosine)",
        choices=SCHEDULES,
    )
    warmup_epochs: float = setting(
        1.0,
        "length of warmup_cosine's linear warm-up in epochs (fractions allowed, "
        "rounded to steps); the other schedules ignore it",
    )
    # execution
    num_workers: int = setting(1, "Ray Train workers (DDP ranks, one GPU each on GPUs), each reading its own shard")
    use_gpu: bool | None = setting(None, "train on GPUs; none: when the Ray cluster has one (--dry-run: this machine)")
    precision: str = setting(
        "auto",
        "bf16 autocast or fp32; auto: bf16 where it is native (Ampere+ GPUs, CPUs with avx512_bf16 or AMX)",
        choices=PRECISIONS,
    )
    compile: bool = setting(False, "torch.compile the model for training")
    seed: int = setting(0, "seed of the initialisation (plus the rank) and of crops, flips, order and MixUp")
    checkpoint_every: int = setting(1, "rank 0 writes a checkpoint every this many epochs, and after the last")
    keep_checkpoints: int = setting(2, "checkpoints Ray Train keeps: the newest this many")
    max_failures: int = setting(
        2,
        "restarts of the worker group after a worker fails, from the last checkpoint into "
        "the same MLflow run (a sweep trial uses --trial-retries instead)",
    )
    storage_path: str | None = setting(
        None,
        "where Ray Train and Tune keep runs and checkpoints, a path every node "
        "sees (no URIs); none: <repo>/ray_results",
    )
    # tracking
    experiment: str = setting("mlpscale", "MLflow experiment of the run")
    run_name: str | None = setting(
        None,
        "Ray Train run name (a folder under storage_path; --resume continues it) "
        "and MLflow run name; none: pretrain-<dataset>-<arch>-<time>",
    )
    tracking_uri: str | None = setting(
        None, "MLflow tracking URI; none: $MLFLOW_TRACKING_URI, else sqlite mlflow.db at the repo root"
    )
    register: str | None = setting(
        None, "also register the final model in the MLflow model registry under this name; none: only log it"
    )
    log_model: bool = setting(
        True,
        "log the final model to the MLflow run at the end; false: none (checkpoints "
        "and the run record stay; nothing to register)",
    )

    @property
    def image_resolution(self) -> int:
        """The resolution to train at: the explicit one or the dataset's default."""
        if self.resolution:
            return int(self.resolution)
        return DEFAULT_RESOLUTIONS.get(self.dataset, 64)


PRESETS: dict[str, dict[str, Any]] = {
    # Paper section 4 (training from scratch): LION lr 5e-5, label smoothing 0.3, MixUp.
    "from-scratch": {
        "dataset": "cifar10",
        "arch": "B_12-Wi_1024",
        "optimizer": "lion",
        "lr": 5e-5,
        "label_smoothing": 0.3,
        "mixup_alpha": 0.8,
        "flip": True,
        "crop_scale": (0.08, 1.0),
        "batch_size": 1024,
        "epochs": 500,
        "schedule": "warmup_cosine",
        "warmup_epochs": 10,
    },
    # Paper appendix A.4 (ImageNet-21k pretraining for the scaling laws): batch 16384, LION lr 1e-5,
    # weight decay 1e-3, label smoothing 0.3, MixUp 0.8, flips and crops. The whole batch fits one
    # 24 GB card (paper sec. 6; B_12-Wi_1024 is estimated at ~9 GiB); raise accumulation_steps for
    # smaller cards.
    "in21k": {
        "dataset": "imagenet64",
        "arch": "B_12-Wi_1024",
        "optimizer": "lion",
        "lr": 1e-5,
        "weight_decay": 1e-3,
        "label_smoothing": 0.3,
        "mixup_alpha": 0.8,
        "flip": True,
        "crop_scale": (0.08, 1.0),
        "batch_size": 16384,
        "accumulation_steps": 1,
        "epochs": 800,
        "schedule": "warmup_cosine",
        "warmup_epochs": 5,
        "grad_clip": 1.0,
    },
}

CHOICES: dict[str, tuple[str, ...]] = field_choices(PretrainConfig)
FIELD_NAMES = field_names(PretrainConfig)
POSITIVE = (
    "expansion",
    "epochs",
    "batch_size",
    "accumulation_steps",
    "num_workers",
    "checkpoint_every",
    "keep_checkpoints",
    "lr",
)
NON_NEGATIVE = (
    "weight_decay",
    "momentum",
    "grad_clip",
    "warmup_epochs",
    "mixup_alpha",
    "max_failures",
    "seed",
    "dropout",
    "label_smoothing",
)


def validate(cfg: PretrainConfig) -> PretrainConfig:
    """Check choices and ranges; raises MlpscaleError naming the key, the value and what is allowed."""
    check_choices(cfg)
    check_range(cfg, "positive", *POSITIVE)
    check_range(cfg, "non_negative", *NON_NEGATIVE)
    check_range(cfg, "positive_or_none", "resolution", "n_train", "loader_workers")
    check_range(cfg, "fraction", "label_smoothing", "dropout")
    check_range(cfg, "scale_range", "crop_scale")
    check_range(cfg, "ratio_range", "crop_ratio")
    if cfg.warmup_epochs >= cfg.epochs and cfg.schedule == "warmup_cosine":
        raise MlpscaleError(f"warmup_epochs={cfg.warmup_epochs} must be smaller than epochs={cfg.epochs}")
    per_step = cfg.accumulation_steps * cfg.num_workers
    if cfg.batch_size % per_step:
        raise MlpscaleError(
            f"batch_size={cfg.batch_size} must be divisible by accumulation_steps*num_workers={per_step} "
            f"(each worker steps on micro-batches of batch_size/(accumulation_steps*num_workers))"
        )
    if not cfg.arch or not isinstance(cfg.arch, str):
        raise MlpscaleError("arch must name an architecture such as B_6-Wi_256")
    if not cfg.experiment:
        raise MlpscaleError("experiment must not be empty")
    return cfg


def load_config(
    path: str | os.PathLike | None = None, overrides: Mapping[str, Any] | None = None, preset: str | None = None
) -> PretrainConfig:
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


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """`--config`, `--preset` and one `--field-name` option per config field (default: unset)."""
    parser.add_argument("--config", help="YAML file of config fields (written by save_yaml or by hand)")
    parser.add_argument("--preset", help=f"paper recipe: {', '.join(PRESETS)}")
    config_fields.add_field_arguments(
        parser, PretrainConfig, title="config fields (override the preset and the --config file)"
    )


def user_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The fields the user set with parsed `add_config_arguments` options: the --config file's values, then the
    --field options' (which win); typed, unknown keys rejected. The preset is not among them."""
    return config_fields.user_overrides(args, PretrainConfig)


def config_from_args(args: argparse.Namespace) -> PretrainConfig:
    """The validated config from parsed `add_config_arguments` options."""
    return load_config(overrides=user_overrides(args), preset=getattr(args, "preset", None))


def fields_table() -> str:
    """The Markdown table of the fields (docs/pretrain.md holds it; `python -m mlpscale.config_fields` rewrites it)."""
    return config_fields.fields_table(PretrainConfig)
