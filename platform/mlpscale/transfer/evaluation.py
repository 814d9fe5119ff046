"""Evaluation of a downstream model beyond plain scores: test-time augmentation (TTA) logits.

Plain loss, top-1 and top-5 come from the evaluator every job shares (train/steps.py `evaluate`,
and `accuracy_metrics` for logits already computed). TTA (paper section 4.2, after Krizhevsky et
al., 2012): K passes over the test set with seeded random resized crops, the logits averaged per
image. Pass k uses the crops of epoch k of one `tta_loader`, so K crops with seed s extend the
first K-1 crops with seed s.
"""

from __future__ import annotations

import torch

from mlpscale.errors import MlpscaleError
from mlpscale.train.steps import evaluate


@torch.no_grad()
def tta_logits(
    model: torch.nn.Module, loader, crops: int, *, device: torch.device | None = None, precision: str = "fp32"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Average the logits of `crops` passes of a tta_loader (pass k = its epoch k); returns (logits, labels)."""
    if crops < 1:
        raise MlpscaleError(f"tta={crops} must be at least 1 crop per test image (0 turns TTA off)")
    total, labels = None, None
    for k in range(crops):
        loader.set_epoch(k)
        evaluation = evaluate(model, loader, device=device, precision=precision, keep_logits=True)
        logits, pass_labels = evaluation.logits, evaluation.labels
        if labels is not None and not torch.equal(labels, pass_labels):
            raise RuntimeError("TTA passes saw the test set in different orders")
        total = logits if total is None else total.add_(logits)
        labels = pass_labels
    return total / crops, labels
