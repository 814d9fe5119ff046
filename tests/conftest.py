"""Shared fixtures: a private data dir and MLflow store per test, the bundled digits converted once, one local Ray."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
# Ray Train knobs that only cut waiting (each Ray process started by a test inherits them): no test preempts a
# node, so no preemption-watcher actor per run, and the controller polls its workers every 0.25 s instead of 2 s
# (every run waits on that poll to start and to end). About 10 s less per Ray Train run on 2 cores.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")

REPO = Path(__file__).resolve().parents[1]
# Tests that use these fixtures start Ray, the `make up` services or a real pretraining run: integration tests.
INTEGRATION_FIXTURES = {"ray_local", "head", "pretrained"}


def pytest_collection_modifyitems(items):
    """Mark every test using an integration fixture `integration` (`make test-fast` leaves those out)."""
    for item in items:
        if INTEGRATION_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    """The bundled digits at 16 px with nested subsets of 300 and 600, converted once per session."""
    from mlpscale.data.prepare import prepare_dataset

    root = tmp_path_factory.mktemp("data")
    prepare_dataset("digits", data_dir=root, resolution=16, n_train=[300, 600])
    return root


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory) -> Path:
    """A new sqlite MLflow store with MLflow's schema created once per session (its migrations take a second)."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def tracking_uri(tmp_path, monkeypatch, empty_store) -> str:
    """A fresh sqlite MLflow store for one test (a copy of the empty one), exported so Ray workers see it too."""
    store = tmp_path / "mlflow.db"
    shutil.copyfile(empty_store, store)
    uri = f"sqlite:///{store}"
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
