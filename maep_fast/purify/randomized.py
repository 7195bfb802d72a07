"""MAEP with test-time randomness: purify at a mask ratio above zero and/or from a noisy input, averaged
over fresh draws."""
from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["RandomizedMAEP"]


class RandomizedMAEP(nn.Module):
    """MAEP with test-time randomness: the mean of ``n_masks`` reconstructions of x [N, C, H, W], each at
    ``mask_ratio`` with fresh random masks (the decoder fills the removed patches) and, with
    ``noise_std`` > 0, of x plus fresh Gaussian noise of that std (a purifier trained with
    ``MAEPConfig(input_noise=...)``). Differentiable; ``randomized`` tells the evaluation to attack it
    with EOT."""

    randomized = True
    seed = None

    def __init__(self, model, mask_ratio: float = 0.25, n_masks: int = 4, batch_size: int = 256,
                 noise_std: float = 0.0):
        super().__init__()
        if not (isinstance(noise_std, (int, float)) and not isinstance(noise_std, bool) and 0 <= noise_std < float("inf")):
            raise ValueError(f"noise_std must be a finite number >= 0, got {noise_std!r}")
        if not (0 < mask_ratio < 1 or (mask_ratio == 0 and noise_std > 0)):
            raise ValueError(f"mask_ratio must be in (0, 1) (or 0 with noise_std > 0), got {mask_ratio}")
        if n_masks < 1:
            raise ValueError(f"n_masks must be >= 1, got {n_masks}")
        self.model, self.mask_ratio, self.n_masks, self.batch_size = model.eval(), mask_ratio, n_masks, batch_size
        self.noise_std = float(noise_std)

    @property
    def config(self) -> dict:
        kind = "MAEP + test-time masks" if not self.noise_std else "MAEP + test-time noise"
        return {"kind": kind, "mask_ratio": self.mask_ratio, "n_masks": self.n_masks, "noise_std": self.noise_std}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.noise_std
        outs = [self.model.reconstruct(x + s * torch.randn_like(x) if s > 0 else x, mask_ratio=self.mask_ratio)
                for _ in range(self.n_masks)]
        return torch.stack(outs).mean(0).clamp(0, 1)

    @torch.no_grad()
    def purify(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self(x[k:k + self.batch_size]) for k in range(0, x.shape[0], self.batch_size)])
