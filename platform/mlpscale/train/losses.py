"""The training loss: label-smoothed cross-entropy mixed over MixUp's two label sets."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mixup_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    labels_mixed: torch.Tensor | None = None,
    lam: float = 1.0,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """`lam*CE(logits, labels) + (1-lam)*CE(logits, labels_mixed)`, plain CE when MixUp is off."""
    loss = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    if labels_mixed is None or lam == 1.0:
        return loss
    mixed = F.cross_entropy(logits, labels_mixed, label_smoothing=label_smoothing)
    return lam * loss + (1.0 - lam) * mixed


def mixup_correct(
    logits: torch.Tensor, labels: torch.Tensor, labels_mixed: torch.Tensor | None = None, lam: float = 1.0
) -> torch.Tensor:
    """Correct top-1 predictions of a batch (a device tensor), weighted by lam under MixUp."""
    predicted = logits.argmax(dim=1)
    correct = (predicted == labels).sum(dtype=torch.float32)
    if labels_mixed is None or lam == 1.0:
        return correct
    return lam * correct + (1.0 - lam) * (predicted == labels_mixed).sum(dtype=torch.float32)
