"""Per-step learning-rate schedules: none, cosine, warmup_cosine (linear warm-up, then cosine to zero)."""

from __future__ import annotations

import math

import torch

from mlpscale.errors import MlpscaleError
from mlpscale.train.choices import SCHEDULES


def lr_factor(step: int, *, schedule: str, total_steps: int, warmup_steps: int = 0) -> float:
    """The multiplier of the base lr after `step` optimizer steps."""
    if schedule == "none":
        return 1.0
    warmup = warmup_steps if schedule == "warmup_cosine" else 0
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, schedule: str, *, total_steps: int, warmup_steps: int = 0
) -> torch.optim.lr_scheduler.LambdaLR:
    if schedule not in SCHEDULES:
        raise MlpscaleError(f"schedule={schedule!r} is not allowed; choose one of: {', '.join(SCHEDULES)}")
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, schedule=schedule, total_steps=total_steps, warmup_steps=warmup_steps)
    )
