"""Training state on disk: model, optimizer, scheduler, epoch, RNG states and the MLflow run id."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

STATE_FILE = "state.pt"


def rng_state() -> dict[str, Any]:
    """This process's RNG states; on a GPU that of its current device (a restarted worker may see other GPUs)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda_device"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda_device" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_device"])


def save_state(
    directory: str | Path,
    *,
    model,
    optimizer,
    scheduler,
    epoch: int,
    run_id: str | None,
    config: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write state.pt into `directory` (the model's plain state_dict, no DDP/compile prefixes)."""
    path = Path(directory) / STATE_FILE
    torch.save(
        {
            "model": unwrap(model).state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "epoch": int(epoch),
            "rng": rng_state(),
            "mlflow_run_id": run_id,
            "config": config,
            **(extra or {}),
        },
        path,
    )
    return path


def load_state(directory: str | Path, map_location="cpu") -> dict[str, Any]:
    return torch.load(Path(directory) / STATE_FILE, map_location=map_location, weights_only=False)


def unwrap(model):
    """The plain module under DDP and torch.compile wrappers."""
    model = getattr(model, "_orig_mod", model)
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)
