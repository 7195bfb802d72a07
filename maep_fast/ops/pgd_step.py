"""Fused projected-gradient step: ``pgd_step`` / ``pgd_step_``.

One update of PGD (attack, ``direction=+1``) or of test-time purification
(descent, ``direction=-1``)::

    L-inf:  x' = x + direction * step * sign(grad)
    L2:     x' = x + direction * step * grad / ||grad||_2      (per sample)
    then    x' = x0 + Proj_{||.|| <= eps}(x' - x0)                (per sample)
            x' = clamp(x', clamp_min, clamp_max)

Shapes: ``x``, ``grad``, ``x0``: [B, ...] (same shape and dtype). ``step_size``
and ``eps``: Python numbers or tensors of shape [] or [B]. Arithmetic is done
in fp32 (fp64 for fp64 inputs). A sample whose gradient is all zero does not
move before projection.

Backends: ``torch`` (reference, any device), ``cpp`` (``torch.ops.maep_fast``
CPU kernel from ``csrc/``), ``triton`` (``triton_kernels/pgd_step.py``: L-inf
one elementwise launch; L2 three launches: grad-norm partials, update +
delta-norm partials, projection + clamp + store; custom ops
``maep_fast::pgd_step_triton`` and the in-place ``maep_fast::pgd_step_triton_``
with fake kernels, so torch.compile traces them). The step is not
differentiable (an update, not a layer).
"""
from __future__ import annotations

import math

import torch

from maep_fast._checks import check_same_device, check_tensor
from maep_fast._native import native_available
from maep_fast.ops._dispatch import register_backends, resolve_backend

NORMS = ("linf", "l2")

register_backends("pgd_step", "cpp", "cuda")
register_backends("pgd_step", "triton")


def _as_per_sample(v: object, name: str, batch: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        if v.dim() == 0 or (v.dim() == 1 and v.numel() == 1):
            t = v.reshape(1).expand(batch)
        elif v.dim() == 1 and v.numel() == batch:
            t = v
        else:
            raise ValueError(f"{name} must be a number or a tensor of shape [] or [{batch}], got shape {tuple(v.shape)}")
        if not t.is_floating_point():
            t = t.to(torch.float32)
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but x is on {device}")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} must be finite")
        if bool((t < 0).any()):
            raise ValueError(f"{name} must be >= 0, got min {float(t.min())}")
        return t.to(dtype).contiguous()
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a number or a tensor, got {type(v).__name__}")
    v = float(v)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    if v < 0:
        raise ValueError(f"{name} must be >= 0, got {v}")
    return torch.full((batch,), v, device=device, dtype=dtype)


def _validate(x, grad, x0, step_size, eps, norm, direction, clamp):
    check_tensor(x, "x", ndim=range(1, 9))
    check_tensor(grad, "grad", ndim=x.dim(), dtypes=(x.dtype,))
    check_tensor(x0, "x0", ndim=x.dim(), dtypes=(x.dtype,))
    if grad.shape != x.shape:
        raise ValueError(f"grad must have the shape of x {tuple(x.shape)}, got {tuple(grad.shape)}")
    if x0.shape != x.shape:
        raise ValueError(f"x0 must have the shape of x {tuple(x.shape)}, got {tuple(x0.shape)}")
    check_same_device("x", x, "grad", grad)
    check_same_device("x", x, "x0", x0)
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if direction not in (1, -1):
        raise ValueError(f"direction must be +1 (ascent, attack) or -1 (descent, purification), got {direction!r}")
    if clamp is not None:
        if len(clamp) != 2:
            raise ValueError(f"clamp must be (min, max) or None, got {clamp!r}")
        lo, hi = float(clamp[0]), float(clamp[1])
        if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
            raise ValueError(f"clamp must be finite with min <= max, got {clamp!r}")
    cdtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    b = x.shape[0]
    step = _as_per_sample(step_size, "step_size", b, x.device, cdtype)
    eps_t = _as_per_sample(eps, "eps", b, x.device, cdtype)
    lo, hi = (-math.inf, math.inf) if clamp is None else (float(clamp[0]), float(clamp[1]))
    return step, eps_t, lo, hi


def pgd_step_reference(
    x: torch.Tensor,
    grad: torch.Tensor,
    x0: torch.Tensor,
    step_size: torch.Tensor,
    eps: torch.Tensor,
    norm: str,
    direction: int,
    clamp_min: float,
    clamp_max: float,
) -> torch.Tensor:
    """Plain PyTorch reference; ``step_size``/``eps`` are [B] tensors."""
    cdtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    b = x.shape[0]
    view = (b,) + (1,) * (x.dim() - 1)
    xf, gf, x0f = x.to(cdtype), grad.to(cdtype), x0.to(cdtype)
    step = step_size.to(cdtype).view(view)
    e = eps.to(cdtype).view(view)
    if norm == "linf":
        xn = xf + direction * step * torch.sign(gf)
        xn = torch.minimum(torch.maximum(xn, x0f - e), x0f + e)
    else:
        gnorm = gf.reshape(b, -1).norm(dim=1).view(view)
        xn = xf + direction * step * gf / gnorm.clamp_min(1e-12)
        delta = xn - x0f
        dnorm = delta.reshape(b, -1).norm(dim=1).view(view)
        factor = torch.where(dnorm > e, e / dnorm.clamp_min(1e-12), torch.ones_like(dnorm))
        xn = x0f + delta * factor
    xn = xn.clamp(clamp_min, clamp_max)
    return xn.to(x.dtype)


def _native_op(name: str):
    return getattr(torch.ops.maep_fast, name)


def pgd_step(
    x: torch.Tensor,
    grad: torch.Tensor,
    x0: torch.Tensor,
    step_size: float | torch.Tensor,
    eps: float | torch.Tensor,
    *,
    norm: str = "linf",
    direction: int = 1,
    clamp: tuple[float, float] | None = (0.0, 1.0),
    backend: str = "auto",
) -> torch.Tensor:
    """Out-of-place fused PGD step; returns a new tensor shaped like ``x``."""
    step, eps_t, lo, hi = _validate(x, grad, x0, step_size, eps, norm, direction, clamp)
    be = resolve_backend("pgd_step", backend, x.device)
    if be in ("cpp", "cuda"):  # one native op; the dispatcher picks the CPU or CUDA kernel
        return _native_op("pgd_step")(
            x.contiguous(), grad.contiguous(), x0.contiguous(), step, eps_t, norm, direction, lo, hi
        )
    if be == "triton":
        return torch.ops.maep_fast.pgd_step_triton(
            x.contiguous(), grad.contiguous(), x0.contiguous(), step, eps_t, norm, direction, lo, hi
        )
    return pgd_step_reference(x, grad, x0, step, eps_t, norm, direction, lo, hi)


def pgd_step_(
    x: torch.Tensor,
    grad: torch.Tensor,
    x0: torch.Tensor,
    step_size: float | torch.Tensor,
    eps: float | torch.Tensor,
    *,
    norm: str = "linf",
    direction: int = 1,
    clamp: tuple[float, float] | None = (0.0, 1.0),
    backend: str = "auto",
) -> torch.Tensor:
    """In-place variant for loops: updates and returns ``x``."""
    step, eps_t, lo, hi = _validate(x, grad, x0, step_size, eps, norm, direction, clamp)
    be = resolve_backend("pgd_step", backend, x.device)
    return _pgd_step_inplace_validated(x, grad, x0, step, eps_t, norm, direction, lo, hi, be)


def _pgd_step_inplace_validated(
    x: torch.Tensor,
    grad: torch.Tensor,
    x0: torch.Tensor,
    step: torch.Tensor,
    eps_t: torch.Tensor,
    norm: str,
    direction: int,
    lo: float,
    hi: float,
    be: str,
) -> torch.Tensor:
    """``pgd_step_`` after validation: ``step``/``eps_t`` are [B] tensors in the compute dtype
    (fp32, fp64 for fp64 ``x``) on ``x``'s device, ``be`` a resolved backend. No host sync, so
    it can be captured in a CUDA graph (``MAEPure(cuda_graph=True)`` validates once, outside)."""
    if be in ("cpp", "cuda") and x.is_contiguous():
        _native_op("pgd_step_")(x, grad.contiguous(), x0.contiguous(), step, eps_t, norm, direction, lo, hi)
        return x
    if be == "triton" and x.is_contiguous():
        torch.ops.maep_fast.pgd_step_triton_(x, grad.contiguous(), x0.contiguous(), step, eps_t, norm, direction, lo, hi)
        return x
    if be in ("cpp", "cuda"):
        out = _native_op("pgd_step")(
            x.contiguous(), grad.contiguous(), x0.contiguous(), step, eps_t, norm, direction, lo, hi
        )
    elif be == "triton":
        out = torch.ops.maep_fast.pgd_step_triton(
            x.contiguous(), grad.contiguous(), x0.contiguous(), step, eps_t, norm, direction, lo, hi
        )
    else:
        out = pgd_step_reference(x, grad, x0, step, eps_t, norm, direction, lo, hi)
    with torch.no_grad():
        x.copy_(out)
    return x


def _register_fakes() -> None:
    """Fake (meta) kernels so torch.compile can trace the native ops."""

    @torch.library.register_fake("maep_fast::pgd_step")
    def _pgd_step_fake(x, grad, x0, step_size, eps, norm, direction, clamp_min, clamp_max):
        return torch.empty_like(x)

    @torch.library.register_fake("maep_fast::pgd_step_")
    def _pgd_step_inplace_fake(x, grad, x0, step_size, eps, norm, direction, clamp_min, clamp_max):
        return None


if native_available():
    _register_fakes()


# ---------------------------------------------------------------- Triton backend
@torch.library.custom_op("maep_fast::pgd_step_triton", mutates_args=())
def _pgd_step_triton(
    x: torch.Tensor,
    grad: torch.Tensor,
    x0: torch.Tensor,
    step_size: torch.Tensor,
    eps: torch.Tensor,
    norm: str,
    direction: int,
    clamp_min: float,
    clamp_max: float,
) -> torch.Tensor:
    """Out-of-place fused step (contiguous inputs; step_size/eps: [B])."""
    from maep_fast.ops.triton_kernels.pgd_step import pgd_step_triton

    return pgd_step_triton(x, grad, x0, step_size, eps, norm, direction, clamp_min, clamp_max)


@_pgd_step_triton.register_fake
def _(x, grad, x0, step_size, eps, norm, direction, clamp_min, clamp_max):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("maep_fast::pgd_step_triton_", mutates_args=("x",))
def _pgd_step_triton_inplace(
    x: torch.Tensor,
    grad: torch.Tensor,
    x0: torch.Tensor,
    step_size: torch.Tensor,
    eps: torch.Tensor,
    norm: str,
    direction: int,
    clamp_min: float,
    clamp_max: float,
) -> None:
    """In-place fused step: writes x (contiguous)."""
    from maep_fast.ops.triton_kernels.pgd_step import pgd_step_triton

    pgd_step_triton(x, grad, x0, step_size, eps, norm, direction, clamp_min, clamp_max, out=x)


@_pgd_step_triton_inplace.register_fake
def _(x, grad, x0, step_size, eps, norm, direction, clamp_min, clamp_max):
    return None
