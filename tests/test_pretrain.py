"""The pretraining job on a real local Ray cluster, real .beton files and a real MLflow sqlite store."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from faults import nonfinite_loss_worker

from mlpscale import tracking
from mlpscale.config import load_config
from mlpscale.errors import MlpscaleError
from mlpscale.models import model_stats
from mlpscale.train.pretrain import run_pretraining
from mlpscale.train.runs import RUN_FILE, has_checkpoint

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("pretrain_job", REPO / "jobs" / "pretrain.py")
pretrain_job = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pretrain_job)

TINY = {
    "arch": "B_2-Wi_32",
    "epochs": 2,
    "batch_size": 64,
    "n_train": 300,
    "lr": 1e-3,
    "loader_workers": 1,
    "warmup_epochs": 0.5,
}


def tiny(digits_dir, tmp_path, **overrides):
    return load_config(
        overrides={**TINY, "data_dir": str(digits_dir), "storage_path": str(tmp_path / "ray"), **overrides}
    )


def metric_steps(mlflow_client, run_id, name):
    return sorted(m.step for m in mlflow_client.get_metric_history(run_id, name))


def test_end_to_end_run_record_model_and_resume(digits_dir, tracking_uri, tmp_path, ray_local):
    cfg = tiny(
        digits_dir,
        tmp_path,
        run_name="e2e",
        register="tiny-digits",
        mixup_alpha=0.2,
        label_smoothing=0.1,
        grad_clip=1.0,
    )
    result = run_pretraining(cfg)
    mlflow_client = tracking.client(tracking_uri)
    run = mlflow_client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags[tracking.TAG_JOB] == "pretrain"

    stats = model_stats("B_2-Wi_32", resolution=16, num_classes=10)
    params = run.data.params
    assert set(tracking.RECORD_PARAMS) <= set(params)
    assert params["arch"] == "B_2-Wi_32" and params["n_train"] == "300" and params["resolution"] == "16"
    assert int(params["forward_flops"]) == stats["forward_flops"]
    assert int(params["num_params"]) == stats["num_params"]

    for name in tracking.EPOCH_METRICS:
        assert metric_steps(mlflow_client, result.run_id, name) == [1, 2], name
    compute = {m.step: m.value for m in mlflow_client.get_metric_history(result.run_id, "compute_flops")}
    assert compute == {t: 3 * stats["forward_flops"] * 300 * t for t in (1, 2)}
    for name in ("train_top1", "val_top1", "val_top5"):
        assert all(0 <= m.value <= 1 for m in mlflow_client.get_metric_history(result.run_id, name))
    assert result.final_metrics["val_top1"] > 0.2  # 10 classes: well above chance after 2 epochs

    artifacts = {a.path for a in mlflow_client.list_artifacts(result.run_id)}
    assert {"config.yaml", "meta.json"} <= artifacts
    plots = {a.path for a in mlflow_client.list_artifacts(result.run_id, "plots")}
    assert "plots/first_layer_weights.png" in plots
    model = tracking.load_model(result.model_uri, tracking_uri)
    logits = model(torch.from_numpy(np.zeros((3, 3, 16, 16), np.float32)))
    assert logits.shape == (3, 10)
    versions = mlflow_client.search_model_versions("name='tiny-digits'")
    assert len(versions) == 1

    # --resume continues the finished run from its last checkpoint into the same MLflow run
    longer = tiny(digits_dir, tmp_path, run_name="e2e", epochs=3)
    resumed = run_pretraining(longer, resume=True)
    assert resumed.run_id == result.run_id
    assert metric_steps(mlflow_client, result.run_id, "val_top1") == [1, 2, 3]
    # a fresh run under a taken name is refused
    with pytest.raises(MlpscaleError, match="--resume"):
        run_pretraining(longer)


def test_nonfinite_loss_marks_the_run_failed_and_keeps_checkpoints(
    digits_dir, tracking_uri, tmp_path, ray_local, monkeypatch
):
    # the loss turns NaN at the first step of epoch 2 (epoch 1 has 300 // 64 steps of 64 of the 300 digits)
    monkeypatch.setattr("mlpscale.train.loop.train_loop_per_worker", nonfinite_loss_worker(after_steps=300 // 64))
    cfg = tiny(digits_dir, tmp_path, run_name="nan", arch="S_1-Wi_16")
    with pytest.raises(MlpscaleError, match="non-finite"):
        run_pretraining(cfg)
    run_dir = tmp_path / "ray" / "nan"
    run_id = json.loads((run_dir / RUN_FILE).read_text())["run_id"]
    run = tracking.client(tracking_uri).get_run(run_id)
    assert run.info.status == "FAILED"
    assert "non-finite" in run.data.tags[tracking.TAG_FAILURE]
    assert has_checkpoint(run_dir)  # the epoch-1 checkpoint is still there
    assert metric_steps(tracking.client(tracking_uri), run_id, "val_top1") == [1]


def test_data_parallel_two_workers(digits_dir, tracking_uri, tmp_path, ray_local):
    cfg = tiny(digits_dir, tmp_path, run_name="ddp", num_workers=2, epochs=1, schedule="cosine", log_model=False)
    result = run_pretraining(cfg)
    mlflow_client = tracking.client(tracking_uri)
    assert metric_steps(mlflow_client, result.run_id, "train_loss") == [1]
    assert mlflow_client.get_run(result.run_id).data.params["num_workers"] == "2"


def test_dry_run_prints_compute_and_memory(digits_dir, capsys):
    code = pretrain_job.main(
        ["--dry-run", "--data-dir", str(digits_dir), "--arch", "B_2-Wi_32", "--n-train", "600", "--epochs", "3"]
    )
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    flops = model_stats("B_2-Wi_32", resolution=16, num_classes=10)["forward_flops"]
    assert report["forward_flops"] == flops
    assert report["compute_per_epoch"] == 3 * flops * 600
    assert report["compute_total"] == 3 * flops * 600 * 3
    assert report["params"]["n_train"] == 600
    assert report["estimated_peak_memory_bytes"] > 0 and report["device_memory_bytes"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="plans GPU workers from a machine without a GPU")
def test_dry_run_for_gpu_workers_from_a_machine_without_one(digits_dir, capsys):
    code = pretrain_job.main(["--dry-run", "--data-dir", str(digits_dir), "--arch", "B_2-Wi_32", "--use-gpu", "true"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["device"].startswith("cuda (no GPU on this machine")
    assert report["precision"] == "bf16" and report["fits"] is None and report["device_memory_bytes"] is None
    assert report["estimated_peak_memory_bytes"] > 0


@pytest.fixture
def mismatched_dir(digits_dir, tmp_path):
    """A copy of the 16 px digits filed under res32: its meta.json says 16."""
    target = tmp_path / "data" / "digits" / "res32"
    shutil.copytree(digits_dir / "digits" / "res16", target)
    return tmp_path / "data"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--arch", "C_3-Wi_10"], "unknown architecture 'C_3-Wi_10'"),
        (["--n-train", "450"], "prepare_data.py digits --resolution 16 --n-train 450"),
        (["--n-train", "300", "--batch-size", "512"], "batch_size=512 is larger than the 300"),
        (["--tracking-uri", "http://127.0.0.1:9"], "http://127.0.0.1:9"),
        (["--optimizer", "adam"], "lion, adamw, sgd"),
        (["--resume", "--run-name", "never-ran"], "nothing to resume for run name 'never-ran'"),
    ],
)
def test_bad_input_is_one_clear_line(args, message, digits_dir, tracking_uri, tmp_path, capsys):
    code = pretrain_job.main(["--data-dir", str(digits_dir), "--storage-path", str(tmp_path / "ray"), *args])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "Traceback" not in err


def test_resolution_mismatch_and_missing_dataset(mismatched_dir, tmp_path, capsys):
    assert pretrain_job.main(["--data-dir", str(mismatched_dir), "--resolution", "32"]) == 2
    assert "--resolution 16" in capsys.readouterr().err
    assert pretrain_job.main(["--data-dir", str(tmp_path / "empty"), "--dataset", "cifar10"]) == 2
    assert "prepare_data.py cifar10 --resolution 32" in capsys.readouterr().err


def test_cli_exit_code_without_traceback(tmp_path):
    done = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "pretrain.py"), "--data-dir", str(tmp_path), "--epochs", "-3"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "epochs=-3 must be positive" in done.stderr and "Traceback" not in done.stderr


SINGLE_GROUP_SCRIPT = """
import sys
import torch.distributed as dist
from mlpscale.train.loop import drop_single_worker_process_group
dist.init_process_group("gloo", init_method=f"file://{sys.argv[1]}", rank=0, world_size=1)
drop_single_worker_process_group(2)
kept = dist.is_initialized()
drop_single_worker_process_group(1)
print(kept, dist.is_initialized())
"""


def test_a_single_worker_closes_the_process_group_ray_train_opens(tmp_path):
    """A real gloo group of one: closed for world size 1 (its thread wakes 100x/s), kept otherwise."""
    out = subprocess.run(
        [sys.executable, "-c", SINGLE_GROUP_SCRIPT, str(tmp_path / "store")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "False"]
