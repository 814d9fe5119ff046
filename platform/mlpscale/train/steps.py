"""The training epoch and the evaluation every job shares: pretraining workers, fine-tuning and linear probes.

`train_epoch` is one pass over a loader: micro-batches under autocast, the MixUp label-smoothed loss,
gradient accumulation (DDP `no_sync` on the inner micro-steps), clipping, a scheduler step per
optimizer step. Loss and accuracy are summed on the device, so there is no host sync per step; the
running loss is checked for finiteness every NONFINITE_CHECK_EVERY optimizer steps and at the end.
`evaluate` scores a model on batches the same way (loss, top-1, top-5, summed on the device, over
all ranks) and keeps the logits when asked. Batches carry `.images`, `.labels`, `.labels_mixed`
and `.lam` (data.loaders.Batch).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mlpscale.errors import MlpscaleError
from mlpscale.train.losses import mixup_correct, mixup_cross_entropy
from mlpscale.train.precision import autocast

NONFINITE_CHECK_EVERY = 100  # optimizer steps between host syncs of the running loss

# Test-only: each hook maps a micro-step's training loss to the loss trained on (tests/faults.py fills it
# inside a Ray Train worker to make a loss non-finite). Empty in every real run.
LOSS_HOOKS: list[Callable[[torch.Tensor], torch.Tensor]] = []


class NonFiniteLoss(Exception):
    """The training loss became NaN or infinite; the message says when."""


@dataclass(frozen=True)
class EpochResult:
    """One training pass, summed over all ranks."""

    loss: float
    top1: float
    examples: int
    seconds: float

    @property
    def throughput_img_s(self) -> float:
        return self.examples / max(self.seconds, 1e-9)

    def metrics(self) -> dict[str, float]:
        """The run record's training metrics."""
        return {"train_loss": self.loss, "train_top1": self.top1, "throughput_img_s": self.throughput_img_s}


@dataclass(frozen=True)
class Evaluation:
    """Scores of one evaluation pass; logits (float32, CPU) and labels in batch order when kept."""

    metrics: dict[str, float]
    logits: torch.Tensor | None = None
    labels: torch.Tensor | None = None


def train_epoch(
    model: torch.nn.Module,
    batches: Iterable,
    optimizer: torch.optim.Optimizer,
    scheduler,
    *,
    device: torch.device,
    precision: str = "fp32",
    label_smoothing: float = 0.0,
    accumulation_steps: int = 1,
    grad_clip: float = 0.0,
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> EpochResult:
    """One pass over `batches` training `model` (put in train mode); `forward(images) -> logits` defaults to it.

    A linear probe passes its head as `model` and, when its images change every epoch, a forward that
    runs the frozen body without gradients first. Raises NonFiniteLoss when the loss stops being finite.
    """
    model.train()
    forward = forward or model
    start = time.perf_counter()
    sums = torch.zeros(3, device=device, dtype=torch.float64)  # loss*n, correct, n
    running = torch.zeros((), device=device)
    optimizer.zero_grad(set_to_none=True)
    steps = 0
    for index, batch in enumerate(batches):
        last_micro = (index + 1) % accumulation_steps == 0
        sync = getattr(model, "no_sync", None)
        with sync() if (sync is not None and not last_micro) else contextlib.nullcontext():
            with autocast(device, precision):
                logits = forward(batch.images)
                loss = mixup_cross_entropy(logits.float(), batch.labels, batch.labels_mixed, batch.lam, label_smoothing)
            for hook in LOSS_HOOKS:
                loss = hook(loss)
            (loss / accumulation_steps).backward()
        n = batch.labels.numel()
        detached = loss.detach()
        running += detached
        sums[0] += detached.double() * n
        sums[1] += mixup_correct(logits.detach(), batch.labels, batch.labels_mixed, batch.lam).double()
        sums[2] += n
        if not last_micro:
            continue
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
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
    loss_sum, correct, count = _all_reduce(sums).tolist()
    return EpochResult(
        loss=loss_sum / max(count, 1.0), top1=correct / max(count, 1.0), examples=int(count), seconds=elapsed
    )


def evaluate(
    model: torch.nn.Module,
    batches: Iterable,
    *,
    device: torch.device | None = None,
    precision: str = "fp32",
    keep_logits: bool = False,
    prefix: str = "val",
) -> Evaluation:
    """`<prefix>_loss`, `_top1`, `_top5` of `model` (put in eval mode) on every example of `batches`, all ranks.

    `device` defaults to the model's. With `keep_logits` the logits and labels come back too (an empty
    evaluation set is then an error).
    """
    device = device or next(model.parameters()).device
    model.eval()
    sums = torch.zeros(4, device=device, dtype=torch.float64)  # loss, top1, top5, count
    kept_logits, kept_labels = [], []
    with torch.no_grad(), autocast(device, precision):
        for batch in batches:
            logits = model(batch.images).float()
            _score(sums, logits, batch.labels)
            if keep_logits:
                kept_logits.append(logits)
                kept_labels.append(batch.labels)
    metrics = _scores_to_metrics(_all_reduce(sums), prefix)
    if not keep_logits:
        return Evaluation(metrics)
    if not kept_logits:
        raise MlpscaleError("the evaluation set is empty; re-run prepare_data for the downstream dataset")
    return Evaluation(metrics, torch.cat(kept_logits).cpu(), torch.cat(kept_labels).cpu())


def accuracy_metrics(logits: torch.Tensor, labels: torch.Tensor, prefix: str = "val") -> dict[str, float]:
    """`evaluate`'s scores for logits already computed (e.g. averaged over test-time crops)."""
    sums = torch.zeros(4, device=logits.device, dtype=torch.float64)
    _score(sums, logits.float(), labels.to(logits.device))
    return _scores_to_metrics(sums, prefix)


def _score(sums: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
    """Add a batch's summed loss, top-1 and top-5 hits (top-k capped at the classes) and count to `sums`."""
    k = min(5, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    sums[0] += F.cross_entropy(logits, labels, reduction="sum").double()
    sums[1] += (top[:, 0] == labels).sum()
    sums[2] += (top == labels[:, None]).any(dim=1).sum()
    sums[3] += labels.numel()


def _scores_to_metrics(sums: torch.Tensor, prefix: str) -> dict[str, float]:
    loss, top1, top5, count = sums.tolist()
    count = max(count, 1.0)
    return {f"{prefix}_loss": loss / count, f"{prefix}_top1": top1 / count, f"{prefix}_top5": top5 / count}


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce(values: torch.Tensor) -> torch.Tensor:
    if _distributed():
        dist.all_reduce(values)
    return values


def _all_finite(value: torch.Tensor) -> bool:
    flag = torch.isfinite(value).to(torch.float32).reshape(1)
    if _distributed():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())
