"""The Ray Train worker function: build model, loaders and optimizer, train, evaluate, report every epoch.

Each worker gets one typed `WorkerSpec` (train/spec.py) and trains with the shared steps (train/steps.py).
Rank 0 logs each epoch to the MLflow run (step = epoch) unless that epoch is already there (a
restarted worker or `--resume`), and writes a checkpoint every `checkpoint_every` epochs and at
the end. A non-finite loss or a CUDA OOM ends training on every rank with a returned status
instead of an exception, so Ray Train does not retry a run that cannot succeed.
"""

from __future__ import annotations

import logging
import tempfile
import time
from typing import Any

import torch
import torch.distributed as dist

from mlpscale import tracking
from mlpscale.config import PretrainConfig
from mlpscale.errors import MlpscaleError
from mlpscale.models import estimate_training_memory, training_compute
from mlpscale.train.checkpoint import load_state, save_state, set_rng_state
from mlpscale.train.optim import build_optimizer
from mlpscale.train.precision import enable_fast_matmul, resolve_precision
from mlpscale.train.schedule import build_scheduler
from mlpscale.train.spec import WorkerSpec, micro_batch
from mlpscale.train.steps import NonFiniteLoss, evaluate, train_epoch

log = logging.getLogger(__name__)


def drop_single_worker_process_group(world_size: int) -> None:
    """Ray Train opens a gloo process group even for one worker; with nothing to synchronise, close it.

    Its TCP loop thread wakes about 100 times a second, and on a CPU machine every wakeup preempts
    one of the training step's threads (benchmarks/RESULTS.md).
    """
    if world_size == 1 and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _device() -> torch.device:
    import ray.train.torch

    return ray.train.torch.get_device() if torch.cuda.is_available() else torch.device("cpu")


def suggest_accumulation(spec: WorkerSpec, device: torch.device, precision: str) -> str:
    """A sentence naming the smallest accumulation_steps whose micro-batch fits the device (estimate)."""
    cfg = spec.cfg
    total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    per_worker = micro_batch(cfg, spec.workers, accumulation_steps=1)
    steps = cfg.accumulation_steps * 2
    while total and steps <= per_worker:
        if per_worker % steps == 0:
            estimate = estimate_training_memory(
                cfg.arch,
                resolution=spec.resolution,
                num_classes=spec.num_classes,
                batch_size=micro_batch(cfg, spec.workers, accumulation_steps=steps),
                optimizer=cfg.optimizer,
                precision=precision,
                expansion=cfg.expansion,
                normalization=cfg.normalization,
            )
            if estimate["total"] < 0.8 * total:
                break
        steps *= 2
    return f"try --accumulation-steps {min(steps, per_worker)} (same effective batch, smaller micro-batches)"


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train entry point; `config` is `WorkerSpec.loop_config()`."""
    import ray.train
    import ray.train.torch

    from mlpscale.data.loaders import default_threads, eval_loader, train_loader

    spec = WorkerSpec.from_loop_config(config)
    cfg = spec.cfg
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    drop_single_worker_process_group(world)
    device = _device()
    if device.type == "cpu" and spec.cpus_per_worker:
        torch.set_num_threads(int(spec.cpus_per_worker))
    enable_fast_matmul(device)
    precision = resolve_precision(cfg.precision, device)
    torch.manual_seed(cfg.seed + rank)

    # On the device before the optimizer exists: its state (moments) is loaded onto its parameters' device.
    model = spec.build_model().to(device)
    micro = spec.micro_batch
    threads = cfg.loader_workers or default_threads(device, spec.cpus_per_worker)
    loader_args = dict(
        resolution=spec.resolution,
        mean=list(spec.mean),
        std=list(spec.std),
        device=device,
        num_workers=threads,
        distributed=world > 1,
    )
    train_data = train_loader(
        spec.train_path,
        batch_size=micro,
        scale=tuple(cfg.crop_scale),
        ratio=tuple(cfg.crop_ratio),
        flip=cfg.flip,
        mixup_alpha=cfg.mixup_alpha,
        seed=cfg.seed,
        order=cfg.order,
        drop_last=True,
        **loader_args,
    )
    val_data = eval_loader(spec.test_path, batch_size=max(micro, 256), **loader_args)
    steps_per_epoch = max(1, len(train_data) // cfg.accumulation_steps)
    optimizer = build_optimizer(model, cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum)
    scheduler = build_scheduler(
        optimizer,
        cfg.schedule,
        total_steps=steps_per_epoch * cfg.epochs,
        warmup_steps=int(round(cfg.warmup_epochs * steps_per_epoch)),
    )

    start_epoch = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = load_state(directory)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch = state["epoch"]
        if rank == 0:  # the checkpoint holds rank 0's RNG states; the other ranks draw afresh, still per rank
            set_rng_state(state["rng"])
        else:
            torch.manual_seed(cfg.seed + rank + 1_000_003 * start_epoch)
        log.info("resuming from epoch %d", start_epoch)

    model = ray.train.torch.prepare_model(model) if world > 1 else model
    train_model = torch.compile(model) if cfg.compile else model

    run_id, mlflow_client, last_logged = spec.run_id, None, 0
    if rank == 0 and run_id:
        mlflow_client = tracking.client(spec.tracking_uri)
        last_logged = tracking.last_logged_epoch(mlflow_client, run_id)

    metrics: dict[str, float] = {}
    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        epoch_start = time.perf_counter()
        if hasattr(train_data, "set_epoch"):
            train_data.set_epoch(epoch)
        try:
            trained = train_epoch(
                train_model,
                train_data,
                optimizer,
                scheduler,
                device=device,
                precision=precision,
                label_smoothing=cfg.label_smoothing,
                accumulation_steps=cfg.accumulation_steps,
                grad_clip=cfg.grad_clip,
            )
        except NonFiniteLoss as error:
            reason = f"non-finite training loss in epoch {epoch}: {error}; lower lr (now {cfg.lr}) or set grad_clip"
            return _stop(reason, "nonfinite", mlflow_client, run_id, rank)
        except torch.cuda.OutOfMemoryError as error:
            reason = f"out of GPU memory with micro-batch {micro} for {cfg.arch}; " + suggest_accumulation(
                spec, device, precision
            )
            if world > 1:  # the other ranks wait for this one in a collective: Ray Train must stop the group
                raise MlpscaleError(reason) from error
            return _stop(reason, "oom", mlflow_client, run_id, rank)
        evaluation = evaluate(model, val_data, device=device, precision=precision)
        metrics = {
            **trained.metrics(),
            **evaluation.metrics,
            "compute_flops": float(training_compute(spec.forward_flops, spec.n_train, epoch)),
        }
        metrics["epoch_time_s"] = time.perf_counter() - epoch_start
        metrics = {key: metrics[key] for key in tracking.EPOCH_METRICS}
        if mlflow_client is not None and epoch > last_logged:
            tracking.log_epoch_metrics(mlflow_client, run_id, metrics, epoch)
        log.info("epoch %d/%d %s", epoch, cfg.epochs, {k: round(v, 4) for k, v in metrics.items()})
        _report(metrics, epoch, model, optimizer, scheduler, cfg, run_id, rank)
    return {"status": "ok", "metrics": metrics}


def _report(metrics, epoch, model, optimizer, scheduler, cfg: PretrainConfig, run_id, rank) -> None:
    import ray.train

    payload = {**metrics, "epoch": epoch}
    save = epoch % cfg.checkpoint_every == 0 or epoch == cfg.epochs
    if rank == 0 and save:
        with tempfile.TemporaryDirectory() as directory:
            save_state(
                directory,
                model=model,
                optimizer=optimizer,
                scheduler=scheduler,
                epoch=epoch,
                run_id=run_id,
                config=cfg.to_dict(),
            )
            ray.train.report(payload, checkpoint=ray.train.Checkpoint.from_directory(directory))
    else:
        ray.train.report(payload)


def _stop(reason: str, status: str, mlflow_client, run_id, rank) -> dict[str, Any]:
    """End training on this rank: rank 0 marks the MLflow run FAILED; checkpoints stay as they are."""
    log.error(reason)
    if rank == 0 and mlflow_client is not None:
        tracking.mark_failed(mlflow_client, run_id, reason)
    return {"status": status, "reason": reason}
