"""Triton kernels of the patch reconstruction loss. The op's contract and semantics are those of
``maep_fast.ops.patch_recon_loss`` (module docstring); the launchers take arguments it has checked.

Layout: the N * L patches are rows r = n * L + l; a program owns BLOCK_R rows
and the whole patch (BLOCK_D = next_pow2(D), D = P * P * C) of each, so every
per-patch statistic is a register reduction along axis 1. The target patch is
gathered straight from imgs [N, C, H, W] (any strides) by index math, in
``patchify``'s channel-last order: column j -> (row i = j // (P*C),
col q = (j // C) % P, channel c = j % C) of patch (gh, gw) = divmod(l, W/P).
Patches tile the image, so every pixel belongs to exactly one (row, column):
the backward writes d/dimgs with plain stores, no atomics.

Forward (one launch): gather target, [norm_pix: shifted-data mean, unbiased
variance, (t - mean) / sqrt(var + 1e-6)], |pred - target|^p averaged over
the patch, times mask -> err [N, L] in the compute dtype (fp32; fp64 for fp64
inputs). The reduction over [N, L] is left to torch (see the op module).

Backward (one launch), per patch with w = dLoss/derr[n, l] * mask[n, l]:
    d = pred - t_hat,  g_j = w / D * (2 d_j  |  sign(d_j))   -> dpred
    u = -g  (dLoss / d t_hat)
    norm_pix=False: dimgs = u
    norm_pix=True, t_hat = (t - mu) * r, r = (var + eps)^-1/2, var = sum (t - mu)^2 / (D - 1):
        d t_hat_j / d t_k = r * (delta_jk - 1/D - t_hat_j t_hat_k / (D - 1))
    (d mu / d t_k = 1/D; d r / d t_k = -r^3 (t_k - mu) / (D - 1), the sum
    over j of (t_j - mu) vanishing), so
        dimgs_k = r * (u_k - mean(u) - t_hat_k * sum_j(u_j t_hat_j) / (D - 1)).
The statistics are recomputed from the gathered patch (bitwise the forward's
values), which costs no extra memory traffic since t is loaded anyway.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
NORM_EPS = 1.0e-6


@triton.jit
def _image_offsets(n, l_idx, cols, GW, C, P, s_n, s_c, s_h, s_w):
    """Element offsets [BLOCK_R, BLOCK_D] of patch ``l_idx`` of image ``n`` in an [N, C, H, W]
    tensor with strides ``s_*``; column ``cols`` = (i * P + q) * C + c, MAE's patchify order."""
    c = cols % C
    q = (cols // C) % P
    i = cols // (C * P)
    gh = l_idx // GW
    gw = l_idx % GW
    return (n[:, None] * s_n + c[None, :] * s_c
            + (gh[:, None] * P + i[None, :]) * s_h + (gw[:, None] * P + q[None, :]) * s_w)


@triton.jit
def _normalize(t, m2, cols, D, CDT: tl.constexpr, BLOCK_R: tl.constexpr):
    """Per-row (t - mean) * rstd with unbiased variance; returns (t_hat, rstd).

    Shifted-data algorithm: subtract the row's first element before the mean,
    so near-constant patches are centred without cancellation error.
    """
    shift = tl.sum(tl.where(cols[None, :] == 0, t, 0.0), axis=1)
    d = tl.where(m2, t - shift[:, None], 0.0)
    mu = tl.sum(d, axis=1) / D
    xc = tl.where(m2, d - mu[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / (D - 1)
    eps = tl.full([BLOCK_R], 1.0e-6, CDT)
    if CDT == tl.float64:
        std = tl.sqrt(var + eps)
    else:
        std = tl.sqrt_rn(var + eps)  # tl.sqrt may lower to sqrt.approx for fp32
    rstd = 1.0 / std
    return xc * rstd[:, None], rstd


@triton.jit
def _load_rows(
    pred_ptr, imgs_ptr,
    s_pn, s_pl, s_pd, s_in, s_ic, s_ih, s_iw,
    R, L, GW, C, P, D,
    NORM_PIX: tl.constexpr, CDT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """This program's BLOCK_R patches: pred and target as [BLOCK_R, BLOCK_D] in CDT (target
    normalized per patch under NORM_PIX, with its rstd; rstd is unused otherwise), the element
    mask, rows, cols and each row's (image, patch) index."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    m2 = (rows < R)[:, None] & (cols < D)[None, :]
    n = rows // L
    l_idx = rows % L
    img_off = _image_offsets(n, l_idx, cols, GW, C, P, s_in, s_ic, s_ih, s_iw)
    t = tl.load(imgs_ptr + img_off, mask=m2, other=0.0).to(CDT)
    pred_off = n[:, None] * s_pn + l_idx[:, None] * s_pl + cols[None, :] * s_pd
    pr = tl.load(pred_ptr + pred_off, mask=m2, other=0.0).to(CDT)
    if NORM_PIX:
        t, rstd = _normalize(t, m2, cols, D, CDT, BLOCK_R)
    else:
        rstd = tl.zeros([BLOCK_R], CDT)
    return t, pr, m2, rows, cols, n, l_idx, rstd


@triton.jit
def _patch_recon_loss_fwd_kernel(
    err_ptr, pred_ptr, imgs_ptr, mask_ptr,
    s_pn, s_pl, s_pd, s_in, s_ic, s_ih, s_iw, s_mn, s_ml,
    R, L, GW, C, P, D,
    NORM_PIX: tl.constexpr, POWER: tl.constexpr, HAS_MASK: tl.constexpr,
    CDT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t, pr, m2, rows, cols, n, l_idx, rstd = _load_rows(
        pred_ptr, imgs_ptr, s_pn, s_pl, s_pd, s_in, s_ic, s_ih, s_iw, R, L, GW, C, P, D,
        NORM_PIX, CDT, BLOCK_R, BLOCK_D,
    )
    diff = tl.where(m2, pr - t, 0.0)
    if POWER == 2:
        e = diff * diff
    else:
        e = tl.abs(diff)
    err = tl.sum(e, axis=1) / D
    rmask = rows < R
    if HAS_MASK:
        err = err * tl.load(mask_ptr + n * s_mn + l_idx * s_ml, mask=rmask, other=0.0).to(CDT)
    tl.store(err_ptr + rows, err.to(err_ptr.dtype.element_ty), mask=rmask)


@triton.jit
def _patch_recon_loss_bwd_kernel(
    dpred_ptr, dimgs_ptr, gerr_ptr, pred_ptr, imgs_ptr, mask_ptr,
    s_pn, s_pl, s_pd, s_in, s_ic, s_ih, s_iw, s_mn, s_ml, s_gn, s_gl,
    s_dpn, s_dpl, s_dpd, s_din, s_dic, s_dih, s_diw,
    R, L, GW, C, P, D,
    NORM_PIX: tl.constexpr, POWER: tl.constexpr, HAS_MASK: tl.constexpr,
    CDT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t, pr, m2, rows, cols, n, l_idx, rstd = _load_rows(
        pred_ptr, imgs_ptr, s_pn, s_pl, s_pd, s_in, s_ic, s_ih, s_iw, R, L, GW, C, P, D,
        NORM_PIX, CDT, BLOCK_R, BLOCK_D,
    )
    rmask = rows < R
    w = tl.load(gerr_ptr + n * s_gn + l_idx * s_gl, mask=rmask, other=0.0).to(CDT)
    if HAS_MASK:
        w = w * tl.load(mask_ptr + n * s_mn + l_idx * s_ml, mask=rmask, other=0.0).to(CDT)
    w = w / D
    diff = pr - t
    if POWER == 2:
        gd = (2.0 * w)[:, None] * diff
    else:
        sgn = tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, 0.0)).to(CDT)
        gd = w[:, None] * sgn
    gd = tl.where(m2, gd, 0.0)
    pred_off = n[:, None] * s_dpn + l_idx[:, None] * s_dpl + cols[None, :] * s_dpd
    tl.store(dpred_ptr + pred_off, gd.to(dpred_ptr.dtype.element_ty), mask=m2)
    u = -gd
    if NORM_PIX:
        mean_u = tl.sum(u, axis=1) / D
        dot = tl.sum(u * t, axis=1) / (D - 1)
        dt = rstd[:, None] * (u - mean_u[:, None] - t * dot[:, None])
    else:
        dt = u
    dimg_off = _image_offsets(n, l_idx, cols, GW, C, P, s_din, s_dic, s_dih, s_diw)
    tl.store(dimgs_ptr + dimg_off, dt.to(dimgs_ptr.dtype.element_ty), mask=m2)


def compute_dtype(pred: torch.Tensor, imgs: torch.Tensor) -> torch.dtype:
    return torch.float64 if torch.float64 in (pred.dtype, imgs.dtype) else torch.float32


def _tiles(rows: int, d: int, block_r: int | None = None) -> tuple[int, int, int]:
    block_d = max(2, triton.next_power_of_2(d))
    max_elems = 1 << 16 if _INTERPRET else 2048  # interpreter: few wide programs; GPU: register budget
    if block_r is None:
        block_r = max(1, min(triton.next_power_of_2(rows), max_elems // block_d))
    num_warps = 8 if block_r * block_d >= 4096 else 4
    return block_r, block_d, num_warps


def _mask_arg(mask: torch.Tensor | None, cdtype: torch.dtype, like: torch.Tensor):
    if mask is None:
        return like, 0, 0, False  # dummy pointer, never read (HAS_MASK=False)
    if mask.dtype == torch.bool or not mask.is_floating_point():
        mask = mask.to(cdtype)
    return mask, mask.stride(0), mask.stride(1), True


def _geometry(pred: torch.Tensor, imgs: torch.Tensor, patch_size: int):
    n, c, h, w = imgs.shape
    gw = w // patch_size
    length = (h // patch_size) * gw
    return n * length, length, gw, c, patch_size * patch_size * c


def patch_recon_loss_fwd(
    pred: torch.Tensor,
    imgs: torch.Tensor,
    mask: torch.Tensor | None,
    patch_size: int,
    norm_pix: bool,
    p: int,
    *,
    out: torch.Tensor | None = None,
    block_r: int | None = None,
) -> torch.Tensor:
    """Per-patch masked error err [N, L] in the compute dtype (fp32, fp64 for fp64 inputs).
    ``out`` and ``block_r`` (patches per program, a power of two) are private
    hooks for tests: NaN-poisoned buffers, several programs on small inputs."""
    cdtype = compute_dtype(pred, imgs)
    rows, length, gw, c, d = _geometry(pred, imgs, patch_size)
    if out is None:
        out = torch.empty((imgs.shape[0], length), dtype=cdtype, device=pred.device)
    m, s_mn, s_ml, has_mask = _mask_arg(mask, cdtype, out)
    block_r, block_d, num_warps = _tiles(rows, d, block_r)
    grid = (triton.cdiv(rows, block_r),)
    _patch_recon_loss_fwd_kernel[grid](
        out, pred, imgs, m,
        *pred.stride(), *imgs.stride(), s_mn, s_ml,
        rows, length, gw, c, patch_size, d,
        NORM_PIX=bool(norm_pix), POWER=int(p), HAS_MASK=has_mask,
        CDT=tl.float64 if cdtype == torch.float64 else tl.float32,
        BLOCK_R=block_r, BLOCK_D=block_d, num_warps=num_warps,
    )
    return out


def patch_recon_loss_bwd(
    grad_err: torch.Tensor,
    pred: torch.Tensor,
    imgs: torch.Tensor,
    mask: torch.Tensor | None,
    patch_size: int,
    norm_pix: bool,
    p: int,
    *,
    dpred: torch.Tensor | None = None,
    dimgs: torch.Tensor | None = None,
    block_r: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients (dpred, dimgs) of sum(grad_err * err) (contiguous, dtypes of pred / imgs).
    ``grad_err`` may have any strides (an expanded scalar gradient is read in place)."""
    cdtype = compute_dtype(pred, imgs)
    rows, length, gw, c, d = _geometry(pred, imgs, patch_size)
    if dpred is None:
        dpred = torch.empty(pred.shape, dtype=pred.dtype, device=pred.device)
    if dimgs is None:
        dimgs = torch.empty(imgs.shape, dtype=imgs.dtype, device=imgs.device)
    m, s_mn, s_ml, has_mask = _mask_arg(mask, cdtype, grad_err)
    block_r, block_d, num_warps = _tiles(rows, d, block_r)
    grid = (triton.cdiv(rows, block_r),)
    _patch_recon_loss_bwd_kernel[grid](
        dpred, dimgs, grad_err, pred, imgs, m,
        *pred.stride(), *imgs.stride(), s_mn, s_ml, *grad_err.stride(),
        *dpred.stride(), *dimgs.stride(),
        rows, length, gw, c, patch_size, d,
        NORM_PIX=bool(norm_pix), POWER=int(p), HAS_MASK=has_mask,
        CDT=tl.float64 if cdtype == torch.float64 else tl.float32,
        BLOCK_R=block_r, BLOCK_D=block_d, num_warps=num_warps,
    )
    return dpred, dimgs
