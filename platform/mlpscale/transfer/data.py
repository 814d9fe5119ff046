"""The downstream dataset of a transfer run, mapped to the source model's input resolution.

A dataset is read at the stored resolution equal to the model's, else at the largest stored
one below it and upscaled in the loader (CIFAR's 32 px to the paper's 64 px). A dataset stored
only above the model's resolution is not mapped: convert it at the model's resolution.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlpscale.data.meta import load_meta
from mlpscale.errors import MlpscaleError
from mlpscale.paths import data_dir, dataset_dir, split_path


@dataclass
class DownstreamData:
    dataset: str
    directory: Path
    stored_resolution: int
    resolution: int
    meta: dict[str, Any]
    train_path: Path
    test_path: Path
    n_train: int

    @property
    def num_classes(self) -> int:
        return int(self.meta["num_classes"])

    @property
    def n_test(self) -> int:
        return int(self.meta["counts"]["test"])


def stored_resolutions(dataset: str, root: str | None = None) -> list[int]:
    """The resolutions at which `dataset` has a complete conversion (meta.json present), ascending."""
    folder = data_dir(root) / dataset
    found = []
    for child in folder.glob("res*") if folder.is_dir() else []:
        if child.name[3:].isdigit() and (child / "meta.json").is_file():
            found.append(int(child.name[3:]))
    return sorted(found)


def pick_resolution(dataset: str, model_resolution: int, stored: list[int], requested: int | None = None) -> int:
    """The stored resolution to read (see module docstring); MlpscaleError when none maps."""
    convert = f"`python jobs/prepare_data.py {dataset} --resolution {model_resolution}`"
    if requested is not None:
        if requested not in stored:
            raise MlpscaleError(
                f"data_resolution={requested}: {dataset} is not converted at {requested} px "
                f"(stored: {stored or 'none'}); convert it with "
                f"`python jobs/prepare_data.py {dataset} --resolution {requested}`"
            )
        return requested
    if not stored:
        raise MlpscaleError(
            f"dataset {dataset!r} is not converted in {data_dir()} or the given --data-dir; "
            f"convert it first with {convert}"
        )
    if model_resolution in stored:
        return model_resolution
    below = [r for r in stored if r < model_resolution]
    if not below:
        raise MlpscaleError(
            f"cannot map {dataset} (stored at {', '.join(map(str, stored))} px) to the source "
            f"model's {model_resolution} px input: only upscaling is done; convert it with {convert}"
        )
    return below[-1]


def downstream_data(
    dataset: str,
    model_resolution: int,
    *,
    root: str | None = None,
    data_resolution: int | None = None,
    n_train: int | None = None,
) -> DownstreamData:
    """Locate the splits and meta.json of the downstream dataset for a model taking `model_resolution` px."""
    stored = pick_resolution(dataset, model_resolution, stored_resolutions(dataset, root), data_resolution)
    directory = dataset_dir(dataset, stored, root)
    meta = load_meta(directory)
    train_path = split_path(dataset, stored, "train", n_train, root)
    if not train_path.is_file():
        raise MlpscaleError(
            f"{train_path} does not exist; add the subset with "
            f"`python jobs/prepare_data.py {dataset} --resolution {stored} --n-train {n_train}`"
        )
    test_path = split_path(dataset, stored, "test", None, root)
    return DownstreamData(
        dataset=dataset,
        directory=directory,
        stored_resolution=stored,
        resolution=int(model_resolution),
        meta=meta,
        train_path=train_path,
        test_path=test_path,
        n_train=int(n_train or meta["counts"]["train"]),
    )
