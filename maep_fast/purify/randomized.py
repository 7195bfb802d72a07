"""MAEP with test-time randomness: purify at a mask ratio above zero, averaged over fresh masks."""
from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["RandomizedMAEP"]


class RandomizedMAEP(nn.Module):
    """MAEP with test-time randomness: the mean of ``n_masks`` reconstructions of x, each at
    ``mask_ratio`` with fresh random masks (the decoder fills the removed patches). Differentiable;
    ``randomized`` tells the evaluation to attack it with EOT."""

    randomized = True
    seed = None

    def __init__(self, model, mask_ratio: float = 0.25, n_masks: int = 4, batch_size: int = 256):
        super().__init__()
        if not 0 < mask_ratio < 1:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        if n_masks < 1:
            raise ValueError(f"n_masks must be >= 1, got {n_masks}")
        self.model, self.mask_ratio, self.n_masks, self.batch_size = model.eval(), mask_ratio, n_masks, batch_size

    @property
    def config(self) -> dict:
        return {"kind": "MAEP + test-time masks", "mask_ratio": self.mask_ratio, "n_masks": self.n_masks}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [self.model.reconstruct(x, mask_ratio=self.mask_ratio) for _ in range(self.n_masks)]
        return torch.stack(outs).mean(0).clamp(0, 1)

    @torch.no_grad()
    def purify(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self(x[k:k + self.batch_size]) for k in range(0, x.shape[0], self.batch_size)])
