"""Patch reconstruction loss: patchify + per-patch normalization + error +
mask weighting + reduction (MAE's ``forward_loss``, generalized).

pred:  [N, L, p*p*C]   decoder output in patch layout
imgs:  [N, C, H, W]    images; the target is ``patchify(imgs)``
mask:  [N, L] or None  1 = patch counted (MAE: removed), 0 = ignored;
                       None counts every patch (mask ratio 0 never divides by 0)

err[n, l] = mean_j |pred[n, l, j] - target[n, l, j]|^p
with norm_pix the target patch is (t - mean) / sqrt(var_unbiased + 1e-6).

reduction: 'mean'       sum(err * mask) / sum(mask)   (0 when the mask is empty)
           'sum'        sum(err * mask)
           'per_sample' [N]: per-sample masked mean (0 where a sample's mask is empty)
           'none'       [N, L]: err * mask

Gradients flow to both ``pred`` and ``imgs`` (test-time purification
differentiates the loss with respect to the image, which is also the target).
With p = 1, norm_pix = False and mask = None this is l1(unpatchify(pred), imgs).
"""
from __future__ import annotations

import torch

from maep_fast._checks import check_same_device, check_tensor
from maep_fast.ops._dispatch import resolve_backend
from maep_fast.ops.patchify import patchify

REDUCTIONS = ("mean", "sum", "per_sample", "none")


def _validate(pred, imgs, mask, patch_size, p, reduction):
    check_tensor(pred, "pred", ndim=3)
    check_tensor(imgs, "imgs", ndim=4)
    check_same_device("pred", pred, "imgs", imgs)
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")
    n, c, h, w = imgs.shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"imgs height/width ({h}x{w}) must be divisible by patch_size={patch_size}")
    length = (h // patch_size) * (w // patch_size)
    want = (n, length, patch_size * patch_size * c)
    if tuple(pred.shape) != want:
        raise ValueError(f"pred must have shape {list(want)} for imgs {list(imgs.shape)} and patch_size={patch_size}, got {list(pred.shape)}")
    if mask is not None:
        check_tensor(mask, "mask", ndim=2, dtypes=None)
        if tuple(mask.shape) != (n, length):
            raise ValueError(f"mask must have shape [{n}, {length}], got {list(mask.shape)}")
        check_same_device("pred", pred, "mask", mask)
    if p not in (1, 2):
        raise ValueError(f"p must be 1 or 2, got {p!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def normalize_patches(target: torch.Tensor) -> torch.Tensor:
    """Per-patch normalization of MAE's norm_pix_loss: [N, L, D] -> [N, L, D]."""
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)  # unbiased, as in MAE
    return (target - mean) / (var + 1.0e-6) ** 0.5


def patch_recon_loss_reference(
    pred: torch.Tensor,
    imgs: torch.Tensor,
    mask: torch.Tensor | None,
    patch_size: int,
    norm_pix: bool,
    p: int,
    reduction: str,
) -> torch.Tensor:
    target = patchify(imgs, patch_size)
    if norm_pix:
        target = normalize_patches(target)
    diff = pred - target
    err = (diff * diff if p == 2 else diff.abs()).mean(dim=-1)  # [N, L]
    if mask is None:
        if reduction == "mean":
            return err.mean()
        if reduction == "sum":
            return err.sum()
        if reduction == "per_sample":
            return err.mean(dim=1)
        return err
    m = mask.to(err.dtype)
    weighted = err * m
    if reduction == "none":
        return weighted
    if reduction == "sum":
        return weighted.sum()
    if reduction == "per_sample":
        denom = m.sum(dim=1)
        return torch.where(denom > 0, weighted.sum(dim=1) / denom.clamp_min(1e-12), torch.zeros_like(denom))
    denom = m.sum()
    return torch.where(denom > 0, weighted.sum() / denom.clamp_min(1e-12), torch.zeros_like(denom))


def patch_recon_loss(
    pred: torch.Tensor,
    imgs: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    patch_size: int,
    norm_pix: bool = True,
    p: int = 2,
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    """See module docstring. Only the reference (``torch``) backend exists so far."""
    _validate(pred, imgs, mask, patch_size, p, reduction)
    resolve_backend("patch_recon_loss", backend, pred.device)
    return patch_recon_loss_reference(pred, imgs, mask, patch_size, norm_pix, p, reduction)
