"""Patch reconstruction loss: patchify + per-patch normalization + error +
mask weighting + reduction (MAE's ``forward_loss``, generalized).

This docstring is the op's contract; ``_validate`` checks it (shapes, dtypes and
devices, never values), ``_out_shape`` gives the loss's shape, and the native
kernels' guard (``check_patch_recon_loss_args``, csrc/patch_recon_loss.h) and the
Triton / CUDA kernels refer here.

pred:  [N, L, P*P*C]  decoder output in patch layout, P = patch_size, L = (H/P)*(W/P)
imgs:  [N, C, H, W]   images, H and W divisible by P; the target is ``patchify(imgs)``
mask:  [N, L] or None 1 = patch counted (MAE: removed), 0 = ignored (bool, int or float);
                      None counts every patch (mask ratio 0 never divides by 0)
patch_size: int >= 1;  p: 1 or 2;  reduction: one of ``REDUCTIONS``

pred and imgs are non-empty fp16 / bf16 / fp32 / fp64 tensors on one device (mask
on it too); they may differ in dtype (the native backends then compute in the
promoted dtype). The loss has dtype promote(pred, imgs). A wrong argument raises
before any kernel runs, naming it: ``TypeError`` for a non-tensor or a non-float
dtype, ``ValueError`` for a wrong rank, shape, device, patch_size, p or reduction.

err[n, l] = mean_j |pred[n, l, j] - target[n, l, j]|^p
with norm_pix the target patch is (t - mean) / sqrt(var_unbiased + 1e-6).

reduction: 'mean'       [] sum(err * mask) / sum(mask)   (0 when the mask is empty)
           'sum'        [] sum(err * mask)
           'per_sample' [N]: per-sample masked mean (0 where a sample's mask is empty)
           'none'       [N, L]: err * mask

Gradients flow to both ``pred`` and ``imgs`` (test-time purification
differentiates the loss with respect to the image, which is also the target).
With p = 1, norm_pix = False and mask = None this is l1(unpatchify(pred), imgs).

Backends: ``torch`` (reference), ``triton`` (one fused forward kernel writing
the masked per-patch error [N, L], one fused backward kernel writing the
gradients of pred and imgs; ``maep_fast/ops/triton_kernels/patch_recon_loss.py``),
``cpp`` / ``cuda`` (``torch.ops.maep_fast.patch_recon_loss`` of the native
extension, autograd registered in ``maep_fast.ops._native_ops``).

The Triton path reduces the [N, L] error buffer with torch ops, not in the
kernel: the buffer is 1/D of the data the kernel reads (D = P*P*C values per
patch), a torch sum is deterministic where an in-kernel cross-program sum
needs atomics (run-to-run fp32 differences) or a second launch anyway, the
mask-count denominators and their empty-mask guards stay the reference's
code, and autograd derives the per-patch upstream weights (1/count, 0 for
empty masks, per-sample) that the backward kernel consumes. torch.compile
fuses those few ops into one small kernel. The per-patch error is kept in
fp32 (fp64 for fp64 inputs) and the loss is cast to promote(pred, imgs) last.
The mask is not differentiated (it is data: which patches are counted).
"""
from __future__ import annotations

from typing import Optional

import torch

from maep_fast._checks import check_same_device, check_tensor
from maep_fast.ops._dispatch import register_backends, resolve_backend
from maep_fast.ops._fastcall import NativeOp, eager
from maep_fast.ops.patchify import patchify

REDUCTIONS = ("mean", "sum", "per_sample", "none")

register_backends("patch_recon_loss", "triton", "cpp", "cuda")


_FLOATS = frozenset((torch.float16, torch.bfloat16, torch.float32, torch.float64))
_REDUCTION_SET = frozenset(REDUCTIONS)


def _out_shape(n: int, length: int, reduction: str) -> tuple:
    """The loss's shape for ``reduction``: [] (mean, sum), [N] (per_sample), [N, L] (none)."""
    return (n,) if reduction == "per_sample" else (n, length) if reduction == "none" else ()


def _validate(pred, imgs, mask, patch_size, p, reduction, *, full: bool = False) -> None:
    """The contract's checks (module docstring): raise naming the argument, else return None.

    Shapes, dtypes and devices only, never tensor values (no host sync). The common call is
    recognised first by one expression, at half the cost of the named checks, which run for
    anything else (and for every call with ``full=True``)."""
    if not full:
        try:
            if type(patch_size) is int and patch_size > 0 and (p == 2 or p == 1) and reduction in _REDUCTION_SET:
                ps, ish = pred.shape, imgs.shape
                if len(ish) == 4 and len(ps) == 3:
                    n, c, h, w = ish
                    length = (h // patch_size) * (w // patch_size)
                    if (ps[0] == n and ps[1] == length and ps[2] == patch_size * patch_size * c
                            and n * length * c > 0 and h % patch_size == 0 and w % patch_size == 0
                            and pred.dtype in _FLOATS and imgs.dtype in _FLOATS and pred.device == imgs.device
                            and (mask is None or (mask.shape == (n, length) and mask.device == pred.device
                                                  and isinstance(mask, torch.Tensor)))
                            and isinstance(pred, torch.Tensor) and isinstance(imgs, torch.Tensor)):
                        return
        except (AttributeError, TypeError, ValueError):
            pass  # not tensors, or not shaped like any: the named checks say what is wrong
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


def _safe_denom(denom: torch.Tensor) -> torch.Tensor:
    """denom where > 0, else 1: the untaken branch of the empty-mask ``where`` stays
    finite in every dtype. ``clamp_min(1e-12)`` is 0 in fp16, so an empty mask gave
    a NaN gradient there (the division's backward computes 0 * (1 / 0))."""
    return torch.where(denom > 0, denom, torch.ones_like(denom))


def _reduce(err: torch.Tensor, m: torch.Tensor | None, reduction: str) -> torch.Tensor:
    """The reference's reduction on the (already mask-weighted) [N, L] error."""
    if m is None:
        if reduction == "mean":
            return err.mean()
        if reduction == "sum":
            return err.sum()
        if reduction == "per_sample":
            return err.mean(dim=1)
        return err
    if reduction == "none":
        return err
    if reduction == "sum":
        return err.sum()
    if reduction == "per_sample":
        denom = m.sum(dim=1)
        return torch.where(denom > 0, err.sum(dim=1) / _safe_denom(denom), torch.zeros_like(denom))
    denom = m.sum()
    return torch.where(denom > 0, err.sum() / _safe_denom(denom), torch.zeros_like(denom))


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
    m = None if mask is None else mask.to(err.dtype)
    return _reduce(err if m is None else err * m, m, reduction)


_NATIVE = NativeOp("patch_recon_loss", _validate)


def _goes_native(pred, imgs, patch_size, p, reduction, backend) -> bool:
    """Whether an eager call can go straight to the native op (``maep_fast.ops._fastcall``):
    tensors of one dtype, plain scalar arguments, the cpp backend."""
    return (isinstance(pred, torch.Tensor) and isinstance(imgs, torch.Tensor) and pred.dtype is imgs.dtype
            and type(patch_size) is int and (p == 2 or p == 1) and reduction in _REDUCTION_SET
            and _NATIVE.goes_native(backend, pred.device, resolve_backend))


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
    """See module docstring; ``backend`` is auto | torch | triton | cpp | cuda."""
    # autograd in C++ (csrc/patch_recon_loss_autograd.cpp), fake kernel in maep_fast/ops/_native_ops.py
    if _goes_native(pred, imgs, patch_size, p, reduction, backend):
        try:
            return _NATIVE.entry()(pred, imgs, mask, patch_size, bool(norm_pix), int(p), reduction)
        except Exception as refused:  # re-raised as it is unless the Python checks name an argument
            raise _NATIVE.argument_error(refused, pred, imgs, mask, patch_size, p, reduction) from None
    _validate(pred, imgs, mask, patch_size, p, reduction)
    be = resolve_backend("patch_recon_loss", backend, pred.device)
    if be in ("cpp", "cuda"):
        if pred.dtype != imgs.dtype:  # e.g. bf16 pred under autocast, fp32 images
            dt = torch.promote_types(pred.dtype, imgs.dtype)
            pred, imgs = pred.to(dt), imgs.to(dt)
        return eager(_NATIVE.overload())(pred, imgs, mask, patch_size, bool(norm_pix), int(p), reduction)
    if be == "triton":
        return _patch_recon_loss_triton(pred, imgs, mask, patch_size, bool(norm_pix), int(p), reduction)
    return patch_recon_loss_reference(pred, imgs, mask, patch_size, norm_pix, p, reduction)


# ---------------------------------------------------------------- Triton backend
def _compute_dtype(pred: torch.Tensor, imgs: torch.Tensor) -> torch.dtype:
    return torch.float64 if torch.float64 in (pred.dtype, imgs.dtype) else torch.float32


@torch.library.custom_op("maep_fast::patch_recon_loss_triton", mutates_args=())
def _prl_triton_fwd(
    pred: torch.Tensor, imgs: torch.Tensor, mask: Optional[torch.Tensor], patch_size: int, norm_pix: bool, p: int
) -> torch.Tensor:
    """Masked per-patch error err[n, l] * mask[n, l] ([N, L], fp32 or fp64): one fused kernel."""
    from maep_fast.ops.triton_kernels.patch_recon_loss import patch_recon_loss_fwd

    return patch_recon_loss_fwd(pred, imgs, mask, patch_size, norm_pix, p)


@_prl_triton_fwd.register_fake
def _(pred, imgs, mask, patch_size, norm_pix, p):
    return pred.new_empty(_out_shape(pred.shape[0], pred.shape[1], "none"), dtype=_compute_dtype(pred, imgs))


@torch.library.custom_op("maep_fast::patch_recon_loss_triton_backward", mutates_args=())
def _prl_triton_bwd(
    grad_err: torch.Tensor,
    pred: torch.Tensor,
    imgs: torch.Tensor,
    mask: Optional[torch.Tensor],
    patch_size: int,
    norm_pix: bool,
    p: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(d pred, d imgs) of sum(grad_err * err): one fused kernel."""
    from maep_fast.ops.triton_kernels.patch_recon_loss import patch_recon_loss_bwd

    return patch_recon_loss_bwd(grad_err, pred, imgs, mask, patch_size, norm_pix, p)


@_prl_triton_bwd.register_fake
def _(grad_err, pred, imgs, mask, patch_size, norm_pix, p):
    return pred.new_empty(pred.shape), imgs.new_empty(imgs.shape)


def _prl_setup_context(ctx, inputs, output):
    pred, imgs, mask, patch_size, norm_pix, p = inputs
    ctx.save_for_backward(pred, imgs, mask)
    ctx.cfg = (patch_size, norm_pix, p)


def _prl_backward(ctx, grad_err):
    pred, imgs, mask = ctx.saved_tensors
    dpred, dimgs = torch.ops.maep_fast.patch_recon_loss_triton_backward(grad_err, pred, imgs, mask, *ctx.cfg)
    return dpred, dimgs, None, None, None, None


_prl_triton_fwd.register_autograd(_prl_backward, setup_context=_prl_setup_context)


def _patch_recon_loss_triton(pred, imgs, mask, patch_size, norm_pix, p, reduction):
    cdtype = _compute_dtype(pred, imgs)
    m = None if mask is None else mask.detach().to(cdtype)
    err = torch.ops.maep_fast.patch_recon_loss_triton(pred, imgs, m, patch_size, norm_pix, p)
    return _reduce(err, m, reduction).to(torch.promote_types(pred.dtype, imgs.dtype))
