"""MLflow for sweeps: the sweep's parent run, one child run per trial, the trials table, end-of-sweep reconciliation."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from mlpscale.tracking import (
    TAG_FAILURE,
    TAG_JOB,
    TAG_PARENT,
    TAG_SWEEP_ID,
    client,
    ensure_experiment,
    last_logged_epoch,
    log_params,
)

log = logging.getLogger(__name__)

TAG_TRIAL_ID = "mlpscale.trial_id"
TAG_PLACEMENT_GROUP = "mlpscale.placement_group"
TAG_NODE_IDS = "mlpscale.node_ids"
TAG_STOPPED = "mlpscale.stopped"


def start_sweep_run(
    uri: str, experiment: str, sweep_id: str, *, run_name: str | None = None, params: Mapping[str, Any] | None = None
) -> tuple[str, str]:
    """The sweep's parent run (tags mlpscale.job=sweep, mlpscale.sweep_id); returns (run_id, experiment_id)."""
    mlflow_client = client(uri)
    experiment_id = ensure_experiment(mlflow_client, experiment)
    run = mlflow_client.create_run(
        experiment_id, run_name=run_name or sweep_id, tags={TAG_JOB: "sweep", TAG_SWEEP_ID: sweep_id}
    )
    if params:
        log_params(mlflow_client, run.info.run_id, params)
    return run.info.run_id, experiment_id


def find_sweep_run(uri: str, experiment: str, sweep_id: str) -> str | None:
    """The parent run of sweep `sweep_id` in `experiment`, or None."""
    mlflow_client = client(uri)
    found = mlflow_client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = mlflow_client.search_runs(
        [found.experiment_id],
        filter_string=f"tags.`{TAG_JOB}` = 'sweep' and tags.`{TAG_SWEEP_ID}` = '{sweep_id}'",
        order_by=["attributes.start_time ASC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def reopen_run(uri: str, run_id: str) -> None:
    client(uri).update_run(run_id, status="RUNNING")


def start_trial_run(
    uri: str,
    experiment: str,
    *,
    parent_run_id: str,
    sweep_id: str,
    trial_id: str,
    run_name: str | None = None,
    extra_tags: Mapping[str, str] | None = None,
) -> str:
    """A trial's child run (mlflow.parentRunId, mlpscale.job=trial, mlpscale.sweep_id, mlpscale.trial_id).

    A RUNNING child run left by an earlier attempt of the same trial (the driver was killed) ends as KILLED.
    """
    mlflow_client = client(uri)
    experiment_id = ensure_experiment(mlflow_client, experiment)
    for earlier in trial_runs(uri, parent_run_id, trial_id=trial_id):
        if earlier.info.status == "RUNNING":
            epoch = last_logged_epoch(mlflow_client, earlier.info.run_id)
            mlflow_client.set_tag(
                earlier.info.run_id, TAG_STOPPED, f"interrupted after epoch {epoch}; the trial restarted on resume"
            )
            mlflow_client.set_terminated(earlier.info.run_id, status="KILLED")
    tags = {TAG_JOB: "trial", TAG_PARENT: parent_run_id, TAG_SWEEP_ID: sweep_id, TAG_TRIAL_ID: trial_id}
    tags.update(extra_tags or {})
    run = mlflow_client.create_run(experiment_id, run_name=run_name or trial_id, tags=tags)
    return run.info.run_id


def trial_runs(uri: str, parent_run_id: str, *, trial_id: str | None = None) -> list:
    """The child runs of a sweep (all attempts), oldest first."""
    mlflow_client = client(uri)
    parent = mlflow_client.get_run(parent_run_id)
    query = f"tags.`{TAG_PARENT}` = '{parent_run_id}'"
    if trial_id:
        query += f" and tags.`{TAG_TRIAL_ID}` = '{trial_id}'"
    return list(
        mlflow_client.search_runs(
            [parent.info.experiment_id], filter_string=query, order_by=["attributes.start_time ASC"], max_results=10000
        )
    )


def record_placement_group(uri: str, run_id: str, placement_group_hex: str) -> None:
    client(uri).set_tag(run_id, TAG_PLACEMENT_GROUP, placement_group_hex)


def record_node(uri: str, run_id: str, node_id: str) -> None:
    """Append the Ray node a trial's Train worker (re)started on to the run's node list (comma separated)."""
    mlflow_client = client(uri)
    nodes = [n for n in mlflow_client.get_run(run_id).data.tags.get(TAG_NODE_IDS, "").split(",") if n]
    mlflow_client.set_tag(run_id, TAG_NODE_IDS, ",".join([*nodes, node_id]))


def placement_groups(runs: Iterable) -> list[str]:
    """The placement-group ids the trials' Train workers ran in (hex)."""
    return [run.data.tags[TAG_PLACEMENT_GROUP] for run in runs if run.data.tags.get(TAG_PLACEMENT_GROUP)]


def reconcile_trial_runs(uri: str, parent_run_id: str) -> dict[str, str]:
    """End child runs still RUNNING after the sweep: FINISHED when every epoch was logged, else KILLED.

    Ray Tune stops trials (ASHA, end of experiment) by killing their actors, so the trial never ends its run.
    Returns {run_id: new status}.
    """
    mlflow_client = client(uri)
    changed = {}
    for run in trial_runs(uri, parent_run_id):
        if run.info.status != "RUNNING":
            continue
        epochs = int(run.data.params.get("epochs", 0) or 0)
        done = last_logged_epoch(mlflow_client, run.info.run_id)
        if epochs and done >= epochs:
            status = "FINISHED"
        else:
            status = "KILLED"
            mlflow_client.set_tag(run.info.run_id, TAG_STOPPED, f"stopped by Ray Tune after epoch {done}")
        mlflow_client.set_terminated(run.info.run_id, status=status)
        changed[run.info.run_id] = status
    return changed


def trials_table(uri: str, parent_run_id: str, fields: list[str], metric: str, mode: str):
    """One row per child run: trial id, run id, status, the searched fields, best and last metric, epochs run."""
    import pandas as pd

    mlflow_client = client(uri)
    rows = []
    for run in trial_runs(uri, parent_run_id):
        history = sorted(mlflow_client.get_metric_history(run.info.run_id, metric), key=lambda m: m.step)
        values = [m.value for m in history]
        best = (max(values) if mode == "max" else min(values)) if values else None
        row = {"trial_id": run.data.tags.get(TAG_TRIAL_ID), "run_id": run.info.run_id, "status": run.info.status}
        for name in fields:  # the sampled value (lr before any --lr-scaling)
            sampled = run.data.params.get("base_lr") if name == "lr" else None
            row[name] = _param_value(sampled or run.data.params.get(name))
        row["lr_trained"] = _param_value(run.data.params.get("lr"))
        row[f"best_{metric}"] = best
        row[f"last_{metric}"] = values[-1] if values else None
        row["epochs_run"] = history[-1].step if history else 0
        row["epochs"] = int(run.data.params.get("epochs", 0) or 0)
        row["reason"] = run.data.tags.get(TAG_FAILURE) or run.data.tags.get(TAG_STOPPED) or ""
        rows.append(row)
    columns = [
        "trial_id",
        "run_id",
        "status",
        *fields,
        "lr_trained",
        f"best_{metric}",
        f"last_{metric}",
        "epochs_run",
        "epochs",
        "reason",
    ]
    return pd.DataFrame(rows, columns=columns)


def _param_value(text: str | None) -> Any:
    if text is None:
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def log_sweep_summary(
    uri: str, run_id: str, *, best: Mapping[str, Any] | None, files: Iterable, status: str = "FINISHED"
) -> None:
    """Upload the sweep's files (space, best config, table, plots), log the best trial, end the parent run."""
    mlflow_client = client(uri)
    for path, artifact_dir in files:
        mlflow_client.log_artifact(run_id, str(path), artifact_dir)
    if best:
        for key, value in best.items():
            if isinstance(value, (int, float)) and value is not None:
                mlflow_client.log_metric(run_id, key, float(value))
            else:
                mlflow_client.set_tag(run_id, f"mlpscale.{key}", str(value))
    mlflow_client.set_terminated(run_id, status=status)


def run_config_artifact(uri: str, run_id: str) -> dict[str, Any]:
    """The config.yaml a run logged (the exact config it trained)."""
    import tempfile

    import mlflow.artifacts
    import yaml

    with tempfile.TemporaryDirectory() as tmp:
        path = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path="config.yaml", dst_path=tmp, tracking_uri=uri
        )
        return yaml.safe_load(open(path).read())
