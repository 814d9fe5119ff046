"""The only code that talks to MLflow: store resolution, runs, the run record, metrics, artifacts, models.

Submodules owned by other parts (queries, sweeps, models) build on the helpers here.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlpscale.errors import MlpscaleError
from mlpscale.paths import default_tracking_uri

log = logging.getLogger(__name__)

TAG_JOB = "mlpscale.job"
TAG_SWEEP_ID = "mlpscale.sweep_id"
TAG_SOURCE_RUN = "mlpscale.source_run_id"
TAG_FAILURE = "mlpscale.failure_reason"
TAG_RAY_RUN = "mlpscale.ray_run_name"
TAG_PARENT = "mlflow.parentRunId"

EPOCH_METRICS = (
    "train_loss",
    "train_top1",
    "val_loss",
    "val_top1",
    "val_top5",
    "compute_flops",
    "throughput_img_s",
    "epoch_time_s",
)
RECORD_PARAMS = (
    "arch",
    "depth",
    "width",
    "expansion",
    "num_params",
    "forward_flops",
    "dataset",
    "resolution",
    "n_train",
    "epochs",
    "batch_size",
    "lr",
    "optimizer",
    "weight_decay",
    "label_smoothing",
    "mixup_alpha",
    "seed",
)
# Config fields logged as params besides the run record's (job-specific, still useful in compare views).
EXTRA_CONFIG_PARAMS = (
    "accumulation_steps",
    "momentum",
    "schedule",
    "warmup_epochs",
    "grad_clip",
    "dropout",
    "activation",
    "normalization",
    "crop_scale",
    "crop_ratio",
    "flip",
    "num_workers",
    "precision",
    "order",
)


def resolve_tracking_uri(uri: str | None = None, *, check: bool = True) -> str:
    """The absolute tracking URI (explicit, else MLFLOW_TRACKING_URI, else sqlite mlflow.db at the repo root).

    With `check`, an HTTP server must answer within a few seconds and a sqlite file's folder must
    exist or be creatable; otherwise MlpscaleError names the URI.
    """
    uri = (uri or default_tracking_uri()).strip()
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///") :]).expanduser()
        if not path.is_absolute():
            path = Path.cwd() / path
        uri = f"sqlite:///{path.resolve()}"
        if check:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise MlpscaleError(
                    f"MLflow store {uri} is not reachable: cannot create {path.parent} ({error}); "
                    "set MLFLOW_TRACKING_URI or --tracking-uri to a writable location"
                ) from None
            if not os.access(path.parent, os.W_OK):
                raise MlpscaleError(
                    f"MLflow store {uri} is not writable; "
                    "set MLFLOW_TRACKING_URI or --tracking-uri to a writable location"
                )
    elif uri.startswith(("http://", "https://")):
        uri = uri.rstrip("/")
        if check:
            _check_http(uri)
    elif uri.startswith("file:") or "://" not in uri:
        path = Path(uri[len("file://") :] if uri.startswith("file://") else uri.removeprefix("file:")).expanduser()
        uri = path.resolve().as_uri()
    return uri


def _check_http(uri: str, timeout: float = 5.0) -> None:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=timeout) as response:
            if response.status >= 500:
                raise OSError(f"HTTP {response.status}")
    except urllib.error.HTTPError as error:
        if error.code >= 500:
            raise MlpscaleError(
                f"MLflow server {uri} is not healthy (HTTP {error.code}); "
                "start it with `make up` or set MLFLOW_TRACKING_URI"
            ) from None
    except (OSError, urllib.error.URLError) as error:
        raise MlpscaleError(
            f"MLflow server {uri} is not reachable ({error}); "
            "start it with `make up` or set MLFLOW_TRACKING_URI to a reachable store"
        ) from None


def client(uri: str | None = None):
    """An MlflowClient on the resolved store."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=resolve_tracking_uri(uri, check=False))


def ensure_experiment(mlflow_client, name: str) -> str:
    """The id of experiment `name`, created when missing; sqlite stores keep artifacts beside the db file."""
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    artifact_location = None
    uri = mlflow_client.tracking_uri
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///") :])
        artifact_location = (db.parent / "mlartifacts" / name).resolve().as_uri()
    try:
        return mlflow_client.create_experiment(name, artifact_location=artifact_location)
    except Exception:  # created concurrently by another job
        experiment = mlflow_client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def start_run(
    uri: str,
    experiment: str,
    *,
    run_name: str | None = None,
    tags: Mapping[str, str] | None = None,
    params: Mapping[str, Any] | None = None,
) -> tuple[str, str]:
    """Create a RUNNING run with tags and params; returns (run_id, experiment_id)."""
    mlflow_client = client(uri)
    experiment_id = ensure_experiment(mlflow_client, experiment)
    run = mlflow_client.create_run(experiment_id, run_name=run_name, tags=dict(tags or {}))
    if params:
        log_params(mlflow_client, run.info.run_id, params)
    return run.info.run_id, experiment_id


def log_params(mlflow_client, run_id: str, params: Mapping[str, Any]) -> None:
    """Log params in one batch (values stringified, lists as JSON)."""
    from mlflow.entities import Param

    batch = [Param(str(k), json.dumps(v) if isinstance(v, (list, tuple)) else str(v)) for k, v in params.items()]
    for start in range(0, len(batch), 100):
        mlflow_client.log_batch(run_id, params=batch[start : start + 100])


def _field(cfg: Any, name: str, default: Any = None) -> Any:
    if isinstance(cfg, Mapping):
        return cfg.get(name, default)
    return getattr(cfg, name, default)


def run_record_params(cfg: Any, stats: Mapping[str, Any], meta: Mapping[str, Any]) -> dict[str, Any]:
    """The design.md run-record params from a config (dataclass or dict), model_stats() and meta.json."""
    n_train = _field(cfg, "n_train") or meta.get("counts", {}).get("train")
    resolution = _field(cfg, "resolution") or meta.get("resolution")
    params = {
        "arch": _field(cfg, "arch"),
        "depth": stats.get("depth"),
        "width": stats.get("width"),
        "expansion": stats.get("expansion", _field(cfg, "expansion")),
        "num_params": stats.get("num_params"),
        "forward_flops": stats.get("forward_flops"),
        "dataset": _field(cfg, "dataset", meta.get("dataset")),
        "resolution": resolution,
        "n_train": n_train,
    }
    for name in ("epochs", "batch_size", "lr", "optimizer", "weight_decay", "label_smoothing", "mixup_alpha", "seed"):
        params[name] = _field(cfg, name)
    params["kind"] = stats.get("kind")
    params["num_classes"] = meta.get("num_classes")
    for name in EXTRA_CONFIG_PARAMS:
        value = _field(cfg, name)
        if value is not None:
            params[name] = list(value) if isinstance(value, tuple) else value
    return params


def log_epoch_metrics(mlflow_client, run_id: str, metrics: Mapping[str, float], epoch: int) -> None:
    """Log one epoch's metrics (all with step=epoch) in one batch."""
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(key, float(value), now, int(epoch)) for key, value in metrics.items()]
    mlflow_client.log_batch(run_id, metrics=batch)


def last_logged_epoch(mlflow_client, run_id: str, metric: str = "val_top1") -> int:
    """The highest epoch (step) already logged for `metric`, 0 when none: resumes skip those epochs."""
    history = mlflow_client.get_metric_history(run_id, metric)
    return max((m.step for m in history), default=0)


def log_dict_artifact(mlflow_client, run_id: str, data: Any, file_name: str) -> None:
    """Write `data` as YAML (.yaml) or JSON and upload it to the run's artifact root."""
    import yaml

    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / file_name
        if file_name.endswith((".yaml", ".yml")):
            file.write_text(yaml.safe_dump(data, sort_keys=False))
        else:
            file.write_text(json.dumps(data, indent=2))
        mlflow_client.log_artifact(run_id, str(file))


def log_file_artifact(mlflow_client, run_id: str, path: str | os.PathLike, artifact_path: str | None = None) -> None:
    mlflow_client.log_artifact(run_id, str(path), artifact_path)


def mark_failed(mlflow_client, run_id: str, reason: str) -> None:
    """Tag the failure reason and end the run as FAILED."""
    mlflow_client.set_tag(run_id, TAG_FAILURE, reason[:4000])
    mlflow_client.set_terminated(run_id, status="FAILED")


def mark_running(mlflow_client, run_id: str) -> None:
    """Reopen a run (a resumed job) so the UI shows it as RUNNING again."""
    mlflow_client.update_run(run_id, status="RUNNING")


def finish_run(mlflow_client, run_id: str) -> None:
    mlflow_client.set_terminated(run_id, status="FINISHED")


def run_status(mlflow_client, run_id: str) -> str:
    return mlflow_client.get_run(run_id).info.status


def log_model(uri: str, run_id: str, model, input_example, *, register: str | None = None, name: str = "model") -> str:
    """Log a torch model (PyTorch flavour, signature and input example) to the run; register it when asked.

    The run's status is left as it is: the caller ends the run once, when the job is done (a fluent
    `start_run` block here would mark it FINISHED before the job finished).
    Returns the model URI that `mlflow.pytorch.load_model` accepts.
    """
    import mlflow
    import mlflow.pytorch
    import numpy as np
    import torch
    from mlflow.models import infer_signature

    model = model.eval().cpu()
    example = np.asarray(input_example, dtype=np.float32)
    with torch.no_grad():
        output = model(torch.from_numpy(example)).float().numpy()
    signature = infer_signature(example, output)
    mlflow.set_tracking_uri(uri)
    # the logged model is filed under the fluent experiment: the run's, not the default one
    mlflow.set_experiment(experiment_id=client(uri).get_run(run_id).info.experiment_id)
    info = mlflow.pytorch.log_model(
        model,
        name=name,
        signature=signature,
        input_example=example,
        registered_model_name=register,
        serialization_format="pickle",
        pip_requirements=_model_requirements(),
        run_id=run_id,
    )
    return info.model_uri


def _model_requirements() -> list[str]:
    """What loading a logged model needs, stated instead of inferred (inference costs seconds per model)."""
    import numpy as np
    import torch

    return [f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}"]


def load_model(model_uri: str, uri: str | None = None):
    """Load a logged PyTorch model (CPU) from its URI."""
    import mlflow
    import mlflow.pytorch

    mlflow.set_tracking_uri(resolve_tracking_uri(uri, check=False))
    return mlflow.pytorch.load_model(model_uri, map_location="cpu")
