"""What one Ray Train worker is sent: the typed pretrain config plus what the driver learnt, and the micro-batch rule.

The driver checks the data and counts the model once; the workers, which may not share its
environment or working directory, get the answers in one frozen `WorkerSpec` (Ray pickles it).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mlpscale.config import PretrainConfig

if TYPE_CHECKING:
    from mlpscale.train.pretrain import DataSpec

_LOOP_CONFIG_KEY = "spec"  # Ray Train hands its workers a dict: the spec travels under this key


def micro_batch(cfg: PretrainConfig, workers: int | None = None, accumulation_steps: int | None = None) -> int:
    """The examples of one forward pass on one worker: batch_size / (accumulation_steps * workers).

    `batch_size` is the effective (global) batch of one optimizer step; `workers` defaults to
    cfg.num_workers and `accumulation_steps` to cfg.accumulation_steps.
    """
    workers = cfg.num_workers if workers is None else workers
    steps = cfg.accumulation_steps if accumulation_steps is None else accumulation_steps
    return cfg.batch_size // (steps * workers)


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a pretraining worker needs, typed: the config, the data it reads, the model's size, the run."""

    cfg: PretrainConfig
    train_path: str
    test_path: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int
    resolution: int
    n_train: int
    forward_flops: int
    workers: int = 1  # Ray Train workers the launcher starts
    run_id: str | None = None
    tracking_uri: str | None = None
    cpus_per_worker: int | None = None

    @property
    def micro_batch(self) -> int:
        return micro_batch(self.cfg, self.workers)

    def build_model(self):
        """The config's model for this data's resolution and classes (fresh weights, on the CPU)."""
        from mlpscale.models import build_model

        cfg = self.cfg
        return build_model(
            cfg.arch,
            resolution=self.resolution,
            num_classes=self.num_classes,
            expansion=cfg.expansion,
            activation=cfg.activation,
            normalization=cfg.normalization,
            dropout=cfg.dropout,
        )

    def loop_config(self) -> dict[str, Any]:
        """The `train_loop_config` Ray Train passes to each worker."""
        return {_LOOP_CONFIG_KEY: self}

    @staticmethod
    def from_loop_config(config: Mapping[str, Any]) -> WorkerSpec:
        return config[_LOOP_CONFIG_KEY]


def worker_spec(
    cfg: PretrainConfig,
    data: DataSpec,
    stats: Mapping[str, Any],
    *,
    workers: int,
    run_id: str | None,
    tracking_uri: str | None,
    cpus_per_worker: int | None = None,
) -> WorkerSpec:
    """The spec of a run from its config, its checked data (`check_data`) and its model stats (`model_summary`)."""
    return WorkerSpec(
        cfg=cfg,
        train_path=str(data.train_path),
        test_path=str(data.test_path),
        mean=tuple(float(v) for v in data.meta["mean"]),
        std=tuple(float(v) for v in data.meta["std"]),
        num_classes=int(data.meta["num_classes"]),
        resolution=data.resolution,
        n_train=data.n_train,
        forward_flops=int(stats["forward_flops"]),
        workers=workers,
        run_id=run_id,
        tracking_uri=tracking_uri,
        cpus_per_worker=cpus_per_worker,
    )
