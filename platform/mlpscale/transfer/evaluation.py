"""Evaluation of a downstream model: plain top-1/top-5, test-time augmentation (TTA) and ReaL accuracy.

TTA (paper section 4.2, after Krizhevsky et al., 2012): K passes over the test set with
seeded random resized crops, the logits averaged per image. Pass k uses the crops of
epoch k of one `tta_loader`, so K crops with seed s extend the first K-1 crops with seed s.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from mlpscale.errors import MlpscaleError

AutocastFactory = Callable[[], contextlib.AbstractContextManager]


def no_autocast() -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


@torch.no_grad()
def predict(model: torch.nn.Module, batches: Iterable, autocast: AutocastFactory = no_autocast
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits float32 on the CPU, labels) for every example the batches hold, in their order."""
    model.eval()
    logits, labels = [], []
    for batch in batches:
        with autocast():
            out = model(batch.images)
        logits.append(out.float())
        labels.append(batch.labels)
    if not logits:
        raise MlpscaleError("the evaluation set is empty; re-run prepare_data for the downstream dataset")
    return torch.cat(logits).cpu(), torch.cat(labels).cpu()


def accuracy_metrics(logits: torch.Tensor, labels: torch.Tensor, prefix: str = "val") -> dict[str, float]:
    """Cross-entropy loss, top-1 and top-5 (top-k capped at the number of classes), as fractions."""
    k = min(5, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    hits = top.eq(labels.view(-1, 1))
    return {
        f"{prefix}_loss": float(F.cross_entropy(logits, labels)),
        f"{prefix}_top1": float(hits[:, 0].float().mean()),
        f"{prefix}_top5": float(hits.any(dim=1).float().mean()),
    }


@torch.no_grad()
def tta_logits(model: torch.nn.Module, loader, crops: int, autocast: AutocastFactory = no_autocast
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Average the logits of `crops` passes of a tta_loader (pass k = its epoch k); returns (logits, labels)."""
    if crops < 1:
        raise MlpscaleError(f"tta={crops} must be at least 1 crop per test image (0 turns TTA off)")
    total, labels = None, None
    for k in range(crops):
        loader.set_epoch(k)
        logits, pass_labels = predict(model, loader, autocast)
        if labels is not None and not torch.equal(labels, pass_labels):
            raise RuntimeError("TTA passes saw the test set in different orders")
        total = logits if total is None else total.add_(logits)
        labels = pass_labels
    return total / crops, labels
