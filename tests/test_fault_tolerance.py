"""Fault tolerance of pretraining: a killed train worker and a killed driver, then `--resume`.

One scenario, real processes throughout: `python jobs/pretrain.py` runs in its own process session
(its local Ray included). After the first checkpoint Ray Train registered, the train worker is
SIGKILLed: Ray Train must restart it from that checkpoint. After the restarted worker registered a
later checkpoint, the whole driver session is SIGKILLed (the driver's machine "dies"); the run is
then resumed with resume=True (what `--resume` passes) and must finish in the same MLflow run, every
epoch metric logged exactly once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mlpscale import services
from mlpscale.train.runs import SNAPSHOT_FILE

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 8
EXPERIMENT = "fault-test"
RUN_NAME = "fault-run"


def job_overrides(data_root: Path, storage: Path) -> dict:
    return {
        "arch": "B_2-Wi_64",
        "n_train": 600,
        "epochs": EPOCHS,
        "batch_size": 32,
        "schedule": "none",
        "loader_workers": 1,
        "checkpoint_every": 1,
        "keep_checkpoints": 2,
        "max_failures": 2,
        "data_dir": str(data_root),
        "storage_path": str(storage),
        "experiment": EXPERIMENT,
        "run_name": RUN_NAME,
        "log_model": False,
    }


def latest_checkpoint(run_dir: Path) -> tuple[int, float]:
    """Epoch and write time of the newest checkpoint Ray Train's controller registered ((0, 0) when none yet)."""
    try:
        snapshot = json.loads((run_dir / SNAPSHOT_FILE).read_text())
        latest = snapshot.get("latest_checkpoint_result") or {}
        written = (run_dir / latest["checkpoint_dir_name"]).stat().st_mtime
    except (OSError, ValueError, KeyError):
        return 0, 0.0
    return int((latest.get("metrics") or {}).get("epoch", 0)), written


def latest_checkpoint_epoch(run_dir: Path) -> int:
    return latest_checkpoint(run_dir)[0]


def train_workers(session: int) -> list[int]:
    """Pids of the Ray Train worker actors among the processes of one session."""
    found = []
    for pid in services.session_processes([session]):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        if title.startswith("ray::RayTrainWorker"):
            found.append(pid)
    return sorted(found)


def wait_for(condition, what: str, driver: subprocess.Popen, log: Path, timeout: float = 400.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if driver.poll() is not None:
            pytest.fail(f"the job ended (status {driver.returncode}) before {what}:\n{log.read_text()[-4000:]}")
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}:\n{log.read_text()[-4000:]}")


def epoch_history(client, run_id: str) -> dict[str, list[int]]:
    from mlpscale.tracking import EPOCH_METRICS

    return {name: [m.step for m in client.get_metric_history(run_id, name)] for name in EPOCH_METRICS}


def test_worker_kill_then_driver_kill_then_resume_keep_one_gap_free_history(
    digits_dir, tracking_uri, tmp_path, ray_local
):
    from mlflow.tracking import MlflowClient

    from mlpscale.config import load_config
    from mlpscale.train.pretrain import run_pretraining

    storage = tmp_path / "ray_results"
    run_dir = storage / RUN_NAME
    overrides = job_overrides(digits_dir, storage)
    args = [f"--{key.replace('_', '-')}={value}" for key, value in overrides.items()]
    log = tmp_path / "driver.log"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    with open(log, "wb") as out:
        driver = subprocess.Popen(
            [sys.executable, "jobs/pretrain.py", *args],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        # (a) kill the train worker once Ray Train registered a checkpoint
        wait_for(lambda: latest_checkpoint_epoch(run_dir), "the first registered checkpoint", driver, log)
        [worker] = wait_for(lambda: train_workers(driver.pid), "the train worker", driver, log)
        os.kill(worker, signal.SIGKILL)
        killed_at = time.time()

        # Ray Train restarts the worker from the checkpoint; wait until the new worker wrote a checkpoint
        # (one written after the kill) and the controller registered it
        def restarted():
            workers = [pid for pid in train_workers(driver.pid) if pid != worker]
            epoch, written = latest_checkpoint(run_dir)
            return workers if (workers and written > killed_at and epoch > 0) else None

        [new_worker] = wait_for(restarted, "a checkpoint from the restarted worker", driver, log)
        os.kill(new_worker, signal.SIGSTOP)  # freeze progress so the run cannot finish before the driver dies
        reached = latest_checkpoint_epoch(run_dir)
        assert reached < EPOCHS, "the job finished before the driver could be killed; raise EPOCHS"

        # (b) kill the driver with its whole local Ray (session), then continue with resume=True
        services.kill_sessions([driver.pid])
        driver.wait(timeout=30)
    finally:
        if driver.poll() is None or services.session_processes([driver.pid]):
            services.kill_sessions([driver.pid])
            driver.wait(timeout=30)

    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    [interrupted] = client.search_runs([experiment.experiment_id])
    assert interrupted.info.status == "RUNNING"
    logged = epoch_history(client, interrupted.info.run_id)
    for name, steps in logged.items():  # gap-free, duplicate-free so far, through the restart
        assert steps == list(range(1, len(steps) + 1)), f"{name}: {steps}"
        assert len(steps) >= reached

    result = run_pretraining(load_config(overrides=overrides), resume=True)

    assert result.run_id == interrupted.info.run_id
    runs = client.search_runs([experiment.experiment_id])
    assert [run.info.run_id for run in runs] == [result.run_id]
    assert runs[0].info.status == "FINISHED"
    for name, steps in epoch_history(client, result.run_id).items():
        assert steps == list(range(1, EPOCHS + 1)), f"{name}: {steps}"
    assert 0.0 <= result.final_metrics["val_top1"] <= 1.0
