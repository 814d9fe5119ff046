"""Optimizers by name: LION (default), AdamW, SGD with momentum; weight decay skips biases and norms."""

from __future__ import annotations

import torch
from torch import nn

from mlpscale.errors import MlpscaleError
from mlpscale.train.choices import OPTIMIZERS


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only; biases and normalisation scales are not decayed."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (decay if parameter.ndim >= 2 else no_decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(
    model: nn.Module, name: str, *, lr: float, weight_decay: float = 0.0, momentum: float = 0.9
) -> torch.optim.Optimizer:
    groups = parameter_groups(model, weight_decay)
    if name == "lion":
        from lion_pytorch import Lion

        return Lion(groups, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=momentum > 0)
    raise MlpscaleError(f"optimizer={name!r} is not allowed; choose one of: {', '.join(OPTIMIZERS)}")
