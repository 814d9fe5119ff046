"""The pretraining driver: check config and data, open the MLflow run, run the Ray Train job, log the model.

`run_pretraining(cfg)` is what jobs/pretrain.py, Tune trials and the scaling grid call;
`dry_run(cfg)` answers "what would this cost" without training.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlpscale import tracking
from mlpscale.config import PretrainConfig, validate
from mlpscale.errors import MlpscaleError
from mlpscale.paths import dataset_dir, repo_root, split_path
from mlpscale.services import cpus_per_gpu_worker, ensure_ray
from mlpscale.train.spec import micro_batch, worker_spec

log = logging.getLogger(__name__)

RUN_FILE = "mlpscale_run.json"  # beside Ray Train's files: the MLflow run a Ray run name belongs to
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"


@dataclass
class PretrainResult:
    run_id: str
    experiment_id: str
    final_metrics: dict[str, float] = field(default_factory=dict)
    checkpoint_path: str | None = None
    model_uri: str | None = None


@dataclass
class DataSpec:
    """What the driver learnt about the dataset: paths, meta.json, and the training-set size."""

    directory: Path
    train_path: Path
    test_path: Path
    meta: dict[str, Any]
    resolution: int
    n_train: int


def check_data(cfg: PretrainConfig) -> DataSpec:
    """Find and check the .beton files and meta.json; MlpscaleError naming the fix otherwise."""
    from mlpscale.data.meta import load_meta

    resolution = cfg.image_resolution
    directory = dataset_dir(cfg.dataset, resolution, cfg.data_dir)
    meta = load_meta(directory)
    if meta.get("resolution") not in (None, resolution):
        raise MlpscaleError(f"{directory} holds {meta.get('dataset')} at resolution {meta.get('resolution')}, "
                            f"not {resolution}; pass --resolution {meta.get('resolution')} or convert again")
    if meta.get("dataset") not in (None, cfg.dataset):
        raise MlpscaleError(f"{directory} holds dataset {meta.get('dataset')!r}, not {cfg.dataset!r}; "
                            f"pass --dataset {meta.get('dataset')} or convert {cfg.dataset} again")
    train_path = split_path(cfg.dataset, resolution, "train", cfg.n_train, cfg.data_dir)
    test_path = split_path(cfg.dataset, resolution, "test", None, cfg.data_dir)
    for path in (train_path, test_path):
        if not path.is_file():
            subset = f" --n-train {cfg.n_train}" if (cfg.n_train and path == train_path) else ""
            raise MlpscaleError(
                f"missing {path}; create it with `python jobs/prepare_data.py {cfg.dataset} --resolution "
                f"{resolution}{subset} --data-dir {directory.parent.parent}`")
    n_train = cfg.n_train or int(meta["counts"]["train"])
    if cfg.n_train and cfg.n_train > int(meta["counts"]["train"]):
        raise MlpscaleError(f"n_train={cfg.n_train} exceeds the {meta['counts']['train']} training examples of "
                            f"{cfg.dataset}")
    if cfg.batch_size > n_train:
        raise MlpscaleError(f"batch_size={cfg.batch_size} is larger than the {n_train} training examples; "
                            f"pass --batch-size {_largest_power_of_two(n_train)} or less")
    return DataSpec(directory, train_path, test_path, meta, resolution, n_train)


def _largest_power_of_two(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


def model_summary(cfg: PretrainConfig, data: DataSpec) -> dict[str, Any]:
    from mlpscale.models import model_stats

    return model_stats(cfg.arch, resolution=data.resolution, num_classes=int(data.meta["num_classes"]),
                       expansion=cfg.expansion, normalization=cfg.normalization)


def dry_run(cfg: PretrainConfig) -> dict[str, Any]:
    """Validate config and data; the params, compute and memory estimate of the run, without training."""
    import torch

    from mlpscale.models import estimate_training_memory, training_compute
    from mlpscale.train.precision import resolve_precision

    validate(cfg)
    data = check_data(cfg)
    stats = model_summary(cfg, data)
    use_gpu = _use_gpu(cfg)
    device = torch.device("cuda" if use_gpu else "cpu")
    if use_gpu and not torch.cuda.is_available():  # GPU workers planned from elsewhere, e.g. a CPU-only head
        precision = "bf16" if cfg.precision == "auto" else cfg.precision
        device_name, device_memory = "cuda (no GPU on this machine: its memory is not checked)", None
    else:
        precision = resolve_precision(cfg.precision, device)
        device_name = f"cuda ({torch.cuda.get_device_name(0)})" if use_gpu else "cpu"
        device_memory = _device_memory(device)
    micro = micro_batch(cfg)
    memory = estimate_training_memory(cfg.arch, resolution=data.resolution,
                                      num_classes=int(data.meta["num_classes"]), batch_size=micro,
                                      optimizer=cfg.optimizer, precision=precision, expansion=cfg.expansion,
                                      normalization=cfg.normalization)
    per_epoch = training_compute(stats["forward_flops"], data.n_train, 1)
    return {
        "params": tracking.run_record_params(cfg, stats, data.meta),
        "num_params": stats["num_params"],
        "forward_flops": stats["forward_flops"],
        "flops_note": "one multiply-accumulate counted as one FLOP (paper Eq. 4: C = 3 * forward_flops * N * T)",
        "compute_per_epoch": per_epoch,
        "compute_total": training_compute(stats["forward_flops"], data.n_train, cfg.epochs),
        "device": device_name,
        "precision": precision,
        "micro_batch_per_worker": micro,
        "estimated_peak_memory_bytes": memory["total"],
        "estimated_memory_breakdown": memory,
        "device_memory_bytes": device_memory,
        "fits": (memory["total"] < device_memory) if device_memory else None,
        "train_path": str(data.train_path),
        "test_path": str(data.test_path),
    }


def _device_memory(device) -> int | None:
    import torch

    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(0).total_memory)
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def _use_gpu(cfg: PretrainConfig) -> bool:
    if cfg.use_gpu is not None:
        return bool(cfg.use_gpu)
    try:
        import ray

        if ray.is_initialized():
            return ray.cluster_resources().get("GPU", 0) >= 1
    except Exception:  # noqa: BLE001 - fall back to the local check
        pass
    import torch

    return torch.cuda.is_available()


def storage_root(cfg: PretrainConfig) -> Path:
    """Where Ray Train keeps runs and checkpoints: --storage-path or <repo>/ray_results (absolute).

    Only local paths and shared mounts are supported: every node of a cluster must see the same path.
    """
    if cfg.storage_path and "://" in cfg.storage_path:
        raise MlpscaleError(f"storage_path={cfg.storage_path!r}: URIs are not supported yet; use a path that "
                            "every node reaches (a shared mount such as /mnt/shared/ray_results)")
    return Path(cfg.storage_path).expanduser().resolve() if cfg.storage_path else repo_root() / "ray_results"


def default_run_name(cfg: PretrainConfig) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return re.sub(r"[^A-Za-z0-9_.-]", "_", f"pretrain-{cfg.dataset}-{cfg.arch}-{stamp}-{int(time.time() * 1e3) % 1000:03d}")


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


def _cpus_per_worker(cfg: PretrainConfig, use_gpu: bool) -> int:
    import ray

    available = int(ray.cluster_resources().get("CPU", 1))
    return cpus_per_gpu_worker(available, cfg.num_workers) if use_gpu else max(1, available // cfg.num_workers)


def run_pretraining(cfg: PretrainConfig, *, resume: bool = False, extra_tags: dict[str, str] | None = None,
                    extra_params: dict[str, Any] | None = None, run_config=None) -> PretrainResult:
    """Train `cfg` as a Ray Train job tracked in one MLflow run; MlpscaleError for user errors and failures."""
    validate(cfg)
    data = check_data(cfg)
    stats = model_summary(cfg, data)
    uri = tracking.resolve_tracking_uri(cfg.tracking_uri)

    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

    storage = storage_root(cfg)
    name = run_config.name if run_config is not None else (cfg.run_name or default_run_name(cfg))
    run_dir = storage / name
    run_file = run_dir / RUN_FILE
    mlflow_client = tracking.client(uri)
    if resume:
        if not run_file.is_file():
            raise MlpscaleError(f"nothing to resume for run name {name!r}: no {RUN_FILE} under {run_dir}; "
                                "pass the --run-name (and --storage-path) of an interrupted run")
        run_id = json.loads(run_file.read_text())["run_id"]
        experiment_id = mlflow_client.get_run(run_id).info.experiment_id
        tracking.mark_running(mlflow_client, run_id)
        if _has_tag(mlflow_client, run_id):
            mlflow_client.delete_tag(run_id, tracking.TAG_FAILURE)
        log.info("resuming Ray run %s into MLflow run %s", name, run_id)
    else:
        if run_file.is_file() or has_checkpoint(run_dir):
            raise MlpscaleError(f"run name {name!r} already exists under {storage}; pass --resume to continue it "
                                "or choose another --run-name")
        tags = {tracking.TAG_JOB: "pretrain", tracking.TAG_RAY_RUN: name, **(extra_tags or {})}
        params = {**tracking.run_record_params(cfg, stats, data.meta), **(extra_params or {})}
        run_id, experiment_id = tracking.start_run(uri, cfg.experiment, run_name=cfg.run_name or name, tags=tags,
                                                   params=params)
        tracking.log_dict_artifact(mlflow_client, run_id, cfg.to_dict(), "config.yaml")
        tracking.log_dict_artifact(mlflow_client, run_id, data.meta, "meta.json")
        run_dir.mkdir(parents=True, exist_ok=True)
        run_file.write_text(json.dumps({"run_id": run_id, "tracking_uri": uri, "experiment_id": experiment_id}))

    ensure_ray()
    use_gpu = _use_gpu(cfg)
    cpus = _cpus_per_worker(cfg, use_gpu)
    from ray.train.torch import TorchTrainer

    from mlpscale.train.loop import train_loop_per_worker

    if run_config is None:
        run_config = RunConfig(name=name, storage_path=str(storage),
                               failure_config=FailureConfig(max_failures=cfg.max_failures),
                               checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints))
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=worker_spec(cfg, data, stats, workers=cfg.num_workers, run_id=run_id, tracking_uri=uri,
                                      cpus_per_worker=cpus).loop_config(),
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cpus, **({"GPU": 1} if use_gpu else {})}),
        run_config=run_config,
    )
    try:
        result = trainer.fit()
    except Exception as error:  # Ray Train gave up (worker errors past max_failures, controller failure)
        reason = f"training failed: {type(error).__name__}: {str(error)[:1500]}"
        tracking.mark_failed(mlflow_client, run_id, reason)
        raise MlpscaleError(f"{reason}; MLflow run {run_id} marked FAILED; fix the cause and continue with "
                            f"--resume --run-name {name}") from error
    outcome = result.return_value or {}
    if outcome.get("status") not in (None, "ok"):
        if tracking.run_status(mlflow_client, run_id) != "FAILED":
            tracking.mark_failed(mlflow_client, run_id, outcome.get("reason", outcome["status"]))
        raise MlpscaleError(f"{outcome.get('reason')}; MLflow run {run_id} marked FAILED, checkpoints kept in "
                            f"{run_dir}")
    final_metrics = dict(outcome.get("metrics") or {})
    if not final_metrics and result.metrics:
        final_metrics = {k: v for k, v in result.metrics.items() if k in tracking.EPOCH_METRICS}
    checkpoint_path = result.checkpoint.path if result.checkpoint is not None else None
    model_uri = None
    if checkpoint_path:
        model_uri = log_final_model(cfg, data, uri, run_id, checkpoint_path)
    tracking.finish_run(mlflow_client, run_id)
    return PretrainResult(run_id, experiment_id, final_metrics, checkpoint_path, model_uri)


def _has_tag(mlflow_client, run_id: str) -> bool:
    return tracking.TAG_FAILURE in mlflow_client.get_run(run_id).data.tags


def log_final_model(cfg: PretrainConfig, data: DataSpec, uri: str, run_id: str, checkpoint_path: str) -> str | None:
    """Rebuild the model from the final checkpoint, log its weights picture and, unless `log_model` is off,
    the model (signature, input example, --register); returns the model URI (None without a model)."""
    import numpy as np

    from mlpscale.models import build_model
    from mlpscale.train.checkpoint import load_state
    from mlpscale.transfer.weights_picture import log_weights_picture

    state = load_state(checkpoint_path)
    model = build_model(cfg.arch, resolution=data.resolution, num_classes=int(data.meta["num_classes"]),
                        expansion=cfg.expansion, activation=cfg.activation, normalization=cfg.normalization,
                        dropout=cfg.dropout)
    model.load_state_dict(state["model"])
    log_weights_picture(model, data.resolution, run_id, uri)
    if not cfg.log_model:
        return None
    example = np.random.default_rng(cfg.seed).standard_normal((2, 3, data.resolution, data.resolution))
    return tracking.log_model(uri, run_id, model, example.astype(np.float32), register=cfg.register)
