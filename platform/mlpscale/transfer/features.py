"""Frozen-body features for linear probing: computed once per split and reused by every epoch.

Without training augmentation a frozen body maps each image to the same vector every epoch,
so the probe trains on cached (N, width) features instead of re-running the MLP each step.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from mlpscale.data.loaders import Batch
from mlpscale.train.precision import autocast


@torch.no_grad()
def extract_features(
    model: torch.nn.Module, batches: Iterable, *, device: torch.device, precision: str = "fp32"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(features float32, labels) of every example, on the batches' device, in their order."""
    model.eval()
    features, labels = [], []
    for batch in batches:
        with autocast(device, precision):
            features.append(model.features(batch.images).float())
        labels.append(batch.labels)
    return torch.cat(features), torch.cat(labels)


class FeatureBatches:
    """Mini-batches of cached features as `Batch`es (the features in `images`, no MixUp), reshuffled each epoch
    from (seed, epoch) unless `shuffle` is off; the last batch may be short."""

    def __init__(
        self, features: torch.Tensor, labels: torch.Tensor, *, batch_size: int, seed: int = 0, shuffle: bool = True
    ):
        self.features, self.labels = features, labels
        self.batch_size, self.seed, self.shuffle = int(batch_size), int(seed), shuffle
        self.epoch = 0

    def __len__(self) -> int:
        return -(-len(self.labels) // self.batch_size)

    @property
    def num_examples(self) -> int:
        return len(self.labels)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[Batch]:
        count = len(self.labels)
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(count, generator=generator).to(self.labels.device)
        else:
            order = torch.arange(count, device=self.labels.device)
        self.epoch += 1
        for start in range(0, count, self.batch_size):
            index = order[start : start + self.batch_size]
            yield Batch(self.features.index_select(0, index), self.labels.index_select(0, index), None, 1.0)
