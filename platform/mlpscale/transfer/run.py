"""A transfer run end to end: resolve the source, map the dataset, train, evaluate (TTA, ReaL), track in MLflow.

`run_transfer(cfg)` runs in the calling process (the job's process, a `ray job submit`
entrypoint, or a Ray Tune trial); `run_transfer_grid(cfg, grid)` runs a Tune grid of them
under one MLflow parent run, each trial a child run with the same record.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlpscale import tracking
from mlpscale.errors import MlpscaleError
from mlpscale.paths import repo_root
from mlpscale.ray_cluster import cpus_per_gpu_worker, ensure_ray
from mlpscale.tracking.models import SourceModel, resolve_source
from mlpscale.train.launch import log_final_model, tracked_run
from mlpscale.train.steps import accuracy_metrics
from mlpscale.transfer.config import TransferConfig, apply, resolve_mode_defaults, validate
from mlpscale.transfer.data import DownstreamData, downstream_data
from mlpscale.transfer.evaluation import tta_logits
from mlpscale.transfer.real_labels import load_real_labels, real_top1

log = logging.getLogger(__name__)

Reporter = Callable[[dict], None]


@dataclass
class TransferResult:
    run_id: str
    experiment_id: str
    final_metrics: dict[str, float]
    model_uri: str | None
    source_run_id: str | None


def transfer_params(
    cfg: TransferConfig, source: SourceModel, data: DownstreamData, stats: Mapping[str, Any]
) -> dict[str, Any]:
    """The design.md run record plus the transfer fields (mode, lr_head, lr_body, tta, source, ...)."""
    record_cfg = {
        **cfg.to_dict(),
        "arch": source.arch,
        "resolution": data.resolution,
        "n_train": data.n_train,
        "lr": cfg.lr_head,
        "expansion": source.architecture.get("expansion"),
        "activation": source.architecture.get("activation"),
        "normalization": source.architecture.get("normalization"),
    }
    params = tracking.run_record_params(record_cfg, stats, data.meta)
    params.update(
        {
            "mode": cfg.mode,
            "lr_head": cfg.lr_head,
            "lr_body": cfg.lr_body,
            "tta": cfg.tta,
            "source": cfg.source,
            "source_dataset": source.dataset,
            "data_resolution": data.stored_resolution,
            "augment": cfg.augment,
            "schedule": cfg.schedule,
        }
    )
    if cfg.tta:
        params.update({"tta_scale": list(cfg.tta_scale), "tta_ratio": list(cfg.tta_ratio), "tta_flip": cfg.tta_flip})
    if cfg.real_labels:
        params["real_labels"] = str(cfg.real_labels)
    return params


def run_transfer(
    cfg: TransferConfig,
    *,
    parent_run_id: str | None = None,
    extra_tags: Mapping[str, str] | None = None,
    report: Reporter | None = None,
) -> TransferResult:
    """Fine-tune or linear-probe `cfg.source` on `cfg.dataset`, tracked as one MLflow run."""
    import torch

    from mlpscale.models import model_stats
    from mlpscale.transfer.worker import TransferTrainer

    cfg = validate(resolve_mode_defaults(cfg))
    uri = tracking.resolve_tracking_uri(cfg.tracking_uri)
    source = resolve_source(cfg.source, uri)
    data = downstream_data(
        cfg.dataset, source.resolution, root=cfg.data_dir, data_resolution=cfg.data_resolution, n_train=cfg.n_train
    )
    real_labels = load_real_labels(cfg.real_labels, data.n_test, data.num_classes) if cfg.real_labels else None
    architecture = source.architecture
    stats = model_stats(
        source.arch,
        resolution=data.resolution,
        num_classes=data.num_classes,
        in_channels=architecture.get("in_channels", 3),
        expansion=architecture.get("expansion", 4),
        normalization=architecture.get("normalization", "layer"),
    )
    tags = {tracking.TAG_JOB: cfg.job, **(extra_tags or {})}
    if source.run_id:
        tags[tracking.TAG_SOURCE_RUN] = source.run_id
    if parent_run_id:
        tags[tracking.TAG_PARENT] = parent_run_id
    run_name = cfg.run_name or f"{cfg.job}-{source.arch}-{cfg.dataset}"
    run_id, experiment_id = tracking.start_run(
        uri, cfg.experiment, run_name=run_name, tags=tags, params=transfer_params(cfg, source, data, stats)
    )
    mlflow_client = tracking.client(uri)
    with tracked_run(mlflow_client, run_id):
        tracking.log_dict_artifact(mlflow_client, run_id, cfg.to_dict(), "config.yaml")
        tracking.log_dict_artifact(mlflow_client, run_id, data.meta, "meta.json")
        trainer = TransferTrainer(cfg, source.model, data)

        def on_epoch(epoch: int, metrics: dict) -> None:
            tracking.log_epoch_metrics(mlflow_client, run_id, metrics, epoch)
            if report is not None and epoch < cfg.epochs:
                report({**metrics, "epoch": epoch})

        outcome = trainer.fit(on_epoch)
        final = dict(outcome.metrics)
        extra = _final_evaluations(cfg, trainer, outcome, real_labels)
        if extra:
            tracking.log_epoch_metrics(mlflow_client, run_id, extra, cfg.epochs)
            final.update(extra)
        model = outcome.model.eval().cpu()
        example = torch.zeros(2, model.config.get("in_channels", 3), data.resolution, data.resolution).numpy()
        model_uri = log_final_model(
            model,
            resolution=data.resolution,
            tracking_uri=uri,
            run_id=run_id,
            example=example,
            log_model=cfg.log_model,
            register=cfg.register,
        )
        if report is not None:
            report({**final, "epoch": cfg.epochs, "mlflow_run_id": run_id})
    log.info("transfer run %s finished: %s", run_id, final)
    return TransferResult(run_id, experiment_id, final, model_uri, source.run_id)


def _final_evaluations(cfg: TransferConfig, trainer, outcome, real_labels) -> dict[str, float]:
    """val_top1_tta (K random crops, averaged logits) and val_real_top1 (plain and with TTA)."""
    from mlpscale.data.loaders import tta_loader

    extra: dict[str, float] = {}
    if real_labels is not None:
        extra["val_real_top1"] = real_top1(outcome.test_logits.argmax(dim=1), real_labels)
    if cfg.tta:
        data = trainer.data
        loader = tta_loader(
            data.test_path,
            batch_size=cfg.batch_size,
            resolution=data.resolution,
            mean=data.meta["mean"],
            std=data.meta["std"],
            device=outcome.device,
            scale=cfg.tta_scale,
            ratio=cfg.tta_ratio,
            seed=cfg.seed,
            flip=cfg.tta_flip,
            num_workers=cfg.loader_workers,
        )
        logits, labels = tta_logits(outcome.model, loader, cfg.tta, device=outcome.device, precision=outcome.precision)
        extra["val_top1_tta"] = accuracy_metrics(logits, labels)["val_top1"]
        if real_labels is not None:
            extra["val_real_top1_tta"] = real_top1(logits.argmax(dim=1), real_labels)
    return extra


def parse_grid(items: Sequence[str]) -> dict[str, list[Any]]:
    """`key=v1,v2` strings -> {key: [coerced values]}; keys and values checked like config overrides."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not values.strip():
            raise MlpscaleError(f"--grid {item!r} must look like key=v1,v2 (e.g. lr_head=0.01,0.003)")
        if key in ("crop_scale", "crop_ratio", "tta_scale", "tta_ratio"):
            raw = [v for v in values.split(";") if v.strip()]
        else:
            raw = [v for v in values.split(",") if v.strip()]
        grid[key] = [getattr(apply(TransferConfig(), {key: v}), key) for v in raw]
    return grid


def transfer_trainable(config: dict, *, base: TransferConfig, parent_run_id: str, sweep_id: str) -> None:
    """The Ray Tune function trainable: one transfer run with the trial's values, reporting every epoch.

    `config` holds the swept keys; the typed base config and the grid's MLflow parent come through
    `tune.with_parameters`.
    """
    from ray import tune

    from mlpscale.tracking.sweeps import TAG_TRIAL_ID

    cfg = apply(base, config)
    tags = {TAG_TRIAL_ID: tune.get_context().get_trial_id(), tracking.TAG_SWEEP_ID: sweep_id}
    run_transfer(cfg, parent_run_id=parent_run_id, extra_tags=tags, report=tune.report)


def _absolute_paths(cfg: TransferConfig) -> dict[str, str]:
    changes = {}
    for key in ("data_dir", "real_labels", "source"):
        value = getattr(cfg, key)
        if value and Path(value).expanduser().exists():
            changes[key] = str(Path(value).expanduser().resolve())
    return changes


def run_transfer_grid(
    cfg: TransferConfig, grid: Mapping[str, Sequence[Any]], *, metric: str = "val_top1", storage_path: str | None = None
) -> tuple[str, list[dict[str, Any]]]:
    """A Ray Tune grid of transfer runs under an MLflow parent run; returns (parent run id, trial results)."""
    import ray
    from ray import tune

    from mlpscale.tracking.sweeps import start_sweep_run

    cfg = validate(resolve_mode_defaults(cfg))
    uri = tracking.resolve_tracking_uri(cfg.tracking_uri)
    cfg = dataclasses.replace(cfg, tracking_uri=uri, **_absolute_paths(cfg))  # trials run in their own folders
    resolve_source(cfg.source, uri)  # fail before starting trials
    sweep_id = uuid.uuid4().hex[:12]
    parent_id, _ = start_sweep_run(
        uri,
        cfg.experiment,
        sweep_id,
        run_name=cfg.run_name or f"{cfg.job}-grid-{sweep_id}",
        params={
            "mode": cfg.mode,
            "source": cfg.source,
            "dataset": cfg.dataset,
            "grid": {k: list(v) for k, v in grid.items()},
        },
    )
    mlflow_client = tracking.client(uri)
    ensure_ray()
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    # a GPU trial's decoder threads follow its CPUs (Ray sets its OMP_NUM_THREADS), as pretraining's
    trial_resources = {"cpu": cpus_per_gpu_worker(int(resources.get("CPU", 1)), gpus), "gpu": 1} if gpus else {"cpu": 1}
    space = {key: tune.grid_search(list(values)) for key, values in grid.items()}
    trainable = tune.with_parameters(transfer_trainable, base=cfg, parent_run_id=parent_id, sweep_id=sweep_id)
    trainable = tune.with_resources(trainable, trial_resources)
    with tracked_run(mlflow_client, parent_id):
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(metric=metric, mode="max"),
            run_config=tune.RunConfig(
                name=f"transfer-{sweep_id}", storage_path=storage_path or str(repo_root() / "ray_results"), verbose=0
            ),
        )
        results = tuner.fit()
        rows = []
        for result in results:
            if result.error:
                raise MlpscaleError(
                    f"grid trial {result.config and {k: result.config[k] for k in grid}} failed: {result.error}"
                )
            rows.append({**{k: result.config[k] for k in grid}, **(result.metrics or {})})
        best = max(rows, key=lambda row: row.get(metric, float("-inf")))
        tracking.log_epoch_metrics(mlflow_client, parent_id, {f"best_{metric}": best[metric]}, 0)
    return parent_id, rows
