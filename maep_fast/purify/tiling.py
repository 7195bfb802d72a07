"""Tile-by-tile application of a fixed-size image function with overlap blending.

A purifier trained on t x t images is applied to [N, C, H, W] images with
H, W >= t: the image is edge-padded so tiles of size t start every
``t - overlap`` pixels, each output tile is weighted by a separable ramp
window that fades over the overlap, overlapping tiles are summed (F.fold) and
normalized by the summed weights, and the padding is cropped. Everything is
differentiable, so adaptive attacks can go through it.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F


def ramp_window(tile: int, overlap: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """[tile, tile] weights: 1 in the middle, rising linearly over ``overlap`` pixels at the edges (never 0)."""
    pos = torch.arange(tile, device=device, dtype=dtype)
    dist = torch.minimum(pos + 1, tile - pos)
    w1 = (dist / (overlap + 1)).clamp(max=1.0) if overlap > 0 else torch.ones(tile, device=device, dtype=dtype)
    return w1[:, None] * w1[None, :]


def _padded(size: int, tile: int, stride: int) -> int:
    return tile + stride * math.ceil(max(size - tile, 0) / stride)


def tiled_apply(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int, overlap: int, max_batch: int = 256
) -> torch.Tensor:
    """Apply ``fn`` ([M, C, tile, tile] -> same shape) over tiles of x [N, C, H, W] -> [N, C, H, W]."""
    n, c, h, w = x.shape
    if h < tile or w < tile:
        raise ValueError(f"image {h}x{w} is smaller than the tile size {tile}")
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile={tile}), got {overlap}")
    stride = tile - overlap
    hp, wp = _padded(h, tile, stride), _padded(w, tile, stride)
    xp = F.pad(x, (0, wp - w, 0, hp - h), mode="replicate") if (hp, wp) != (h, w) else x
    cols = F.unfold(xp, kernel_size=tile, stride=stride)  # [N, C*t*t, T]
    n_tiles = cols.shape[-1]
    tiles = cols.transpose(1, 2).reshape(n * n_tiles, c, tile, tile)
    outs = torch.cat([fn(tiles[k:k + max_batch]) for k in range(0, tiles.shape[0], max_batch)], dim=0)
    win = ramp_window(tile, overlap, device=x.device, dtype=outs.dtype)
    outs = (outs * win).reshape(n, n_tiles, c * tile * tile).transpose(1, 2)
    acc = F.fold(outs, output_size=(hp, wp), kernel_size=tile, stride=stride)
    wcols = win.reshape(1, tile * tile, 1).expand(1, tile * tile, n_tiles)
    norm = F.fold(wcols, output_size=(hp, wp), kernel_size=tile, stride=stride)
    return (acc / norm)[:, :, :h, :w]
