"""Launching a Ray Train run and ending its MLflow run: the lifecycle pretraining runs and Tune trials share.

`launch(spec, ...)` builds the TorchTrainer (one worker per `spec.workers`, each with its CPUs and
maybe a GPU), fits it and handles the two ways a run fails: Ray Train raises (a crash past the
retries) or the worker returns a status other than ok (non-finite loss, out of memory). Either
way the MLflow run ends FAILED with the reason and the caller's error is raised. A run that
trained logs its final model (`log_model`) and is marked FINISHED once. Transfer runs train in
their own process and share the rest: `log_final_model` and `tracked_run`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mlpscale import tracking
from mlpscale.train.spec import WorkerSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FailureWording:
    """How a caller words the two failures, after its run was marked FAILED."""

    crashed: str  # opens the reason of a crash, e.g. "training failed" or "trial <id> crashed"
    crash_error: Callable[[str], Exception]  # the error raised after a crash, given the reason tagged
    stop_error: Callable[[str], Exception]  # the error raised after the worker stopped, given its reason


@dataclass(frozen=True)
class Launched:
    """A run that trained to the end."""

    metrics: dict[str, float] = field(default_factory=dict)
    checkpoint_path: str | None = None
    model_uri: str | None = None


def launch(
    spec: WorkerSpec,
    *,
    name: str,
    storage_path: str | Path,
    use_gpu: bool,
    max_failures: int,
    failure: FailureWording,
    worker: Callable[[dict], dict] | None = None,
    callbacks: Sequence = (),
) -> Launched:
    """Train `spec` as the Ray Train run `name` under `storage_path` (continued when it exists there).

    `worker` defaults to the pretraining loop; Tune trials pass their own wrapper of it and their
    TuneReportCallback in `callbacks`.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from mlpscale.train import loop

    mlflow_client = tracking.client(spec.tracking_uri)
    trainer = TorchTrainer(
        worker or loop.train_loop_per_worker,
        train_loop_config=spec.loop_config(),
        scaling_config=ScalingConfig(
            num_workers=spec.workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": spec.cpus_per_worker or 1, **({"GPU": 1} if use_gpu else {})},
        ),
        run_config=RunConfig(
            name=name,
            storage_path=str(storage_path),
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=spec.cfg.keep_checkpoints),
            callbacks=list(callbacks),
        ),
    )
    try:
        result = trainer.fit()
    except Exception as error:  # Ray Train gave up (worker errors past max_failures, controller failure)
        reason = f"{failure.crashed}: {type(error).__name__}: {str(error)[:1500]}"
        tracking.mark_failed(mlflow_client, spec.run_id, reason)
        raise failure.crash_error(reason) from error
    outcome = result.return_value or {}
    if outcome.get("status") not in (None, "ok"):
        reason = outcome.get("reason", outcome["status"])
        fail_run(mlflow_client, spec.run_id, reason)
        raise failure.stop_error(reason)
    metrics = dict(outcome.get("metrics") or {})
    if not metrics and result.metrics:
        metrics = {k: v for k, v in result.metrics.items() if k in tracking.EPOCH_METRICS}
    checkpoint_path = result.checkpoint.path if result.checkpoint is not None else None
    model_uri = None
    if checkpoint_path:
        model = restore_model(spec, checkpoint_path)
        model_uri = log_final_model(
            model,
            resolution=spec.resolution,
            tracking_uri=spec.tracking_uri,
            run_id=spec.run_id,
            example=_example_images(spec),
            log_model=spec.cfg.log_model,
            register=spec.cfg.register,
        )
    tracking.finish_run(mlflow_client, spec.run_id)
    return Launched(metrics, checkpoint_path, model_uri)


def restore_model(spec: WorkerSpec, checkpoint_path: str):
    """The spec's model with the weights of a checkpoint (CPU)."""
    from mlpscale.train.checkpoint import load_state

    model = spec.build_model()
    model.load_state_dict(load_state(checkpoint_path)["model"])
    return model


def _example_images(spec: WorkerSpec):
    import numpy as np

    shape = (2, 3, spec.resolution, spec.resolution)
    return np.random.default_rng(spec.cfg.seed).standard_normal(shape).astype(np.float32)


def log_final_model(
    model,
    *,
    resolution: int,
    tracking_uri: str,
    run_id: str,
    example,
    log_model: bool = True,
    register: str | None = None,
) -> str | None:
    """The end of a training run: the first-layer weights picture (plots/), then, unless `log_model` is off,
    the model (PyTorch flavour, signature and `example` input; registered as `register` when given).
    Returns the model URI, None when no model was logged."""
    from mlpscale.weights_picture import log_weights_picture

    log_weights_picture(model, resolution, run_id, tracking_uri)
    if not log_model:
        return None
    return tracking.log_model(tracking_uri, run_id, model, example, register=register)


def fail_run(mlflow_client, run_id: str, reason: str) -> None:
    """Mark the run FAILED with `reason`, unless it already is (the worker may have said why first)."""
    if tracking.run_status(mlflow_client, run_id) != "FAILED":
        tracking.mark_failed(mlflow_client, run_id, reason)


@contextlib.contextmanager
def tracked_run(mlflow_client, run_id: str) -> Iterator[None]:
    """A run trained in this process: FINISHED once when the block completes, FAILED (with the error) if it raises."""
    try:
        yield
    except BaseException as error:
        fail_run(mlflow_client, run_id, f"{type(error).__name__}: {error}")
        raise
    tracking.finish_run(mlflow_client, run_id)
