"""MAEP purification: one forward pass of a masked autoencoder at mask ratio 0.

``Purifier`` wraps a MaskedAutoencoderViT trained to output clean pixels
(norm_pix_loss=False). ``forward`` is differentiable (adaptive attacks);
``purify`` runs without gradients in bounded-memory chunks. Images larger than
the model's input are purified tile by tile with overlap blending.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from maep_fast._checks import check_pixels, check_tensor
from maep_fast.checkpoint import load_model
from maep_fast.models.mae import MaskedAutoencoderViT
from maep_fast.purify.tiling import tiled_apply


class Purifier(nn.Module):
    """x [N, C, H, W] in [0, 1] -> purified [N, C, H, W] in [0, 1] (H, W >= img_size)."""

    def __init__(self, model: MaskedAutoencoderViT, batch_size: int = 256, tile_overlap: int | None = None,
                 fused: bool = True):
        super().__init__()
        if not isinstance(model, MaskedAutoencoderViT):
            raise TypeError(f"model must be a MaskedAutoencoderViT, got {type(model).__name__}")
        if model.norm_pix_loss:
            raise ValueError("model predicts per-patch normalized pixels (norm_pix_loss=True) and cannot output images; "
                             "MAEP purifiers are trained with norm_pix_loss=False")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        # fused=False runs the pure-PyTorch reference path for every op (sets the model's backend)
        self.model = model.set_backend("auto" if fused else "torch").eval()
        self.batch_size = batch_size
        t = model.img_size
        self.tile_overlap = t // 4 if tile_overlap is None else tile_overlap
        if not 0 <= self.tile_overlap < t:
            raise ValueError(f"tile_overlap must be in [0, {t}), got {self.tile_overlap}")

    @classmethod
    def from_checkpoint(cls, path: str | Path, map_location: str | torch.device = "cpu", **kwargs) -> "Purifier":
        return cls(load_model(path, expect_kind="mae", map_location=map_location), **kwargs)

    @property
    def img_size(self) -> int:
        return self.model.img_size

    def _single(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.reconstruct(x, mask_ratio=0.0).clamp(0.0, 1.0)

    def _check(self, x: torch.Tensor) -> torch.Tensor:
        """Metadata checks (no host sync): rank, dtype, device, channels, size."""
        check_tensor(x, "x", ndim=4)
        dev = next(self.model.parameters()).device
        if x.device != dev:
            raise ValueError(f"x is on {x.device} but the purifier is on {dev}")
        if x.shape[1] != self.model.in_chans:
            raise ValueError(f"x must have {self.model.in_chans} channel(s) (shape [N, {self.model.in_chans}, H, W]), "
                             f"got shape {tuple(x.shape)}")
        h, w = x.shape[-2:]
        if h < self.img_size or w < self.img_size:
            raise ValueError(f"x must be at least {self.img_size}x{self.img_size} pixels for this purifier, got {h}x{w}")
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Differentiable purification (no chunking). Metadata checks only: an attack calls this at
        every step, and its entry point has checked the pixels once (``pgd_attack``)."""
        self._check(x)
        if x.shape[-2:] == (self.img_size, self.img_size):
            return self._single(x)
        return tiled_apply(self._single, x, self.img_size, self.tile_overlap, max_batch=self.batch_size)

    @torch.no_grad()
    def purify(self, x: torch.Tensor, validate: bool = True) -> torch.Tensor:
        """Purify any number of images in chunks of ``batch_size`` without gradients.

        ``validate`` checks the pixels (finite, in [0, 1]; one host sync) before any work;
        ``validate=False`` skips that for inputs checked already, and then nothing here
        synchronizes with a CUDA device."""
        self._check(x)
        if validate:
            check_pixels(x, "x")
        outs = []
        for k in range(0, x.shape[0], self.batch_size):
            chunk = x[k:k + self.batch_size]
            if chunk.shape[-2:] == (self.img_size, self.img_size):
                outs.append(self._single(chunk))
            else:
                outs.append(tiled_apply(self._single, chunk, self.img_size, self.tile_overlap, max_batch=self.batch_size))
        return torch.cat(outs, dim=0)


class PurifiedClassifier(nn.Module):
    """classifier(purifier(x)), differentiable end to end (adaptive attacks)."""

    def __init__(self, purifier: nn.Module, classifier: nn.Module):
        super().__init__()
        self.purifier = purifier
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.purifier(x))
