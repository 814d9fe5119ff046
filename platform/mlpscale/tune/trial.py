"""One Tune trial: the trial's pretrain config, its MLflow child run, and a one-worker Ray Train run inside the trial.

The trial creates its own child run (so it works on any node), checks its data and counts its model
with the pretraining driver's functions and trains through the same launcher (train/launch.py).
A trial restarted after the sweep's driver was killed continues its Ray Train run from the last
checkpoint and its MLflow run, so finished epochs are not trained or logged twice. The same holds
for a trial restarted after its node was lost (Tune and Ray Train retries, `trial_retries`); a trial
that ended FAILED (NaN loss, Ray Train gave up) fails again at once when Tune retries it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlpscale import tracking
from mlpscale.config import PretrainConfig, apply, validate
from mlpscale.errors import MlpscaleError
from mlpscale.tracking import sweeps

log = logging.getLogger(__name__)

LR_SCALINGS = ("none", "linear", "sqrt")
TRIAL_RUN_FILE = "mlpscale_trial.json"


class TrialFailed(RuntimeError):
    """Raised inside a trial so Ray Tune (and the searcher) record it as errored."""


@dataclass(frozen=True)
class SweepContext:
    """What every trial needs from the driver: the typed base config and where the sweep runs and tracks."""

    sweep_id: str
    parent_run_id: str
    tracking_uri: str
    experiment: str
    base_config: PretrainConfig
    train_storage: str
    lr_scaling: str = "none"
    base_batch_size: int = 0
    cpus_per_worker: int = 1
    use_gpu: bool = False
    trial_retries: int = 2


def scale_lr(lr: float, batch_size: int, base_batch_size: int, rule: str) -> float:
    """lr * (batch/base) for linear, * sqrt(batch/base) for sqrt, unchanged for none."""
    if rule not in LR_SCALINGS:
        raise MlpscaleError(f"--lr-scaling {rule!r} is not known; use one of {', '.join(LR_SCALINGS)}")
    if rule == "none" or not base_batch_size:
        return lr
    ratio = batch_size / base_batch_size
    return lr * (ratio if rule == "linear" else math.sqrt(ratio))


def trial_config(context: SweepContext, sampled: dict[str, Any]) -> tuple[PretrainConfig, dict[str, Any]]:
    """The trial's validated config (base + sampled values, lr scaled) and the sweep params it adds."""
    from mlpscale.tune.space import from_tune_value

    values = {name: from_tune_value(value, name) for name, value in sampled.items()}
    cfg = validate(apply(context.base_config, values))
    base_lr = cfg.lr
    lr = scale_lr(base_lr, cfg.batch_size, context.base_batch_size, context.lr_scaling)
    cfg = validate(dataclasses.replace(cfg, lr=lr, experiment=context.experiment, tracking_uri=context.tracking_uri))
    extra = {
        "lr_scaling": context.lr_scaling,
        "base_lr": base_lr,
        "base_batch_size": context.base_batch_size or cfg.batch_size,
    }
    return cfg, extra


def run_trial(config: dict[str, Any], context: SweepContext) -> None:
    """The Tune function trainable (wrapped with tune.with_parameters(context=...))."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from mlpscale.train.launch import FailureWording, launch
    from mlpscale.train.pretrain import check_data, model_summary
    from mlpscale.train.spec import worker_spec

    trial_id = tune.get_context().get_trial_id()
    mlflow_client = tracking.client(context.tracking_uri)
    train_dir = Path(context.train_storage) / trial_id
    if _replay_if_done(train_dir, mlflow_client, trial_id):
        return
    cfg, extra_params = trial_config(context, config)
    data = check_data(cfg)
    stats = model_summary(cfg, data)
    run_id = _continue_or_start_run(context, cfg, data, stats, extra_params, trial_id, train_dir, mlflow_client)
    spec = worker_spec(
        cfg,
        data,
        stats,
        workers=1,
        run_id=run_id,
        tracking_uri=context.tracking_uri,
        cpus_per_worker=context.cpus_per_worker,
    )
    failure = FailureWording(
        crashed=f"trial {trial_id} crashed",
        crash_error=TrialFailed,
        stop_error=lambda reason: TrialFailed(f"trial {trial_id} failed: {reason}"),
    )
    launch(
        spec,
        name=trial_id,
        storage_path=train_dir.parent,
        use_gpu=context.use_gpu,
        max_failures=context.trial_retries,
        failure=failure,
        worker=_worker_recording_placement_group,
        callbacks=[TuneReportCallback()],
    )


def _replay_if_done(train_dir: Path, mlflow_client, trial_id: str) -> bool:
    """A trial that already ended (Tune restored it from an older experiment state) is not run again.

    A finished one reports its logged epochs to Tune again; a failed one fails again with its reason.
    """
    from ray import tune

    record = train_dir / TRIAL_RUN_FILE
    if not record.is_file():
        return False
    run_id = json.loads(record.read_text())["run_id"]
    run = mlflow_client.get_run(run_id)
    if run.info.status == "FAILED":
        raise TrialFailed(f"trial {trial_id} failed before: {run.data.tags.get(tracking.TAG_FAILURE, 'unknown')}")
    if run.info.status != "FINISHED":
        return False
    log.info("trial %s already finished in MLflow run %s: reporting its epochs, not training again", trial_id, run_id)
    by_epoch: dict[int, dict[str, float]] = {}
    for name in tracking.EPOCH_METRICS:
        for metric in mlflow_client.get_metric_history(run_id, name):
            by_epoch.setdefault(metric.step, {})[name] = metric.value
    for epoch in sorted(by_epoch):
        tune.report({**by_epoch[epoch], "epoch": epoch})
    return True


def _continue_or_start_run(context, cfg, data, stats, extra_params, trial_id, train_dir, mlflow_client) -> str:
    """The trial's MLflow run: the earlier attempt's when it did not finish (continued), else a new child run."""
    record = train_dir / TRIAL_RUN_FILE
    if record.is_file():
        run_id = json.loads(record.read_text())["run_id"]
        status = tracking.run_status(mlflow_client, run_id)
        if status in ("RUNNING", "KILLED"):
            tracking.mark_running(mlflow_client, run_id)
            if sweeps.TAG_STOPPED in mlflow_client.get_run(run_id).data.tags:
                mlflow_client.delete_tag(run_id, sweeps.TAG_STOPPED)
            log.info("trial %s continues MLflow run %s", trial_id, run_id)
            return run_id
    run_id = sweeps.start_trial_run(
        context.tracking_uri,
        context.experiment,
        parent_run_id=context.parent_run_id,
        sweep_id=context.sweep_id,
        trial_id=trial_id,
        run_name=f"{context.sweep_id}-{trial_id}",
        extra_tags={tracking.TAG_RAY_RUN: trial_id},
    )
    params = {**tracking.run_record_params(cfg, stats, data.meta), **extra_params, "trial_id": trial_id}
    tracking.log_params(mlflow_client, run_id, params)
    tracking.log_dict_artifact(mlflow_client, run_id, cfg.to_dict(), "config.yaml")
    tracking.log_dict_artifact(mlflow_client, run_id, data.meta, "meta.json")
    train_dir.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"run_id": run_id, "trial_id": trial_id}))
    return run_id


def _worker_recording_placement_group(config: dict[str, Any]):
    """The shared worker loop, after tagging the trial's run with this worker group's placement group and node."""
    import ray

    from mlpscale.train.loop import train_loop_per_worker
    from mlpscale.train.spec import WorkerSpec

    spec = WorkerSpec.from_loop_config(config)
    group = ray.util.get_current_placement_group()
    if group is not None and spec.run_id and ray.train.get_context().get_world_rank() == 0:
        try:
            sweeps.record_placement_group(spec.tracking_uri, spec.run_id, group.id.hex())
            sweeps.record_node(spec.tracking_uri, spec.run_id, ray.get_runtime_context().get_node_id())
        except Exception as error:  # noqa: BLE001 - bookkeeping must not fail the trial
            log.warning("could not record the placement group: %s", error)
    return train_loop_per_worker(config)
