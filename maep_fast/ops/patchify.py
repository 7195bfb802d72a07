"""MAE's patchify / unpatchify (channel-last inside each patch).

patchify:   imgs [N, C, H, W] -> patches [N, (H/p)*(W/p), p*p*C]
unpatchify: patches [N, h*w, p*p*C] -> imgs [N, C, h*p, w*p]
"""
from __future__ import annotations

import torch


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    n, c, h, w = imgs.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"imgs height/width ({h}x{w}) must be divisible by patch_size={p}")
    gh, gw = h // p, w // p
    x = imgs.reshape(n, c, gh, p, gw, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(n, gh * gw, p * p * c)


def unpatchify(x: torch.Tensor, patch_size: int, channels: int, grid: tuple[int, int] | None = None) -> torch.Tensor:
    n, length, d = x.shape
    p = patch_size
    if d != p * p * channels:
        raise ValueError(f"patches last dim must be patch_size**2 * channels = {p * p * channels}, got {d}")
    if grid is None:
        side = int(round(length**0.5))
        if side * side != length:
            raise ValueError(f"cannot infer a square grid from {length} patches; pass grid=(h, w)")
        grid = (side, side)
    gh, gw = grid
    x = x.reshape(n, gh, gw, p, p, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(n, channels, gh * p, gw * p)
