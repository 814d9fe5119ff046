"""Convert a dataset source to `<data-dir>/<dataset>/res<R>/{train,test,train_n<N>}.beton` plus meta.json.

meta.json is written last, so its presence marks a complete conversion; converting again
without `overwrite` keeps the files and only adds missing subsets.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from mlpscale.data.choices import DEFAULT_RESOLUTIONS
from mlpscale.data.images import StagedSplit, stage_split
from mlpscale.data.meta import channel_stats, load_meta, meta_path, write_meta
from mlpscale.data.sources import READERS, read_source
from mlpscale.data.subsets import check_sizes, nested_order
from mlpscale.errors import MlpscaleError
from mlpscale.paths import dataset_dir

log = logging.getLogger(__name__)

MAX_RAW_RESOLUTION = 64
SPLITS = ("train", "test")


def subset_name(n_train: int) -> str:
    return f"train_n{int(n_train)}"


def _check_resolution(dataset: str, resolution: int | None, jpeg: bool | None) -> tuple[int, bool]:
    if dataset not in READERS:
        raise MlpscaleError(f"unknown dataset {dataset!r}; choose one of {', '.join(READERS)}")
    resolution = DEFAULT_RESOLUTIONS[dataset] if resolution is None else resolution
    try:
        resolution = int(resolution)
    except (TypeError, ValueError):
        raise MlpscaleError(f"--resolution {resolution!r} is not an integer number of pixels") from None
    if not 4 <= resolution <= 1024:
        raise MlpscaleError(f"--resolution {resolution} is out of range; pick 4..1024 (the paper uses 64)")
    # Raw pixels up to 64 px (no decode at load time); JPEG above unless asked otherwise.
    return resolution, (resolution > MAX_RAW_RESOLUTION) if jpeg is None else bool(jpeg)


def _write_subsets(
    directory: Path, images: np.ndarray, labels: np.ndarray, sizes: Iterable[int], jpeg: bool
) -> list[Path]:
    from mlpscale.data.beton import write_beton

    order = nested_order(labels)
    paths = []
    for size in sizes:
        indices = np.sort(order[:size])
        path = directory / f"{subset_name(size)}.beton"
        write_beton(
            path, images[indices] if len(indices) <= 50_000 else _Take(images, indices), labels[indices], jpeg=jpeg
        )
        paths.append(path)
    return paths


def _ordered_counts(counts: dict[str, int]) -> dict[str, int]:
    """train, test, then the subsets by size."""
    key = {"train": -2, "test": -1}
    return dict(sorted(counts.items(), key=lambda kv: key.get(kv[0], kv[1])))


class _Take:
    """A lazy row selection of a large (memory-mapped) image array, so big subsets are not copied to RAM."""

    def __init__(self, images: np.ndarray, indices: np.ndarray):
        self.images, self.indices = images, indices
        self.shape = (len(indices), *images.shape[1:])

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index):
        return self.images[self.indices[index]]


def prepare_dataset(
    dataset: str,
    *,
    source: str | os.PathLike | None = None,
    data_dir: str | os.PathLike | None = None,
    resolution: int | None = None,
    n_train: Iterable[int] = (),
    strict: bool = False,
    jpeg: bool | None = None,
    overwrite: bool = False,
    name: str | None = None,
) -> Path:
    """Convert `dataset` once and return its directory `<data-dir>/<name or dataset>/res<R>`.

    `n_train` adds nested class-proportional subsets; `strict` stops at the first undecodable image
    instead of skipping it; `jpeg` stores JPEG instead of raw pixels (default: raw up to 64 px);
    `name` stores a folder-tree dataset under its own name (e.g. stl10) instead of "folder".
    """
    resolution, jpeg = _check_resolution(dataset, resolution, jpeg)
    n_train = list(n_train or ())
    directory = dataset_dir(name or dataset, resolution, data_dir)
    complete = meta_path(directory).is_file() and all((directory / f"{s}.beton").is_file() for s in SPLITS)
    if complete and not overwrite:
        log.info("%s already converted; keeping it (pass overwrite to convert again)", directory)
        if n_train:
            add_subsets(name or dataset, resolution, n_train, data_dir=data_dir)
        return directory

    src = read_source(dataset, source)
    # FFCV pulls in torch and numba (seconds); imported only once the source is known to be good.
    from mlpscale.data.beton import write_beton

    directory.mkdir(parents=True, exist_ok=True)
    staged: dict[str, StagedSplit] = {}
    try:
        for split in SPLITS:
            staged[split] = stage_split(
                src.splits[split],
                resolution,
                directory / f".{split}.stage-{os.getpid()}.u8",
                strict=strict,
                description=f"{name or dataset} {split}",
            )
            if len(staged[split]) == 0:
                raise MlpscaleError(f"the {split} split of {src.origin} has no decodable images")
            bad = staged[split].labels[(staged[split].labels < 0) | (staged[split].labels >= len(src.classes))]
            if bad.size:
                raise MlpscaleError(f"{src.origin}: label {int(bad[0])} outside 0..{len(src.classes) - 1} in {split}")
        sizes = check_sizes(n_train, len(staged["train"]))
        if overwrite:
            for old in directory.glob("train_n*.beton"):
                old.unlink()
            meta_path(directory).unlink(missing_ok=True)
        train = staged["train"]
        for split in SPLITS:
            write_beton(directory / f"{split}.beton", staged[split].images, staged[split].labels, jpeg=jpeg)
        _write_subsets(directory, train.images, train.labels, sizes, jpeg)
        mean, std = channel_stats(train.images)
        skipped = staged["train"].skipped + staged["test"].skipped
        counts = _ordered_counts({split: len(staged[split]) for split in SPLITS} | {subset_name(n): n for n in sizes})
        write_meta(
            directory,
            {
                "dataset": name or dataset,
                "format": dataset,
                "num_classes": len(src.classes),
                "classes": list(src.classes),
                "counts": counts,
                "class_counts": {
                    split: np.bincount(staged[split].labels, minlength=len(src.classes)).tolist() for split in SPLITS
                },
                "mean": mean,
                "std": std,
                "resolution": resolution,
                "image_format": "jpg" if jpeg else "raw",
                "skipped": skipped,
                "subsets": sizes,
                "source": src.origin,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            },
        )
    finally:
        for stage in staged.values():
            stage.remove()
        for leftover in directory.glob(f".*.stage-{os.getpid()}.u8"):
            leftover.unlink(missing_ok=True)
    if skipped:
        log.warning("skipped %d undecodable image(s); listed in %s", len(skipped), meta_path(directory))
    return directory


def add_subsets(
    dataset: str, resolution: int, n_train_list: Iterable[int], data_dir: str | os.PathLike | None = None
) -> list[Path]:
    """Write the missing nested subsets of an existing conversion from its train.beton; returns all requested paths."""
    directory = dataset_dir(dataset, resolution, data_dir)
    meta = load_meta(directory)
    sizes = check_sizes(n_train_list, int(meta["counts"]["train"]))
    missing = [n for n in sizes if not (directory / f"{subset_name(n)}.beton").is_file()]
    if missing:
        from mlpscale.data.beton import read_beton

        images, labels = read_beton(directory / "train.beton")
        _write_subsets(directory, images, labels, missing, meta.get("image_format") == "jpg")
        meta = load_meta(directory)  # re-read: another process may have added subsets meanwhile
        meta["subsets"] = sorted(set(meta.get("subsets", [])) | set(missing))
        meta["counts"] = _ordered_counts(meta["counts"] | {subset_name(n): n for n in missing})
        write_meta(directory, meta)
    return [directory / f"{subset_name(n)}.beton" for n in sizes]
