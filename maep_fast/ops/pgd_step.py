"""Fused projected-gradient step: ``pgd_step`` / ``pgd_step_``.

One update of PGD (attack, ``direction=+1``) or of test-time purification
(descent, ``direction=-1``)::

    L-inf:  x' = x + direction * step * sign(grad)
    L2:     x' = x + direction * step * grad / ||grad||_2      (per sample)
    then    x' = x0 + Proj_{||.|| <= eps}(x' - x0)                (per sample)
            x' = clamp(x', clamp_min, clamp_max)

Shapes: ``x``, ``grad``, ``x0``: [B, ...] (same shape and dtype). ``step_size``
and ``eps``: Python numbers (the loops' call: passed to the kernels as numbers,
nothing allocated) or tensors of shape [] or [B] (metadata checked only: their
values are never read on the host, so a CUDA step never synchronizes; a caller
passing tensors validates their values itself). Arithmetic is done
in fp32 (fp64 for fp64 inputs). A sample whose gradient is all zero does not
move before projection. ``norm``: 'linf' | 'l2'; ``clamp``: (min, max), finite,
or None. A wrong argument raises before any kernel runs, naming it (``TypeError``
for a wrong type or dtype, ``ValueError`` for a wrong shape, device or value);
``_validate`` checks this contract, ``check_pgd_step_args`` (csrc/pgd_step.h) is
the native side's own guard of it.

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
from typing import Optional

import torch

from maep_fast._checks import check_same_device, check_tensor
from maep_fast._native import native_available
from maep_fast.ops._dispatch import register_backends, resolve_backend
from maep_fast.ops._fastcall import eager

NORMS = ("linf", "l2")

register_backends("pgd_step", "cpp", "cuda")
register_backends("pgd_step", "triton")


def _per_sample_or_number(v: object, name: str, batch: int, device: torch.device, dtype: torch.dtype):
    """A Python float (checked here: finite, >= 0) or a [B] tensor in ``dtype`` on ``device``.

    CUDA tensors get metadata checks only: reading their values on the host would synchronize the
    stream on every step, so their values are the caller's (MAEPure and the attacks validate theirs
    once). CPU tensors are also checked for finite, non-negative values.
    """
    if isinstance(v, torch.Tensor):
        if v.dim() == 1 and v.shape[0] == batch:
            t = v
        elif v.numel() == 1 and v.dim() <= 1:
            t = v.reshape(1).expand(batch)
        else:
            raise ValueError(f"{name} must be a number or a tensor of shape [] or [{batch}], got shape {tuple(v.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but x is on {device}")
        if t.device.type == "cpu":  # reading CPU values costs no device synchronization
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name} must be finite")
            if bool((t < 0).any()):
                raise ValueError(f"{name} must be >= 0, got min {float(t.min())}")
        return t.to(dtype).contiguous()
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a number or a tensor, got {type(v).__name__}")
    v = float(v)
    if not (0.0 <= v < math.inf):  # also False for NaN
        raise ValueError(f"{name} must be finite and >= 0, got {v}")
    return v


_FLOATS = frozenset((torch.float16, torch.bfloat16, torch.float32, torch.float64))
_INF = math.inf


def _validate(x, grad, x0, step_size, eps, norm, direction, clamp, *, full: bool = False):
    """The contract's checks (module docstring), metadata only (no host sync): raise naming the
    argument, else return (step, eps, clamp_min, clamp_max) with step / eps each a float or a [B]
    tensor in the compute dtype (fp32; fp64 for fp64 ``x``).

    The common call (three same-shape float tensors on one device, float step / eps, a finite clamp)
    is recognised first by one expression; the named checks run for anything else (and for every
    call with ``full=True``)."""
    if (not full and type(step_size) is float and type(eps) is float
            and 0.0 <= step_size < _INF and 0.0 <= eps < _INF and (norm == "linf" or norm == "l2") and (direction == 1 or direction == -1)
            and isinstance(x, torch.Tensor) and isinstance(grad, torch.Tensor) and isinstance(x0, torch.Tensor)
            and x.dtype in _FLOATS and grad.dtype == x.dtype and x0.dtype == x.dtype
            and grad.shape == x.shape and x0.shape == x.shape and 0 < x.dim() < 9 and x.numel() > 0
            and type(clamp) is tuple and len(clamp) == 2):
        lo, hi = clamp
        if (type(lo) is float and type(hi) is float and -_INF < lo <= hi < _INF
                and grad.device == x.device and x0.device == x.device):
            return step_size, eps, lo, hi
    check_tensor(x, "x", ndim=range(1, 9))
    if not isinstance(grad, torch.Tensor) or grad.dtype != x.dtype or grad.shape != x.shape:
        check_tensor(grad, "grad", ndim=x.dim(), dtypes=(x.dtype,))
        raise ValueError(f"grad must have the shape of x {tuple(x.shape)}, got {tuple(grad.shape)}")
    if not isinstance(x0, torch.Tensor) or x0.dtype != x.dtype or x0.shape != x.shape:
        check_tensor(x0, "x0", ndim=x.dim(), dtypes=(x.dtype,))
        raise ValueError(f"x0 must have the shape of x {tuple(x.shape)}, got {tuple(x0.shape)}")
    device = x.device
    if grad.device != device:
        check_same_device("x", x, "grad", grad)
    if x0.device != device:
        check_same_device("x", x, "x0", x0)
    if norm != "linf" and norm != "l2":
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if direction != 1 and direction != -1:
        raise ValueError(f"direction must be +1 (ascent, attack) or -1 (descent, purification), got {direction!r}")
    if clamp is None:
        lo, hi = -math.inf, math.inf
    else:
        if len(clamp) != 2:
            raise ValueError(f"clamp must be (min, max) or None, got {clamp!r}")
        lo, hi = float(clamp[0]), float(clamp[1])
        if not (-math.inf < lo <= hi < math.inf):
            raise ValueError(f"clamp must be finite with min <= max, got {clamp!r}")
    cdtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    b = x.shape[0]
    step = _per_sample_or_number(step_size, "step_size", b, device, cdtype)
    eps_v = _per_sample_or_number(eps, "eps", b, device, cdtype)
    if isinstance(step, torch.Tensor) and not isinstance(eps_v, torch.Tensor):  # kernels take both or neither
        eps_v = torch.full((b,), eps_v, dtype=cdtype, device=device)
    elif isinstance(eps_v, torch.Tensor) and not isinstance(step, torch.Tensor):
        step = torch.full((b,), step, dtype=cdtype, device=device)
    return step, eps_v, lo, hi


def pgd_step_reference(
    x: torch.Tensor,
    grad: torch.Tensor,
    x0: torch.Tensor,
    step_size: float | torch.Tensor,
    eps: float | torch.Tensor,
    norm: str,
    direction: int,
    clamp_min: float,
    clamp_max: float,
) -> torch.Tensor:
    """Plain PyTorch reference; ``step_size``/``eps``: numbers or [B] tensors."""
    cdtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    b = x.shape[0]
    view = (b,) + (1,) * (x.dim() - 1)
    xf, gf, x0f = x.to(cdtype), grad.to(cdtype), x0.to(cdtype)
    step = step_size.to(cdtype).view(view) if isinstance(step_size, torch.Tensor) else float(step_size)
    # a number becomes a 0-d tensor by a device fill (torch.tensor(v, device=...) is a blocking host copy)
    e = eps.to(cdtype).view(view) if isinstance(eps, torch.Tensor) else torch.full((), float(eps), dtype=cdtype,
                                                                                      device=x.device)
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


_NATIVE: dict = {}


def _native(name: str, per_sample: bool):
    """The native op overload (``.default``: [B] tensors, ``.scalar``: numbers), looked up once."""
    key = (name, per_sample)
    op = _NATIVE.get(key)
    if op is None:
        packet = getattr(torch.ops.maep_fast, name)
        op = _NATIVE[key] = packet.default if per_sample else packet.scalar
    return op


def _run(x, grad, x0, step, eps_v, norm, direction, lo, hi, be) -> torch.Tensor:
    """Out-of-place step after validation (``be`` resolved)."""
    per_sample = isinstance(step, torch.Tensor)
    if be in ("cpp", "cuda"):  # one native op; the dispatcher picks the CPU or CUDA kernel
        return _native("pgd_step", per_sample)(
            x.contiguous(), grad.contiguous(), x0.contiguous(), step, eps_v, norm, direction, lo, hi)
    if be == "triton":
        st, et, sv, ev = (step, eps_v, 0.0, 0.0) if per_sample else (None, None, step, eps_v)
        return torch.ops.maep_fast.pgd_step_triton(
            x.contiguous(), grad.contiguous(), x0.contiguous(), st, et, sv, ev, norm, direction, lo, hi)
    return pgd_step_reference(x, grad, x0, step, eps_v, norm, direction, lo, hi)


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
    step, eps_v, lo, hi = _validate(x, grad, x0, step_size, eps, norm, direction, clamp)
    return _run(x, grad, x0, step, eps_v, norm, direction, lo, hi, resolve_backend("pgd_step", backend, x.device))


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
    step, eps_v, lo, hi = _validate(x, grad, x0, step_size, eps, norm, direction, clamp)
    be = resolve_backend("pgd_step", backend, x.device)
    return _pgd_step_inplace_validated(x, grad, x0, step, eps_v, norm, direction, lo, hi, be)


def _pgd_step_inplace_validated(
    x: torch.Tensor,
    grad: torch.Tensor,
    x0: torch.Tensor,
    step: float | torch.Tensor,
    eps_v: float | torch.Tensor,
    norm: str,
    direction: int,
    lo: float,
    hi: float,
    be: str,
) -> torch.Tensor:
    """``pgd_step_`` after validation: ``step``/``eps_v`` are both numbers or both [B] tensors in the
    compute dtype (fp32, fp64 for fp64 ``x``) on ``x``'s device, ``be`` a resolved backend. No host
    sync, so it can be captured in a CUDA graph (``MAEPure(cuda_graph=True)`` validates once, outside,
    and keeps its step / eps in device tensors it fills in place)."""
    if x.is_contiguous():
        if be in ("cpp", "cuda"):
            eager(_native("pgd_step_", isinstance(step, torch.Tensor)))(
                x, grad.contiguous(), x0.contiguous(), step, eps_v, norm, direction, lo, hi)
            return x
        if be == "triton":
            per_sample = isinstance(step, torch.Tensor)
            st, et, sv, ev = (step, eps_v, 0.0, 0.0) if per_sample else (None, None, step, eps_v)
            torch.ops.maep_fast.pgd_step_triton_(x, grad.contiguous(), x0.contiguous(), st, et, sv, ev, norm,
                                                 direction, lo, hi)
            return x
    out = _run(x, grad, x0, step, eps_v, norm, direction, lo, hi, be)
    with torch.no_grad():
        x.copy_(out)
    return x


def _register_fakes() -> None:
    """Fake (meta) kernels so torch.compile can trace the native ops: the out-of-place overloads
    (``.default``: [B] tensors, ``.scalar``: numbers) return a tensor like x, the in-place ones nothing."""

    def out_of_place(x, grad, x0, step_size, eps, norm, direction, clamp_min, clamp_max):
        return torch.empty_like(x)

    def in_place(x, grad, x0, step_size, eps, norm, direction, clamp_min, clamp_max):
        return None

    for overload in ("", ".scalar"):
        torch.library.register_fake("maep_fast::pgd_step" + overload)(out_of_place)
        torch.library.register_fake("maep_fast::pgd_step_" + overload)(in_place)


if native_available():
    _register_fakes()


# ---------------------------------------------------------------- Triton backend
# step_size_t / eps_t: [B] tensors, or None to use the numbers step_size / eps for every sample.
@torch.library.custom_op("maep_fast::pgd_step_triton", mutates_args=())
def _pgd_step_triton(
    x: torch.Tensor,
    grad: torch.Tensor,
    x0: torch.Tensor,
    step_size_t: Optional[torch.Tensor],
    eps_t: Optional[torch.Tensor],
    step_size: float,
    eps: float,
    norm: str,
    direction: int,
    clamp_min: float,
    clamp_max: float,
) -> torch.Tensor:
    """Out-of-place fused step (contiguous inputs)."""
    from maep_fast.ops.triton_kernels.pgd_step import pgd_step_triton

    return pgd_step_triton(x, grad, x0, step_size if step_size_t is None else step_size_t,
                           eps if eps_t is None else eps_t, norm, direction, clamp_min, clamp_max)


@_pgd_step_triton.register_fake
def _(x, grad, x0, step_size_t, eps_t, step_size, eps, norm, direction, clamp_min, clamp_max):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("maep_fast::pgd_step_triton_", mutates_args=("x",))
def _pgd_step_triton_inplace(
    x: torch.Tensor,
    grad: torch.Tensor,
    x0: torch.Tensor,
    step_size_t: Optional[torch.Tensor],
    eps_t: Optional[torch.Tensor],
    step_size: float,
    eps: float,
    norm: str,
    direction: int,
    clamp_min: float,
    clamp_max: float,
) -> None:
    """In-place fused step: writes x (contiguous)."""
    from maep_fast.ops.triton_kernels.pgd_step import pgd_step_triton

    pgd_step_triton(x, grad, x0, step_size if step_size_t is None else step_size_t, eps if eps_t is None else eps_t,
                    norm, direction, clamp_min, clamp_max, out=x)


@_pgd_step_triton_inplace.register_fake
def _(x, grad, x0, step_size_t, eps_t, step_size, eps, norm, direction, clamp_min, clamp_max):
    return None
