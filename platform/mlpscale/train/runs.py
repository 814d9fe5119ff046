"""Named pretraining runs on disk: where Ray Train keeps them, their names, and the resume protocol.

A run lives in `<storage>/<name>/` (Ray Train's files and checkpoints); `mlpscale_run.json` there
records the MLflow run it belongs to. A fresh run refuses a name that is taken; `--resume` continues
the MLflow run the file names (reopened as RUNNING, its failure reason cleared).
"""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path

from mlpscale import tracking
from mlpscale.config import PretrainConfig
from mlpscale.errors import MlpscaleError
from mlpscale.paths import repo_root

log = logging.getLogger(__name__)

RUN_FILE = "mlpscale_run.json"  # beside Ray Train's files: the MLflow run a Ray run name belongs to
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"


def storage_root(cfg: PretrainConfig) -> Path:
    """Where Ray Train keeps runs and checkpoints: --storage-path or <repo>/ray_results (absolute).

    Only local paths and shared mounts are supported: every node of a cluster must see the same path.
    """
    if cfg.storage_path and "://" in cfg.storage_path:
        raise MlpscaleError(
            f"storage_path={cfg.storage_path!r}: URIs are not supported yet; use a path that "
            "every node reaches (a shared mount such as /mnt/shared/ray_results)"
        )
    return Path(cfg.storage_path).expanduser().resolve() if cfg.storage_path else repo_root() / "ray_results"


def default_run_name(cfg: PretrainConfig) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = f"pretrain-{cfg.dataset}-{cfg.arch}-{stamp}-{int(time.time() * 1e3) % 1000:03d}"
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def run_name(cfg: PretrainConfig) -> str:
    """The Ray run name: --run-name, else `pretrain-<dataset>-<arch>-<timestamp>`."""
    return cfg.run_name or default_run_name(cfg)


def has_checkpoint(run_dir: Path) -> bool:
    """True when Ray Train registered at least one checkpoint of this run."""
    snapshot = run_dir / SNAPSHOT_FILE
    if not snapshot.is_file():
        return False
    try:
        text = snapshot.read_text()
    except OSError:
        return False
    return "checkpoint_" in text


def refuse_taken_name(run_dir: Path) -> None:
    """A fresh run must not reuse the name of one that exists (its run file or a checkpoint)."""
    if (run_dir / RUN_FILE).is_file() or has_checkpoint(run_dir):
        raise MlpscaleError(
            f"run name {run_dir.name!r} already exists under {run_dir.parent}; pass --resume to "
            "continue it or choose another --run-name"
        )


def record_run(run_dir: Path, *, run_id: str, tracking_uri: str, experiment_id: str) -> None:
    """Write the run file that `--resume` reads back."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / RUN_FILE).write_text(
        json.dumps({"run_id": run_id, "tracking_uri": tracking_uri, "experiment_id": experiment_id})
    )


def reopen_run(mlflow_client, run_dir: Path) -> tuple[str, str]:
    """The (run id, experiment id) the run file names, reopened as RUNNING without a failure reason."""
    run_file = run_dir / RUN_FILE
    if not run_file.is_file():
        raise MlpscaleError(
            f"nothing to resume for run name {run_dir.name!r}: no {RUN_FILE} under {run_dir}; "
            "pass the --run-name (and --storage-path) of an interrupted run"
        )
    run_id = json.loads(run_file.read_text())["run_id"]
    run = mlflow_client.get_run(run_id)
    tracking.mark_running(mlflow_client, run_id)
    if tracking.TAG_FAILURE in run.data.tags:
        mlflow_client.delete_tag(run_id, tracking.TAG_FAILURE)
    log.info("resuming Ray run %s into MLflow run %s", run_dir.name, run_id)
    return run_id, run.info.experiment_id
