"""Real sweeps on digits: local Ray, Optuna's TPE, one-worker Ray Train trials, nested MLflow runs, resume.

Tiny trials (B_2-Wi_32, 2 epochs, 300 digits at 16 px), 2 at a time on the session's 2-CPU Ray.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from mlpscale import tracking
from mlpscale.config import PretrainConfig, load_config
from mlpscale.tracking import sweeps

REPO = Path(__file__).resolve().parents[1]
TRIAL_ARGS = {"arch": "B_2-Wi_32", "epochs": 2, "warmup_epochs": 0.5, "n_train": 300, "loader_workers": 1}


def base_config(digits_dir, tmp_path, uri, **changes) -> PretrainConfig:
    return PretrainConfig(
        **{
            **TRIAL_ARGS,
            "data_dir": str(digits_dir),
            "storage_path": str(tmp_path / "ray"),
            "tracking_uri": uri,
            "experiment": "sweeps",
            **changes,
        }
    )


def child_runs(uri: str, parent_run_id: str) -> list:
    return sweeps.trial_runs(uri, parent_run_id)


def test_sweep_of_four_trials_with_a_failing_one(digits_dir, tmp_path, tracking_uri, ray_local):
    from mlpscale.tune import report
    from mlpscale.tune.sweep import SweepOptions, run_sweep

    space = tmp_path / "space.yaml"
    # lr 1e30 overflows the weights within the first epoch: that trial must fail (NaN) while the sweep goes on.
    space.write_text(
        yaml.safe_dump(
            {
                "lr": {"distribution": "choice", "values": [0.003, 1.0e30]},
                "batch_size": {"distribution": "choice", "values": [32, 64]},
            }
        )
    )
    options = SweepOptions(
        space=str(space),
        num_samples=4,
        max_concurrent=2,
        scheduler="asha",
        lr_scaling="linear",
        base_batch_size=32,
        seed=0,
        name="four",
    )
    result = run_sweep(base_config(digits_dir, tmp_path, tracking_uri), options)

    client = tracking.client(tracking_uri)
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags[tracking.TAG_JOB] == "sweep" and parent.data.tags[tracking.TAG_SWEEP_ID] == "four"
    assert parent.data.params["num_samples"] == "4" and parent.data.params["metric"] == "val_top1"
    assert "optuna" in parent.data.params["searcher"].lower()
    artifacts = {a.path for a in client.list_artifacts(result.parent_run_id)}
    assert {"search_space.yaml", "best_config.yaml", "trials.csv", "trials.parquet", "plots"} <= artifacts
    assert "plots/optimization_history.png" in {a.path for a in client.list_artifacts(result.parent_run_id, "plots")}

    children = child_runs(tracking_uri, result.parent_run_id)
    assert len(children) == 4 and len(result.table) == 4
    statuses = {run.info.status for run in children}
    assert statuses <= {"FINISHED", "FAILED", "KILLED"} and {"FINISHED", "FAILED"} <= statuses
    for run in children:
        tags, params = run.data.tags, run.data.params
        assert tags[tracking.TAG_PARENT] == result.parent_run_id
        assert tags[tracking.TAG_JOB] == "trial" and tags[tracking.TAG_SWEEP_ID] == "four"
        assert set(tracking.RECORD_PARAMS) <= set(params), set(tracking.RECORD_PARAMS) - set(params)
        assert params["lr_scaling"] == "linear"
        assert float(params["lr"]) == pytest.approx(float(params["base_lr"]) * int(params["batch_size"]) / 32)
        epochs_logged = tracking.last_logged_epoch(client, run.info.run_id)
        if run.info.status == "FAILED":
            assert "non-finite" in tags[tracking.TAG_FAILURE]
            assert float(params["base_lr"]) == 1e30
        elif run.info.status == "KILLED":  # stopped early by ASHA
            assert "stopped by Ray Tune after epoch" in tags[sweeps.TAG_STOPPED]
            assert epochs_logged < 2
        else:
            assert epochs_logged == 2
            assert set(tracking.EPOCH_METRICS) <= set(run.data.metrics)
            assert 0.0 <= run.data.metrics["val_top1"] <= 1.0
            models = client.search_logged_models(
                [run.info.experiment_id], filter_string=f"source_run_id='{run.info.run_id}'"
            )
            assert models, "a finished trial logs its model"
    failed = sum(run.info.status == "FAILED" for run in children)
    assert result.errors == failed

    best_run = client.get_run(result.best["best_run_id"])
    assert best_run.info.status == "FINISHED"
    finished = [r for r in children if r.info.status == "FINISHED"]
    assert (
        best_run.data.metrics["val_top1"]
        <= result.best["best_val_top1"]
        == max(max(m.value for m in client.get_metric_history(r.info.run_id, "val_top1")) for r in finished)
    )
    best = load_config(result.best_config_path)
    assert best.lr == float(best_run.data.params["lr"]) and best.batch_size == int(best_run.data.params["batch_size"])
    assert best.arch == "B_2-Wi_32"

    import ray

    table = ray.util.placement_group_table()
    assert all(table.get(pg, {}).get("state") not in ("CREATED", "PENDING") for pg in sweeps.placement_groups(children))
    printed = report.summary(result)  # what jobs/tune.py and jobs/scaling_grid.py print at the end
    assert all(run.data.tags[sweeps.TAG_TRIAL_ID] in printed for run in children)
    assert f"best config: {result.best_config_path}" in printed


def test_resume_after_the_driver_is_killed(digits_dir, tmp_path, tracking_uri, ray_local):
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"lr": {"distribution": "loguniform", "low": 1e-3, "high": 3e-3}}))
    storage = tmp_path / "ray"
    command = [
        sys.executable,
        str(REPO / "jobs" / "tune.py"),
        "--space",
        str(space),
        "--num-samples",
        "2",
        "--max-concurrent",
        "2",
        "--name",
        "resumable",
        "--storage-path",
        str(storage),
        "--data-dir",
        str(digits_dir),
        "--experiment",
        "sweeps",
        "--tracking-uri",
        tracking_uri,
        "--log-model",
        "false",
        *[f"--{k.replace('_', '-')}={v}" for k, v in TRIAL_ARGS.items()],
    ]
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    assert sweeps.find_sweep_run(tracking_uri, "sweeps", "resumable") is None  # creates the store before the job
    log_file = open(tmp_path / "first.log", "w")
    driver = subprocess.Popen(command, cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    finished_before: dict[str, float] = {}
    deadline = time.monotonic() + 400
    try:
        while time.monotonic() < deadline and driver.poll() is None:
            parent_id = sweeps.find_sweep_run(tracking_uri, "sweeps", "resumable")
            if parent_id:
                finished_before = {
                    r.info.run_id: r.info.end_time
                    for r in child_runs(tracking_uri, parent_id)
                    if r.info.status == "FINISHED"
                }
                if finished_before:
                    break
            time.sleep(1.0)
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
        log_file.close()
    assert finished_before, (tmp_path / "first.log").read_text()[-3000:]

    resumed = subprocess.run(
        [
            *command[:2],
            "--resume",
            "--name",
            "resumable",
            "--storage-path",
            str(storage),
            "--tracking-uri",
            tracking_uri,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "best config:" in resumed.stdout

    client = tracking.client(tracking_uri)
    experiment = client.get_experiment_by_name("sweeps")
    parents = client.search_runs([experiment.experiment_id], filter_string="tags.`mlpscale.job` = 'sweep'")
    assert len(parents) == 1 and parents[0].info.run_id == parent_id  # the same parent run continued
    assert parents[0].info.status == "FINISHED"
    children = child_runs(tracking_uri, parent_id)
    trial_ids = [run.data.tags[sweeps.TAG_TRIAL_ID] for run in children]
    assert len(set(trial_ids)) == 2 and len(trial_ids) == 2  # one run per trial: nothing ran twice
    for run in children:
        assert run.info.status == "FINISHED"
        assert tracking.last_logged_epoch(client, run.info.run_id) == 2
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_top1")]
        assert sorted(steps) == [1, 2]  # a continued trial does not log an epoch twice
        if run.info.run_id in finished_before:
            assert run.info.end_time == finished_before[run.info.run_id]  # finished trials were not rerun
