"""Where things live: the repository root, the data directory and the default MLflow store."""

from __future__ import annotations

import os
from pathlib import Path


def repo_root() -> Path:
    """The checkout's root: $MLPSCALE_REPO when set, else the folder holding pyproject.toml above this file."""
    if os.environ.get("MLPSCALE_REPO"):
        return Path(os.environ["MLPSCALE_REPO"]).resolve()
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "pyproject.toml").exists():
            return parent
    return Path.cwd().resolve()


def data_dir(override: str | os.PathLike | None = None) -> Path:
    """The dataset root: the explicit override, else $MLPSCALE_DATA, else data/ at the repo root."""
    if override:
        return Path(override).expanduser().resolve()
    if os.environ.get("MLPSCALE_DATA"):
        return Path(os.environ["MLPSCALE_DATA"]).expanduser().resolve()
    return repo_root() / "data"


def dataset_dir(dataset: str, resolution: int, root: str | os.PathLike | None = None) -> Path:
    """`<data-dir>/<dataset>/res<R>`: where a converted dataset's .beton files and meta.json live."""
    return data_dir(root) / dataset / f"res{int(resolution)}"


def split_path(
    dataset: str, resolution: int, split: str, n_train: int | None = None, root: str | os.PathLike | None = None
) -> Path:
    """The .beton of one split; `n_train` picks the nested training subset `train_n<N>.beton`."""
    name = f"train_n{int(n_train)}" if (split == "train" and n_train) else split
    return dataset_dir(dataset, resolution, root) / f"{name}.beton"


def default_tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI when set, else the absolute sqlite file mlflow.db at the repo root."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{repo_root() / 'mlflow.db'}"
