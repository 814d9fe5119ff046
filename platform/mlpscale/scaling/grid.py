"""Scaling grids: every (architecture, training-subset size) pair one trial of a Ray Tune grid sweep.

The grid is the tune helper's sweep (tune/sweep.py) with a generated space of two grid entries
(arch x n_train), one sample per point, so it is tracked, resumable and concurrent like any sweep:
one GPU per trial on a GPU cluster, the CPUs shared otherwise. Missing nested subsets are created
first. With a constant learning rate (schedule none, the presets' choice) every logged epoch of a
trial is a point (C, error) for jobs/fit_scaling_laws.py --sweep <sweep id>.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mlpscale.config import PRESETS as CONFIG_PRESETS
from mlpscale.config import PretrainConfig, apply, validate
from mlpscale.errors import MlpscaleError
from mlpscale.paths import dataset_dir

log = logging.getLogger(__name__)

# Paper section 4.3 / appendix A.4: Table 3's models on ImageNet-21k subsets, LION lr 1e-5, wd 1e-3,
# label smoothing 0.3, MixUp 0.8, batch 16384, T up to 800. The paper does not list its subset sizes:
# these span 100k..10M of the ~12M images (at least a few full batches of 16384 per epoch).
# A constant LR makes every epoch a valid point of the study.
PAPER_ARCHS = ("B_6-Wi_256", "B_12-Wi_256", "B_6-Wi_512", "B_12-Wi_512", "B_6-Wi_1024", "B_12-Wi_1024")
PAPER_N_TRAIN = (100_000, 300_000, 1_000_000, 3_000_000, 10_000_000)

GRID_PRESETS: dict[str, dict[str, Any]] = {
    "paper": {
        "archs": PAPER_ARCHS,
        "n_train": PAPER_N_TRAIN,
        "config": {
            **CONFIG_PRESETS["in21k"],
            "epochs": 800,
            "schedule": "none",
            "warmup_epochs": 0.0,
            "experiment": "scaling-paper",
        },
    },
    # Tiny models on the bundled digits (16 px): 16 trials that finish on a 2-core machine in minutes
    # and give every law of the fit job enough model sizes, data sizes and epochs.
    "cpu-demo": {
        "archs": ("B_1-Wi_16", "B_1-Wi_32", "B_2-Wi_64", "B_2-Wi_128"),
        "n_train": (150, 300, 600, 1200),
        "config": {
            "dataset": "digits",
            "resolution": 16,
            "epochs": 6,
            "batch_size": 32,
            "lr": 1e-3,
            "optimizer": "lion",
            "schedule": "none",
            "warmup_epochs": 0.0,
            "label_smoothing": 0.1,
            "mixup_alpha": 0.0,
            "crop_scale": (0.6, 1.0),
            "loader_workers": 1,
            "precision": "fp32",
            "keep_checkpoints": 1,
            "experiment": "scaling-demo",
        },
    },
}


@dataclass
class GridPlan:
    """What the grid trains: the base config (epochs, dataset, recipe) and the two grid axes."""

    base: PretrainConfig
    archs: list[str]
    n_train: list[int]

    @property
    def size(self) -> int:
        return len(self.archs) * len(self.n_train)


def parse_list(text: str | list | tuple | None, what: str, cast=str) -> list:
    """A comma-separated CLI list (or a sequence) as a list; MlpscaleError naming a bad item."""
    if text is None:
        return []
    items = [s.strip() for s in text.split(",")] if isinstance(text, str) else list(text)
    out = []
    for item in items:
        if item == "":
            continue
        try:
            out.append(cast(float(item)) if cast is int else cast(item))
        except (TypeError, ValueError):
            raise MlpscaleError(
                f"--{what} item {item!r} is not valid; give a comma-separated list, "
                f"e.g. --{what} {'1000,10000' if cast is int else 'B_6-Wi_256,B_12-Wi_256'}"
            ) from None
    return out


def plan_grid(
    *, preset: str | None = None, archs=None, n_train=None, overrides: dict[str, Any] | None = None
) -> GridPlan:
    """Preset < explicit axes and config overrides; every arch parsed and every subset size checked."""
    from mlpscale.models import parse_arch

    if preset is not None and preset not in GRID_PRESETS:
        raise MlpscaleError(f"unknown grid preset {preset!r}; choose one of: {', '.join(GRID_PRESETS)}")
    chosen = GRID_PRESETS.get(preset, {}) if preset else {}
    base = apply(
        PretrainConfig(), {**chosen.get("config", {"schedule": "none", "warmup_epochs": 0.0}), **(overrides or {})}
    )
    base = validate(base)
    arch_list = parse_list(archs, "archs") or list(chosen.get("archs", ()))
    sizes = parse_list(n_train, "n-train", int) or list(chosen.get("n_train", ()))
    if not arch_list or not sizes:
        raise MlpscaleError(
            f"a scaling grid needs --archs A,B,... and --n-train N1,N2,... (or --preset {'/'.join(GRID_PRESETS)})"
        )
    for arch in arch_list:
        parse_arch(arch)  # MlpscaleError naming the bad name
    if any(n <= 0 for n in sizes):
        raise MlpscaleError(f"--n-train {sizes} must be positive subset sizes")
    if len(set(arch_list)) != len(arch_list) or len(set(sizes)) != len(sizes):
        raise MlpscaleError("--archs and --n-train must not repeat a value")
    too_small = [n for n in sizes if n < base.batch_size]
    if too_small:
        raise MlpscaleError(
            f"n_train {too_small} smaller than batch_size={base.batch_size}: every epoch needs at "
            f"least one full batch; pass --batch-size {min(sizes)} or larger subsets"
        )
    return GridPlan(base, arch_list, sorted(sizes))


def ensure_subsets(plan: GridPlan) -> list[Path]:
    """Create the missing nested subsets (the bundled digits are converted first when absent)."""
    from mlpscale.data.meta import load_meta
    from mlpscale.data.prepare import add_subsets, prepare_dataset

    base = plan.base
    resolution = base.image_resolution
    directory = dataset_dir(base.dataset, resolution, base.data_dir)
    if base.dataset == "digits" and not (directory / "meta.json").is_file():
        log.info("converting the bundled digits at %d px into %s", resolution, directory)
        prepare_dataset("digits", data_dir=base.data_dir, resolution=resolution)
    meta = load_meta(directory)  # names the prepare_data command when the dataset is not converted
    available = int(meta["counts"]["train"])
    too_big = [n for n in plan.n_train if n > available]
    if too_big:
        raise MlpscaleError(
            f"--n-train {too_big} exceed the {available} training examples of {base.dataset} "
            f"in {directory}; choose sizes up to {available}"
        )
    return add_subsets(base.dataset, resolution, plan.n_train, data_dir=base.data_dir)


def write_space(plan: GridPlan, path: Path) -> Path:
    """The grid as a search-space YAML the sweep driver reads."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "# scaling grid: every (arch, n_train) pair is one trial\n"
        + yaml.safe_dump(
            {
                "arch": {"distribution": "grid", "values": list(plan.archs)},
                "n_train": {"distribution": "grid", "values": [int(n) for n in plan.n_train]},
            },
            sort_keys=False,
        )
    )
    return path


def run_scaling_grid(
    plan: GridPlan | None,
    *,
    name: str | None = None,
    storage_path: str | None = None,
    max_concurrent: int | None = None,
    resume: bool = False,
):
    """Run (or resume, by --name) the grid as a sweep; returns the tune helper's SweepResult."""
    from mlpscale.tune.sweep import SweepOptions, run_sweep, storage_root

    if resume:
        options = SweepOptions(space="", name=name, storage_path=storage_path, max_concurrent=max_concurrent)
        return run_sweep(PretrainConfig(), options, resume=True)
    if plan is None:
        raise MlpscaleError("no grid to run: give --archs and --n-train or --preset")
    ensure_subsets(plan)
    name = name or f"scaling-grid-{time.strftime('%Y%m%d-%H%M%S')}"
    options = SweepOptions(
        space="",
        num_samples=1,
        max_concurrent=max_concurrent,
        metric="val_top1",
        mode="max",
        name=name,
        storage_path=storage_path,
    )
    options.space = str(write_space(plan, storage_root(options) / "grid-spaces" / f"{name}.yaml"))
    log.info(
        "scaling grid %s: %d archs x %d subset sizes = %d trials, %d epochs each",
        name,
        len(plan.archs),
        len(plan.n_train),
        plan.size,
        plan.base.epochs,
    )
    return run_sweep(plan.base, options)
