"""The Ray Train worker function: build model, loaders and optimizer, train, evaluate, report every epoch.

Rank 0 logs each epoch to the MLflow run (step = epoch) unless that epoch is already there (a
restarted worker or `--resume`), and writes a checkpoint every `checkpoint_every` epochs and at
the end. A non-finite loss or a CUDA OOM ends training on every rank with a returned status
instead of an exception, so Ray Train does not retry a run that cannot succeed.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from typing import Any

import torch
import torch.distributed as dist

from mlpscale import tracking
from mlpscale.errors import MlpscaleError
from mlpscale.models import build_model, estimate_training_memory, training_compute
from mlpscale.train.checkpoint import load_state, save_state, set_rng_state
from mlpscale.train.losses import mixup_cross_entropy, mixup_correct
from mlpscale.train.optim import build_optimizer
from mlpscale.train.precision import autocast, enable_fast_matmul, resolve_precision
from mlpscale.train.schedule import build_scheduler

log = logging.getLogger(__name__)

NONFINITE_CHECK_EVERY = 100  # optimizer steps between host syncs of the running loss


class NonFiniteLoss(Exception):
    pass


def _all_reduce(values: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(values)
    return values


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


def suggest_accumulation(config: dict[str, Any], device: torch.device) -> str:
    """A sentence naming the smallest accumulation_steps whose micro-batch fits the device (estimate)."""
    cfg = config["cfg"]
    total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    per_rank = cfg["batch_size"] // cfg["num_workers"]
    steps = cfg["accumulation_steps"] * 2
    while total and steps <= per_rank:
        if per_rank % steps == 0:
            estimate = estimate_training_memory(
                cfg["arch"], resolution=config["resolution"], num_classes=config["num_classes"],
                batch_size=per_rank // steps, optimizer=cfg["optimizer"], precision=config["precision"],
                expansion=cfg["expansion"], normalization=cfg["normalization"])
            if estimate["total"] < 0.8 * total:
                break
        steps *= 2
    return f"try --accumulation-steps {min(steps, per_rank)} (same effective batch, smaller micro-batches)"


def _evaluate(model, loader, device, precision: str, num_classes: int) -> dict[str, float]:
    model.eval()
    sums = torch.zeros(4, device=device, dtype=torch.float64)  # loss, top1, top5, count
    k = min(5, num_classes)
    with torch.no_grad(), autocast(device, precision):
        for batch in loader:
            logits = model(batch.images).float()
            labels = batch.labels
            sums[0] += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").double()
            top = logits.topk(k, dim=1).indices
            sums[1] += (top[:, 0] == labels).sum()
            sums[2] += (top == labels[:, None]).any(dim=1).sum()
            sums[3] += labels.numel()
    sums = _all_reduce(sums).tolist()
    count = max(sums[3], 1.0)
    return {"val_loss": sums[0] / count, "val_top1": sums[1] / count, "val_top5": sums[2] / count}


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train entry point; `config` is what `pretrain.worker_config` builds."""
    import ray.train
    import ray.train.torch

    from mlpscale.data.loaders import default_threads, eval_loader, train_loader

    cfg = config["cfg"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    drop_single_worker_process_group(world)
    device = _device()
    if device.type == "cpu" and config.get("cpus_per_worker"):
        torch.set_num_threads(int(config["cpus_per_worker"]))
    enable_fast_matmul(device)
    precision = resolve_precision(cfg["precision"], device)
    config = {**config, "precision": precision}
    torch.manual_seed(cfg["seed"] + rank)

    # On the device before the optimizer exists: its state (moments) is loaded onto its parameters' device.
    model = build_model(cfg["arch"], resolution=config["resolution"], num_classes=config["num_classes"],
                        expansion=cfg["expansion"], activation=cfg["activation"],
                        normalization=cfg["normalization"], dropout=cfg["dropout"]).to(device)
    micro_batch = cfg["batch_size"] // (cfg["accumulation_steps"] * world)
    threads = cfg["loader_workers"] or default_threads(device, config.get("cpus_per_worker"))
    loader_args = dict(resolution=config["resolution"], mean=config["mean"], std=config["std"], device=device,
                       num_workers=threads, distributed=world > 1)
    train_data = train_loader(config["train_path"], batch_size=micro_batch, scale=tuple(cfg["crop_scale"]),
                              ratio=tuple(cfg["crop_ratio"]), flip=cfg["flip"], mixup_alpha=cfg["mixup_alpha"],
                              seed=cfg["seed"], order=cfg["order"], drop_last=True, **loader_args)
    val_data = eval_loader(config["test_path"], batch_size=max(micro_batch, 256), **loader_args)
    steps_per_epoch = max(1, len(train_data) // cfg["accumulation_steps"])
    optimizer = build_optimizer(model, cfg["optimizer"], lr=cfg["lr"], weight_decay=cfg["weight_decay"],
                                momentum=cfg["momentum"])
    scheduler = build_scheduler(optimizer, cfg["schedule"], total_steps=steps_per_epoch * cfg["epochs"],
                                warmup_steps=int(round(cfg["warmup_epochs"] * steps_per_epoch)))

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
            torch.manual_seed(cfg["seed"] + rank + 1_000_003 * start_epoch)
        log.info("resuming from epoch %d", start_epoch)

    model = ray.train.torch.prepare_model(model) if world > 1 else model
    train_model = torch.compile(model) if cfg["compile"] else model

    run_id, mlflow_client, last_logged = config.get("run_id"), None, 0
    if rank == 0 and run_id:
        mlflow_client = tracking.client(config["tracking_uri"])
        last_logged = tracking.last_logged_epoch(mlflow_client, run_id)

    metrics: dict[str, float] = {}
    for epoch in range(start_epoch + 1, cfg["epochs"] + 1):
        epoch_start = time.perf_counter()
        if hasattr(train_data, "set_epoch"):
            train_data.set_epoch(epoch)
        try:
            poison = epoch == config.get("inject_nonfinite_epoch")
            train_metrics = train_epoch(train_model, train_data, optimizer, scheduler, cfg, device, precision,
                                         poison=poison)
        except NonFiniteLoss as error:
            reason = f"non-finite training loss in epoch {epoch}: {error}; lower lr (now {cfg['lr']}) or set grad_clip"
            return _stop(reason, "nonfinite", mlflow_client, run_id, rank)
        except torch.cuda.OutOfMemoryError as error:
            reason = (f"out of GPU memory with micro-batch {micro_batch} for {cfg['arch']}; "
                      + suggest_accumulation(config, device))
            if world > 1:  # the other ranks wait for this one in a collective: Ray Train must stop the group
                raise MlpscaleError(reason) from error
            return _stop(reason, "oom", mlflow_client, run_id, rank)
        val_metrics = _evaluate(model, val_data, device, precision, config["num_classes"])
        metrics = {**train_metrics, **val_metrics,
                   "compute_flops": float(training_compute(config["forward_flops"], config["n_train"], epoch))}
        metrics["epoch_time_s"] = time.perf_counter() - epoch_start
        metrics = {key: metrics[key] for key in tracking.EPOCH_METRICS}
        if mlflow_client is not None and epoch > last_logged:
            tracking.log_epoch_metrics(mlflow_client, run_id, metrics, epoch)
        log.info("epoch %d/%d %s", epoch, cfg["epochs"], {k: round(v, 4) for k, v in metrics.items()})
        _report(metrics, epoch, model, optimizer, scheduler, cfg, run_id, rank)
    return {"status": "ok", "metrics": metrics}


def train_epoch(model, loader, optimizer, scheduler, cfg, device, precision, poison=False) -> dict[str, float]:
    """One pass over `loader`: loss, top-1 and the img/s of the pass (no host sync per step)."""
    model.train()
    start = time.perf_counter()
    accumulation = cfg["accumulation_steps"]
    sums = torch.zeros(3, device=device, dtype=torch.float64)  # loss*n, correct, n
    running = torch.zeros((), device=device)
    optimizer.zero_grad(set_to_none=True)
    steps = 0
    for index, batch in enumerate(loader):
        last_micro = (index + 1) % accumulation == 0
        sync = getattr(model, "no_sync", None)
        with (sync() if (sync is not None and not last_micro) else contextlib.nullcontext()):
            with autocast(device, precision):
                logits = model(batch.images)
                loss = mixup_cross_entropy(logits.float(), batch.labels, batch.labels_mixed, batch.lam,
                                           cfg["label_smoothing"])
            if poison:
                loss = loss * float("nan")
            (loss / accumulation).backward()
        n = batch.labels.numel()
        detached = loss.detach()
        running += detached
        sums[0] += detached.double() * n
        sums[1] += mixup_correct(logits.detach(), batch.labels, batch.labels_mixed, batch.lam).double()
        sums[2] += n
        if not last_micro:
            continue
        if cfg["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        steps += 1
        if steps % NONFINITE_CHECK_EVERY == 0 and not _all_finite(running):
            raise NonFiniteLoss(f"loss became {running.item()} by step {steps}")
    if not _all_finite(running):
        raise NonFiniteLoss(f"epoch loss sum is {running.item()}")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    totals = _all_reduce(sums).tolist()
    count = max(totals[2], 1.0)
    return {"train_loss": totals[0] / count, "train_top1": totals[1] / count,
            "throughput_img_s": totals[2] / max(elapsed, 1e-9)}


def _all_finite(value: torch.Tensor) -> bool:
    flag = torch.isfinite(value).to(torch.float32).reshape(1)
    _all_reduce_min(flag)
    return bool(flag.item())


def _all_reduce_min(value: torch.Tensor) -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value, op=dist.ReduceOp.MIN)


def _report(metrics, epoch, model, optimizer, scheduler, cfg, run_id, rank) -> None:
    import ray.train

    payload = {**metrics, "epoch": epoch}
    save = epoch % cfg["checkpoint_every"] == 0 or epoch == cfg["epochs"]
    if rank == 0 and save:
        with tempfile.TemporaryDirectory() as directory:
            save_state(directory, model=model, optimizer=optimizer, scheduler=scheduler, epoch=epoch,
                       run_id=run_id, config=cfg)
            ray.train.report(payload, checkpoint=ray.train.Checkpoint.from_directory(directory))
    else:
        ray.train.report(payload)


def _stop(reason: str, status: str, mlflow_client, run_id, rank) -> dict[str, Any]:
    """End training on this rank: rank 0 marks the MLflow run FAILED; checkpoints stay as they are."""
    log.error(reason)
    if rank == 0 and mlflow_client is not None:
        tracking.mark_failed(mlflow_client, run_id, reason)
    return {"status": status, "reason": reason}


