"""MixUp on the device (Zhang et al., 2018): one lambda per batch, the batch mixed with a permutation of itself.

The loss pairs with it as `lam * CE(out, labels) + (1 - lam) * CE(out, labels_mixed)`.
Lambda and the permutation come from a seeded NumPy generator on the host, so drawing
them never waits on the device.
"""

from __future__ import annotations

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

    def __call__(self, images: torch.Tensor, labels: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor | None, float]:
        """Return (mixed images, labels of the mixed-in images, lam); (images, None, 1.0) when off."""
        if not self.enabled:
            return images, None, 1.0
        lam = float(self._rng.beta(self.alpha, self.alpha))
        perm = torch.from_numpy(self._rng.permutation(images.shape[0]))
        perm = perm.to(images.device, non_blocking=True)
        mixed = images.index_select(0, perm).lerp_(images, lam)  # two passes: (1 - lam) * x[perm] + lam * x
        return mixed, labels.index_select(0, perm), lam
