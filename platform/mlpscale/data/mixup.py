"""MixUp (Zhang et al., 2018): one lambda per batch, the batch mixed with a permutation of itself.

The loss pairs with it as `lam * CE(out, labels) + (1 - lam) * CE(out, labels_mixed)`.
Lambda and the permutation come from a seeded NumPy generator on the host, so drawing
them never waits on the device.

Two ways to mix, the same draws in both: `__call__` mixes normalised float images with torch
(an index_select and a `lerp_`, on any device); `normalize_and_mix` takes the CPU decoder's uint8
crops and normalises and mixes them in one compiled pass, reading two bytes and writing four
per value instead of the twenty the torch tail moves on a float batch.
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from mlpscale.errors import MlpscaleError


class MixUp:
    """Mixes a batch as `lam * x + (1 - lam) * x[perm]` with `lam ~ Beta(alpha, alpha)`; alpha 0 turns it off."""

    def __init__(self, alpha: float, seed: int = 0) -> None:
        if alpha < 0:
            raise MlpscaleError(f"mixup_alpha={alpha} is negative; use 0 (off) or a positive strength such as 0.8")
        self.alpha = float(alpha)
        self.seed = int(seed)
        self.set_epoch(0)

    @property
    def enabled(self) -> bool:
        return self.alpha > 0

    def set_epoch(self, epoch: int) -> None:
        """Restart the draws for `epoch`, so a resumed run mixes exactly as an uninterrupted one."""
        self._rng = np.random.default_rng([self.seed, int(epoch), 0x6D6978])

    def draw(self, batch_size: int) -> tuple[float, np.ndarray]:
        """The next batch's (lam, permutation)."""
        lam = float(self._rng.beta(self.alpha, self.alpha))
        return lam, self._rng.permutation(batch_size)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, float]:
        """Return (mixed images, labels of the mixed-in images, lam); (images, None, 1.0) when off."""
        if not self.enabled:
            return images, None, 1.0
        lam, perm = self.draw(images.shape[0])
        perm = torch.from_numpy(perm)
        if images.device.type == "cuda":  # from pageable memory the copy would wait for the GPU every step
            perm = perm.pin_memory().to(images.device, non_blocking=True)
        mixed = images.index_select(0, perm).lerp_(images, lam)  # two passes: (1 - lam) * x[perm] + lam * x
        return mixed, labels.index_select(0, perm), lam

    def normalize_and_mix(
        self, images: torch.Tensor, labels: torch.Tensor, scale: np.ndarray, shift: np.ndarray
    ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """uint8 (B, C, H, W) CPU images -> float32 `lam * n(x) + (1 - lam) * n(x[perm])`, n(v) = v * scale + shift.

        `scale` and `shift` are per channel (1 / std and -mean / std); the result is a new tensor.
        """
        if images.dtype != torch.uint8 or images.device.type != "cpu":
            raise ValueError(f"normalize_and_mix takes uint8 CPU images, not {images.dtype} on {images.device}")
        lam, perm = self.draw(images.shape[0])
        batch, channels = images.shape[:2]
        mixed = np.empty(tuple(images.shape), np.float32)
        _normalize_and_mix(
            images.numpy().reshape(batch, channels, -1),
            perm,
            np.float32(lam),
            np.asarray(scale, np.float32),
            np.asarray(shift, np.float32),
            mixed.reshape(batch, channels, -1),
        )
        return torch.from_numpy(mixed), labels.index_select(0, torch.from_numpy(perm)), lam


@numba.njit(parallel=True, fastmath=True, nogil=True, cache=True)
def _normalize_and_mix(images, perm, lam, scale, shift, out):
    for i in numba.prange(images.shape[0]):
        partner = perm[i]
        for c in range(images.shape[1]):
            own, other, row = images[i, c], images[partner, c], out[i, c]
            own_weight, other_weight = scale[c] * lam, scale[c] * (np.float32(1.0) - lam)
            for j in range(images.shape[2]):
                row[j] = np.float32(own[j]) * own_weight + np.float32(other[j]) * other_weight + shift[c]
