"""Shared fixtures: a private data dir and MLflow store per test, the bundled digits converted once, one local Ray."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    """The bundled digits at 16 px with nested subsets of 300 and 600, converted once per session."""
    from mlpscale.data.prepare import prepare_dataset

    root = tmp_path_factory.mktemp("data")
    prepare_dataset("digits", data_dir=root, resolution=16, n_train=[300, 600])
    return root


@pytest.fixture
def tracking_uri(tmp_path, monkeypatch) -> str:
    """A fresh sqlite MLflow store for one test, exported so Ray workers see it too."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the tests that need a cluster but not a separate head process."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
