"""The pretraining driver: check config and data, open (or reopen) the MLflow run, launch the Ray Train job.

`run_pretraining(cfg)` is what jobs/pretrain.py calls (Tune trials and the scaling grid reuse its
data check and model summary around the same launcher, train/launch.py); `dry_run(cfg)` answers
"what would this cost" without training. Run names, storage and `--resume` live in train/runs.py.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlpscale import tracking
from mlpscale.config import PretrainConfig, validate
from mlpscale.errors import MlpscaleError
from mlpscale.paths import dataset_dir, split_path
from mlpscale.ray_cluster import cpus_per_gpu_worker, ensure_ray
from mlpscale.train import runs
from mlpscale.train.launch import FailureWording, launch
from mlpscale.train.spec import micro_batch, worker_spec

log = logging.getLogger(__name__)


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
        raise MlpscaleError(
            f"{directory} holds {meta.get('dataset')} at resolution {meta.get('resolution')}, "
            f"not {resolution}; pass --resolution {meta.get('resolution')} or convert again"
        )
    if meta.get("dataset") not in (None, cfg.dataset):
        raise MlpscaleError(
            f"{directory} holds dataset {meta.get('dataset')!r}, not {cfg.dataset!r}; "
            f"pass --dataset {meta.get('dataset')} or convert {cfg.dataset} again"
        )
    train_path = split_path(cfg.dataset, resolution, "train", cfg.n_train, cfg.data_dir)
    test_path = split_path(cfg.dataset, resolution, "test", None, cfg.data_dir)
    for path in (train_path, test_path):
        if not path.is_file():
            subset = f" --n-train {cfg.n_train}" if (cfg.n_train and path == train_path) else ""
            raise MlpscaleError(
                f"missing {path}; create it with `python jobs/prepare_data.py {cfg.dataset} --resolution "
                f"{resolution}{subset} --data-dir {directory.parent.parent}`"
            )
    n_train = cfg.n_train or int(meta["counts"]["train"])
    if cfg.n_train and cfg.n_train > int(meta["counts"]["train"]):
        raise MlpscaleError(
            f"n_train={cfg.n_train} exceeds the {meta['counts']['train']} training examples of {cfg.dataset}"
        )
    if cfg.batch_size > n_train:
        raise MlpscaleError(
            f"batch_size={cfg.batch_size} is larger than the {n_train} training examples; "
            f"pass --batch-size {_largest_power_of_two(n_train)} or less"
        )
    return DataSpec(directory, train_path, test_path, meta, resolution, n_train)


def _largest_power_of_two(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


def model_summary(cfg: PretrainConfig, data: DataSpec) -> dict[str, Any]:
    from mlpscale.models import model_stats

    return model_stats(
        cfg.arch,
        resolution=data.resolution,
        num_classes=int(data.meta["num_classes"]),
        expansion=cfg.expansion,
        normalization=cfg.normalization,
    )


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
    memory = estimate_training_memory(
        cfg.arch,
        resolution=data.resolution,
        num_classes=int(data.meta["num_classes"]),
        batch_size=micro,
        optimizer=cfg.optimizer,
        precision=precision,
        expansion=cfg.expansion,
        normalization=cfg.normalization,
    )
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


def _cpus_per_worker(cfg: PretrainConfig, use_gpu: bool) -> int:
    import ray

    available = int(ray.cluster_resources().get("CPU", 1))
    return cpus_per_gpu_worker(available, cfg.num_workers) if use_gpu else max(1, available // cfg.num_workers)


def run_pretraining(
    cfg: PretrainConfig,
    *,
    resume: bool = False,
    extra_tags: dict[str, str] | None = None,
    extra_params: dict[str, Any] | None = None,
) -> PretrainResult:
    """Train `cfg` as a Ray Train job tracked in one MLflow run; MlpscaleError for user errors and failures."""
    validate(cfg)
    data = check_data(cfg)
    stats = model_summary(cfg, data)
    uri = tracking.resolve_tracking_uri(cfg.tracking_uri)
    storage = runs.storage_root(cfg)
    name = runs.run_name(cfg)
    run_dir = storage / name
    mlflow_client = tracking.client(uri)
    if resume:
        run_id, experiment_id = runs.reopen_run(mlflow_client, run_dir)
    else:
        runs.refuse_taken_name(run_dir)
        run_id, experiment_id = _start_run(cfg, data, stats, uri, name, extra_tags, extra_params)
        runs.record_run(run_dir, run_id=run_id, tracking_uri=uri, experiment_id=experiment_id)

    ensure_ray()
    use_gpu = _use_gpu(cfg)
    spec = worker_spec(
        cfg,
        data,
        stats,
        workers=cfg.num_workers,
        run_id=run_id,
        tracking_uri=uri,
        cpus_per_worker=_cpus_per_worker(cfg, use_gpu),
    )
    failure = FailureWording(
        crashed="training failed",
        crash_error=lambda reason: MlpscaleError(
            f"{reason}; MLflow run {run_id} marked FAILED; fix the cause and continue with --resume --run-name {name}"
        ),
        stop_error=lambda reason: MlpscaleError(
            f"{reason}; MLflow run {run_id} marked FAILED, checkpoints kept in {run_dir}"
        ),
    )
    launched = launch(
        spec, name=name, storage_path=storage, use_gpu=use_gpu, max_failures=cfg.max_failures, failure=failure
    )
    return PretrainResult(run_id, experiment_id, launched.metrics, launched.checkpoint_path, launched.model_uri)


def _start_run(
    cfg: PretrainConfig,
    data: DataSpec,
    stats: dict[str, Any],
    uri: str,
    name: str,
    extra_tags: dict[str, str] | None,
    extra_params: dict[str, Any] | None,
) -> tuple[str, str]:
    """A new RUNNING pretrain run with the run record's tags and params, config.yaml and meta.json."""
    tags = {tracking.TAG_JOB: "pretrain", tracking.TAG_RAY_RUN: name, **(extra_tags or {})}
    params = {**tracking.run_record_params(cfg, stats, data.meta), **(extra_params or {})}
    run_id, experiment_id = tracking.start_run(
        uri, cfg.experiment, run_name=cfg.run_name or name, tags=tags, params=params
    )
    mlflow_client = tracking.client(uri)
    tracking.log_dict_artifact(mlflow_client, run_id, cfg.to_dict(), "config.yaml")
    tracking.log_dict_artifact(mlflow_client, run_id, data.meta, "meta.json")
    return run_id, experiment_id
