"""Reading a scaling study out of MLflow: the runs of an experiment or a sweep -> the points table.

One row per run and logged epoch: run_id, arch, num_params, forward_flops, n_train, epoch,
compute_flops (the logged cumulative metric, else 3 * forward_flops * n_train * epoch), error
(1 - metric for accuracies, the metric itself for names containing "loss" or "err").
Runs missing a needed param or the metric are listed with the reason and skipped.
Also logs the fit job's own run (mlpscale.job=scaling_fit).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from mlpscale.errors import MlpscaleError
from mlpscale.tracking import (
    TAG_JOB,
    TAG_PARENT,
    TAG_SWEEP_ID,
    client,
    ensure_experiment,
    log_params,
    resolve_tracking_uri,
)

log = logging.getLogger(__name__)

DEFAULT_JOBS = ("pretrain", "trial")
REQUIRED_PARAMS = ("num_params", "n_train", "forward_flops")
CONSTANT_SCHEDULES = ("none", "constant")
TAG_SOURCE_EXPERIMENT = "mlpscale.source_experiment"
TAG_SOURCE_SWEEP = "mlpscale.source_sweep_id"


@dataclass
class RunPoints:
    """The points read from MLflow and what had to be left out."""

    table: pd.DataFrame
    experiment_ids: list[str]
    skipped: list[dict[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    runs_considered: int = 0


def error_from_metric(metric: str, value: float) -> float:
    """Error from a logged metric: accuracies (fractions) become 1 - value, losses/errors stay as they are."""
    lowered = metric.lower()
    if "loss" in lowered or "err" in lowered:
        return float(value)
    return 1.0 - float(value)


def _search_all(mlflow_client, experiment_ids: list[str], filter_string: str = "") -> list:
    runs, token = [], None
    while True:
        page = mlflow_client.search_runs(
            experiment_ids, filter_string=filter_string, max_results=1000, page_token=token
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _experiment_id(mlflow_client, experiment: str) -> str:
    found = mlflow_client.get_experiment_by_name(experiment)
    if found is None:
        try:
            found = mlflow_client.get_experiment(experiment)
        except Exception:  # not an id either
            found = None
    if found is None:
        names = sorted(e.name for e in mlflow_client.search_experiments())
        raise MlpscaleError(
            f"--experiment {experiment!r}: no such experiment in {mlflow_client.tracking_uri}; "
            f"known experiments: {', '.join(names) or 'none'}"
        )
    return found.experiment_id


def find_runs(mlflow_client, *, experiment: str | None = None, sweep: str | None = None) -> tuple[list, list[str]]:
    """Runs of an experiment (by name or id), or of a sweep (tag mlpscale.sweep_id or parent run id)."""
    if sweep:
        experiment_ids = [e.experiment_id for e in mlflow_client.search_experiments()]
        by_id: dict[str, Any] = {}
        for filter_string in (f"tags.`{TAG_SWEEP_ID}` = '{sweep}'", f"tags.`{TAG_PARENT}` = '{sweep}'"):
            for run in _search_all(mlflow_client, experiment_ids, filter_string):
                by_id[run.info.run_id] = run
        if not by_id:
            raise MlpscaleError(
                f"--sweep {sweep!r}: no runs carry tag {TAG_SWEEP_ID} or parent run id {sweep!r} "
                f"in {mlflow_client.tracking_uri}; give the sweep id printed by the tune job"
            )
        runs = list(by_id.values())
        return runs, sorted({run.info.experiment_id for run in runs})
    experiment_id = _experiment_id(mlflow_client, experiment)
    return _search_all(mlflow_client, [experiment_id]), [experiment_id]


def points_from_runs(
    mlflow_client, runs: Iterable, *, metric: str = "val_top1", jobs: Iterable[str] = DEFAULT_JOBS, epochs: str = "all"
) -> RunPoints:
    """The points table of `runs` (those tagged with another job are ignored; untagged runs are read)."""
    jobs = tuple(jobs)
    rows, skipped, non_constant = [], [], []
    considered = 0
    for run in runs:
        job = run.data.tags.get(TAG_JOB)
        if job is not None and job not in jobs:
            continue
        considered += 1
        run_id, params = run.info.run_id, run.data.params
        name = run.info.run_name or run_id
        missing = [p for p in REQUIRED_PARAMS if p not in params]
        if missing:
            skipped.append({"run_id": run_id, "run_name": name, "reason": f"missing param(s) {', '.join(missing)}"})
            continue
        try:
            num_params, n_train = float(params["num_params"]), float(params["n_train"])
            forward_flops = float(params["forward_flops"])
        except ValueError:
            skipped.append(
                {"run_id": run_id, "run_name": name, "reason": "non-numeric num_params/n_train/forward_flops"}
            )
            continue
        history = mlflow_client.get_metric_history(run_id, metric)
        if not history:
            skipped.append({"run_id": run_id, "run_name": name, "reason": f"no {metric} metric logged"})
            continue
        compute = {m.step: m.value for m in mlflow_client.get_metric_history(run_id, "compute_flops")}
        if params.get("schedule", "none") not in CONSTANT_SCHEDULES:
            non_constant.append(name)
        by_epoch = {m.step: m.value for m in sorted(history, key=lambda m: m.timestamp)}
        for epoch, value in sorted(by_epoch.items()):
            rows.append(
                {
                    "run_id": run_id,
                    "run_name": name,
                    "arch": params.get("arch", ""),
                    "num_params": num_params,
                    "forward_flops": forward_flops,
                    "n_train": n_train,
                    "epoch": float(epoch),
                    "compute_flops": compute.get(epoch, 3.0 * forward_flops * n_train * epoch),
                    "error": error_from_metric(metric, value),
                }
            )
    result = RunPoints(
        pd.DataFrame(
            rows,
            columns=[
                "run_id",
                "run_name",
                "arch",
                "num_params",
                "forward_flops",
                "n_train",
                "epoch",
                "compute_flops",
                "error",
            ],
        ),
        experiment_ids=[],
        skipped=skipped,
        runs_considered=considered,
    )
    if skipped:
        result.warnings.append(
            f"skipped {len(skipped)} run(s): " + "; ".join(f"{s['run_name']} ({s['reason']})" for s in skipped)
        )
    if non_constant and epochs == "all":
        result.warnings.append(
            f"{len(non_constant)} run(s) used a non-constant learning-rate schedule ({', '.join(non_constant[:5])}"
            f"{', ...' if len(non_constant) > 5 else ''}): their intermediate epochs are not what a shorter run "
            f"would reach; prefer --epochs final or train with schedule none"
        )
    return result


def load_run_points(
    *,
    experiment: str | None = None,
    sweep: str | None = None,
    tracking_uri: str | None = None,
    metric: str = "val_top1",
    jobs: Iterable[str] = DEFAULT_JOBS,
    epochs: str = "all",
) -> RunPoints:
    """Read the points table of an experiment or a sweep from the MLflow store."""
    uri = resolve_tracking_uri(tracking_uri)
    mlflow_client = client(uri)
    runs, experiment_ids = find_runs(mlflow_client, experiment=experiment, sweep=sweep)
    result = points_from_runs(mlflow_client, runs, metric=metric, jobs=jobs, epochs=epochs)
    result.experiment_ids = experiment_ids
    for message in result.warnings:
        log.warning(message)
    return result


def log_fit_run(
    *,
    tracking_uri: str | None,
    experiment: str | None,
    experiment_id: str | None,
    run_name: str,
    tags: Mapping[str, str],
    params: Mapping[str, Any],
    metrics: Mapping[str, float],
    out_dir: Path,
) -> tuple[str, str]:
    """Log the fit job's run: tags, params, the fitted numbers as metrics, out_dir as artifacts; (run_id, exp id)."""
    uri = resolve_tracking_uri(tracking_uri)
    mlflow_client = client(uri)
    if experiment_id is None:
        experiment_id = ensure_experiment(mlflow_client, experiment or "scaling-fits")
    run = mlflow_client.create_run(experiment_id, run_name=run_name, tags={TAG_JOB: "scaling_fit", **tags})
    run_id = run.info.run_id
    try:
        log_params(mlflow_client, run_id, params)
        for key, value in metrics.items():
            mlflow_client.log_metric(run_id, key, float(value))
        mlflow_client.log_artifacts(run_id, str(out_dir))
    except Exception:
        mlflow_client.set_terminated(run_id, status="FAILED")
        raise
    mlflow_client.set_terminated(run_id, status="FINISHED")
    return run_id, experiment_id
