"""Masked-patch attention (reference path).

q, k, v: [B, H, L, D]; keep: optional bool [B, L], True = visible patch.
Softmax runs over visible keys only; rows of hidden queries are zeros and get
zero gradient. keep=None is plain attention. ``return_attn`` also returns the
attention matrix [B, H, L, L] (the AMV diagnostic reads it).
"""
from __future__ import annotations

import torch

from maep_fast._checks import check_same_device, check_tensor
from maep_fast.ops._dispatch import resolve_backend


def _validate(q, k, v, keep, scale):
    check_tensor(q, "q", ndim=4)
    check_tensor(k, "k", ndim=4, dtypes=(q.dtype,))
    check_tensor(v, "v", ndim=4, dtypes=(q.dtype,))
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must share one shape [B, H, L, D]; got {list(q.shape)}, {list(k.shape)}, {list(v.shape)}")
    check_same_device("q", q, "k", k)
    check_same_device("q", q, "v", v)
    if keep is not None:
        check_tensor(keep, "keep", ndim=2, dtypes=(torch.bool,))
        if tuple(keep.shape) != (q.shape[0], q.shape[2]):
            raise ValueError(f"keep must have shape [B, L] = [{q.shape[0]}, {q.shape[2]}], got {list(keep.shape)}")
        check_same_device("q", q, "keep", keep)
    if scale is not None and not (isinstance(scale, (int, float)) and scale > 0):
        raise ValueError(f"scale must be a positive number or None, got {scale!r}")


def masked_patch_attention_reference(q, k, v, keep=None, scale=None, return_attn=False):
    d = q.shape[-1]
    scale = d**-0.5 if scale is None else scale
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32  # fp32 statistics for low precision
    scores = torch.matmul(q.to(acc), k.to(acc).transpose(-2, -1)) * scale  # [B, H, L, L]
    if keep is not None:
        kmask = keep[:, None, None, :]
        scores = scores.masked_fill(~kmask, float("-inf"))
        # a query row whose sample has no visible key would be all -inf: make it finite
        scores = torch.where(keep.any(dim=1)[:, None, None, None], scores, torch.zeros_like(scores))
    attn = scores.softmax(dim=-1)
    if keep is not None:
        attn = attn * keep[:, None, :, None].to(attn.dtype)  # hidden query rows -> 0
    out = torch.matmul(attn, v.to(acc)).to(q.dtype)
    return (out, attn) if return_attn else out


def masked_patch_attention(q, k, v, keep=None, *, scale=None, backend="auto"):
    """Attention over visible patches; see module docstring for shapes."""
    _validate(q, k, v, keep, scale)
    resolve_backend("masked_patch_attention", backend, q.device)
    return masked_patch_attention_reference(q, k, v, keep, scale)
