"""meta.json beside a converted dataset: classes, per-split counts, train mean/std, resolution, skipped files."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from mlpscale.errors import MlpscaleError

META_NAME = "meta.json"


def meta_path(dataset_dir: str | os.PathLike) -> Path:
    return Path(dataset_dir) / META_NAME


def write_meta(dataset_dir: str | os.PathLike, meta: dict[str, Any]) -> Path:
    """Write meta.json atomically (temp file, then rename)."""
    path = meta_path(dataset_dir)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path


def load_meta(dataset_dir: str | os.PathLike) -> dict[str, Any]:
    """Read a converted dataset's meta.json; a missing one names the command that creates it."""
    path = meta_path(dataset_dir)
    if not path.is_file():
        directory = Path(dataset_dir)
        dataset = directory.parent.name or "DATASET"
        resolution = directory.name[3:] if directory.name.startswith("res") else "R"
        raise MlpscaleError(
            f"no converted dataset at {directory} (missing {META_NAME}); create it with "
            f"`python jobs/prepare_data.py {dataset} --resolution {resolution} --data-dir {directory.parent.parent}`"
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise MlpscaleError(f"{path} is not valid JSON ({error}); convert again with --overwrite") from error


def channel_stats(images: np.ndarray, chunk: int = 4096) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 (N, H, W, 3) images on the 0-255 scale, read in chunks."""
    total = np.zeros(3, dtype=np.float64)
    total_sq = np.zeros(3, dtype=np.float64)
    count = 0
    for start in range(0, len(images), chunk):
        block = np.asarray(images[start : start + chunk], dtype=np.float64).reshape(-1, 3)
        total += block.sum(axis=0)
        total_sq += np.square(block).sum(axis=0)
        count += block.shape[0]
    if count == 0:
        return [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - np.square(mean), 0.0))
    return [float(m) for m in mean], [float(s) for s in std]
