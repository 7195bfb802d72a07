"""Triton kernels of the fused PGD step (see ``maep_fast.ops.pgd_step``).

Semantics and operation order are those of ``pgd_step_reference``: load in
the storage dtype, compute in fp32 (fp64 for fp64 inputs), store once in the
storage dtype.

- L-inf: one elementwise launch over the flattened [B * M] tensor; the sample
  index of an element is ``offset // M`` (per-sample step/eps are gathered).
- L2, samples of <= RESIDENT_MAX elements: one program per sample keeps x, g, x0 in
  registers through both norms: one pass over memory (3 reads + 1 write).
- L2, larger samples: three launches over a [B, NPART] grid, each program owning a contiguous
  chunk of one sample: (1) partial sums of grad^2, (2) gradient norm (every
  program re-reduces the NPART partials of its sample, deterministically and
  identically), update and partial sums of (x' - x0)^2, (3) both norms,
  projection factor, x0 + delta * factor, clamp, store. Two global
  reductions with a data dependency need two grid-wide barriers, i.e. three
  launches; (3) recomputes x' from x, grad, x0 instead of storing an fp32
  scratch copy, which also makes the in-place form (out = x) safe: every
  element is read and then written by the same program.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
MAX_PARTS = 256  # partial sums per sample (L2), re-reduced by every program of the sample


@triton.jit
def _clip(x, lo, hi):
    """min(max(x, lo), hi), NaN-propagating like torch.maximum / torch.clamp."""
    x = tl.maximum(x, lo, propagate_nan=tl.PropagateNan.ALL)
    return tl.minimum(x, hi, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _clamp_bounds(bounds_ptr, lo, hi, BOUNDS_FROM_PTR: tl.constexpr):
    if BOUNDS_FROM_PTR:  # fp64: Python floats reach the kernel as fp32, so fp64 bounds come by pointer
        lo_v = tl.load(bounds_ptr)
        hi_v = tl.load(bounds_ptr + 1)
    else:
        lo_v = lo
        hi_v = hi
    return lo_v, hi_v


@triton.jit
def _per_sample(ptr, b, valid, value, CDT: tl.constexpr, FROM_PTR: tl.constexpr):
    """A per-sample scalar (step size or eps) of sample(s) ``b``: loaded from ``ptr`` ([B] tensor),
    or the launch argument ``value`` (a Python float: no tensor, no copy per call)."""
    if FROM_PTR:
        res = tl.load(ptr + b, mask=valid, other=0.0).to(CDT)
    else:
        res = tl.cast(value, CDT)
    return res


@triton.jit
def _load_x_g_x0(x_ptr, g_ptr, x0_ptr, offs, valid, CDT: tl.constexpr):
    """The iterate, its gradient and the ball centre at ``offs``, in the compute dtype."""
    x = tl.load(x_ptr + offs, mask=valid, other=0.0).to(CDT)
    g = tl.load(g_ptr + offs, mask=valid, other=0.0).to(CDT)
    x0 = tl.load(x0_ptr + offs, mask=valid, other=0.0).to(CDT)
    return x, g, x0


@triton.jit
def _pgd_linf_kernel(
    out_ptr, x_ptr, g_ptr, x0_ptr, step_ptr, eps_ptr, bounds_ptr,
    total, M, direction, lo, hi, step_val, eps_val,
    CDT: tl.constexpr, HAS_CLAMP: tl.constexpr, BOUNDS_FROM_PTR: tl.constexpr,
    STEP_PTR: tl.constexpr, EPS_PTR: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    valid = offs < total
    b = offs // M
    x, g, x0 = _load_x_g_x0(x_ptr, g_ptr, x0_ptr, offs, valid, CDT)
    s = _per_sample(step_ptr, b, valid, step_val, CDT, STEP_PTR)
    e = _per_sample(eps_ptr, b, valid, eps_val, CDT, EPS_PTR)
    sgn = tl.where(g > 0, 1.0, tl.where(g < 0, -1.0, 0.0)).to(CDT)  # (g > 0) - (g < 0): torch.sign(NaN) = 0 too
    xn = x + (direction * s) * sgn
    xn = _clip(xn, x0 - e, x0 + e)
    if HAS_CLAMP:
        lo_v, hi_v = _clamp_bounds(bounds_ptr, lo, hi, BOUNDS_FROM_PTR)
        xn = _clip(xn, lo_v, hi_v)
    tl.store(out_ptr + offs, xn.to(out_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _pgd_l2_gsq_kernel(gpart_ptr, g_ptr, M, CHUNK, ITERS, NPART, CDT: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    base = b * M
    start = part * CHUNK
    acc = tl.zeros([BLOCK], dtype=CDT)
    for i in range(0, ITERS):
        idx = start + i * BLOCK + tl.arange(0, BLOCK)
        valid = idx < M
        g = tl.load(g_ptr + base + idx, mask=valid, other=0.0).to(CDT)
        acc += g * g
    tl.store(gpart_ptr + b * NPART + part, tl.sum(acc, axis=0))


@triton.jit
def _sample_norm(part_ptr, b, NPART, CDT: tl.constexpr, PART_BLOCK: tl.constexpr):
    offs = tl.arange(0, PART_BLOCK)
    parts = tl.load(part_ptr + b * NPART + offs, mask=offs < NPART, other=0.0)
    total = tl.sum(parts, axis=0)
    if CDT == tl.float64:
        res = tl.sqrt(total)  # fp64 sqrt is IEEE-rounded
    else:
        res = tl.sqrt_rn(total)  # tl.sqrt may lower to sqrt.approx for fp32
    return res


@triton.jit
def _l2_grad_norm_and_step(gpart_ptr, step_ptr, step_val, b, NPART, direction, CDT: tl.constexpr,
                           PART_BLOCK: tl.constexpr, STEP_PTR: tl.constexpr):
    """Sample ``b``'s ||grad|| (floored at 1e-12, NaN kept) and its signed step size."""
    gnorm = tl.maximum(_sample_norm(gpart_ptr, b, NPART, CDT, PART_BLOCK), 1e-12, propagate_nan=tl.PropagateNan.ALL)
    return gnorm, direction * _per_sample(step_ptr, b, True, step_val, CDT, STEP_PTR)


@triton.jit
def _pgd_l2_update_kernel(
    dpart_ptr, x_ptr, g_ptr, x0_ptr, gpart_ptr, step_ptr,
    M, CHUNK, ITERS, NPART, direction, step_val,
    CDT: tl.constexpr, PART_BLOCK: tl.constexpr, STEP_PTR: tl.constexpr, BLOCK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    gnorm, s = _l2_grad_norm_and_step(gpart_ptr, step_ptr, step_val, b, NPART, direction, CDT, PART_BLOCK, STEP_PTR)
    base = b * M
    start = part * CHUNK
    acc = tl.zeros([BLOCK], dtype=CDT)
    for i in range(0, ITERS):
        idx = start + i * BLOCK + tl.arange(0, BLOCK)
        valid = idx < M
        x, g, x0 = _load_x_g_x0(x_ptr, g_ptr, x0_ptr, base + idx, valid, CDT)
        delta = (x + s * g / gnorm) - x0
        acc += delta * delta
    tl.store(dpart_ptr + b * NPART + part, tl.sum(acc, axis=0))


@triton.jit
def _pgd_l2_project_kernel(
    out_ptr, x_ptr, g_ptr, x0_ptr, gpart_ptr, dpart_ptr, step_ptr, eps_ptr, bounds_ptr,
    M, CHUNK, ITERS, NPART, direction, lo, hi, step_val, eps_val,
    CDT: tl.constexpr, HAS_CLAMP: tl.constexpr, BOUNDS_FROM_PTR: tl.constexpr,
    STEP_PTR: tl.constexpr, EPS_PTR: tl.constexpr, PART_BLOCK: tl.constexpr, BLOCK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    gnorm, s = _l2_grad_norm_and_step(gpart_ptr, step_ptr, step_val, b, NPART, direction, CDT, PART_BLOCK, STEP_PTR)
    dnorm = _sample_norm(dpart_ptr, b, NPART, CDT, PART_BLOCK)
    e = _per_sample(eps_ptr, b, True, eps_val, CDT, EPS_PTR)
    factor = tl.where(dnorm > e, e / tl.maximum(dnorm, 1e-12), 1.0).to(CDT)
    if HAS_CLAMP:
        lo_v, hi_v = _clamp_bounds(bounds_ptr, lo, hi, BOUNDS_FROM_PTR)
    base = b * M
    start = part * CHUNK
    for i in range(0, ITERS):
        idx = start + i * BLOCK + tl.arange(0, BLOCK)
        valid = idx < M
        x, g, x0 = _load_x_g_x0(x_ptr, g_ptr, x0_ptr, base + idx, valid, CDT)
        delta = (x + s * g / gnorm) - x0
        xn = x0 + delta * factor
        if HAS_CLAMP:
            xn = _clip(xn, lo_v, hi_v)
        tl.store(out_ptr + base + idx, xn.to(out_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _pgd_l2_resident_kernel(
    out_ptr, x_ptr, g_ptr, x0_ptr, step_ptr, eps_ptr, bounds_ptr,
    M, direction, lo, hi, step_val, eps_val,
    CDT: tl.constexpr, HAS_CLAMP: tl.constexpr, BOUNDS_FROM_PTR: tl.constexpr,
    STEP_PTR: tl.constexpr, EPS_PTR: tl.constexpr, BLOCK: tl.constexpr,
):
    """One program per sample of <= RESIDENT_MAX elements: x, g, x0 loaded once and kept in
    registers through both norms, the result stored once (one pass over memory)."""
    b = tl.program_id(0).to(tl.int64)
    idx = tl.arange(0, BLOCK)
    valid = idx < M
    base = b * M
    x, g, x0 = _load_x_g_x0(x_ptr, g_ptr, x0_ptr, base + idx, valid, CDT)
    gsq = tl.sum(g * g, axis=0)
    if CDT == tl.float64:
        gn = tl.sqrt(gsq)
    else:
        gn = tl.sqrt_rn(gsq)
    gnorm = tl.maximum(gn, 1e-12, propagate_nan=tl.PropagateNan.ALL)
    s = direction * _per_sample(step_ptr, b, True, step_val, CDT, STEP_PTR)
    delta = tl.where(valid, (x + s * g / gnorm) - x0, 0.0)
    dsq = tl.sum(delta * delta, axis=0)
    if CDT == tl.float64:
        dnorm = tl.sqrt(dsq)
    else:
        dnorm = tl.sqrt_rn(dsq)
    e = _per_sample(eps_ptr, b, True, eps_val, CDT, EPS_PTR)
    factor = tl.where(dnorm > e, e / tl.maximum(dnorm, 1e-12), 1.0).to(CDT)
    xn = x0 + delta * factor
    if HAS_CLAMP:
        lo_v, hi_v = _clamp_bounds(bounds_ptr, lo, hi, BOUNDS_FROM_PTR)
        xn = _clip(xn, lo_v, hi_v)
    tl.store(out_ptr + base + idx, xn.to(out_ptr.dtype.element_ty), mask=valid)


RESIDENT_MAX = 4096  # elements per sample the one-pass L2 kernel keeps in registers


def _block(n: int, gpu_block: int) -> int:
    if _INTERPRET:  # the interpreter's cost is per program: few, wide programs
        return max(16, min(triton.next_power_of_2(n), 1 << 14))
    return max(16, min(triton.next_power_of_2(n), gpu_block))


def _scalar_or_tensor(v, batch: int, cdtype: torch.dtype, device: torch.device):
    """(pointer argument, value argument, FROM_PTR) for a step size / eps that is a Python float or a
    [B] tensor. fp64 floats go by pointer: Triton passes Python floats to kernels as fp32."""
    if isinstance(v, torch.Tensor):
        return v.to(cdtype).contiguous(), 0.0, True
    if cdtype == torch.float64:
        return torch.full((batch,), float(v), dtype=cdtype, device=device), 0.0, True
    return None, float(v), False


def pgd_step_triton(
    x: torch.Tensor,
    grad: torch.Tensor,
    x0: torch.Tensor,
    step: torch.Tensor | float,
    eps: torch.Tensor | float,
    norm: str,
    direction: int,
    clamp_min: float,
    clamp_max: float,
    *,
    out: torch.Tensor | None = None,
    block: int | None = None,
    max_parts: int = MAX_PARTS,
) -> torch.Tensor:
    """Launch the fused step. ``x``, ``grad``, ``x0`` contiguous with one shape
    and dtype; ``step``/``eps``: Python floats (launch arguments, nothing allocated) or
    [B] tensors. ``out`` may be ``x``
    (in place) or a caller buffer (tests poison it with NaN); else allocated.
    ``block`` / ``max_parts`` are private test hooks (force the three-launch L2 path with several
    programs per sample and several loop iterations per program on small inputs)."""
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    b = x.shape[0]
    total = x.numel()
    m = total // b
    is64 = x.dtype == torch.float64
    cdt = tl.float64 if is64 else tl.float32
    cdtype = torch.float64 if is64 else torch.float32
    step_p, step_v, step_from_ptr = _scalar_or_tensor(step, b, cdtype, x.device)
    eps_p, eps_v, eps_from_ptr = _scalar_or_tensor(eps, b, cdtype, x.device)
    has_clamp = not (clamp_min == -math.inf and clamp_max == math.inf)
    bounds_from_ptr = has_clamp and is64
    if bounds_from_ptr:  # device fills, not torch.tensor([...]): no host-to-device copy (CUDA-graph capture)
        bounds = torch.full((2,), float(clamp_min), dtype=cdtype, device=x.device)
        bounds[1:].fill_(float(clamp_max))
    else:
        bounds = x
    step_p = x if step_p is None else step_p  # unused pointer argument (FROM_PTR is False)
    eps_p = x if eps_p is None else eps_p
    lo = float(clamp_min) if has_clamp else 0.0
    hi = float(clamp_max) if has_clamp else 0.0
    if norm == "linf":
        block = block or _block(total, 1024)
        grid = (triton.cdiv(total, block),)
        _pgd_linf_kernel[grid](
            out, x, grad, x0, step_p, eps_p, bounds, total, m, direction, lo, hi, step_v, eps_v,
            CDT=cdt, HAS_CLAMP=has_clamp, BOUNDS_FROM_PTR=bounds_from_ptr,
            STEP_PTR=step_from_ptr, EPS_PTR=eps_from_ptr, BLOCK=block, num_warps=4,
        )
        return out
    if block is None and max_parts == MAX_PARTS and m <= RESIDENT_MAX:
        rblock = max(16, triton.next_power_of_2(m))
        _pgd_l2_resident_kernel[(b,)](
            out, x, grad, x0, step_p, eps_p, bounds, m, direction, lo, hi, step_v, eps_v,
            CDT=cdt, HAS_CLAMP=has_clamp, BOUNDS_FROM_PTR=bounds_from_ptr,
            STEP_PTR=step_from_ptr, EPS_PTR=eps_from_ptr, BLOCK=rblock, num_warps=4 if rblock <= 1024 else 8,
        )
        return out
    block = block or _block(m, 1024)
    nblk = triton.cdiv(m, block)
    iters = triton.cdiv(nblk, max_parts)
    chunk = iters * block
    npart = triton.cdiv(m, chunk)
    part_block = max(2, triton.next_power_of_2(npart))
    gpart = torch.empty((b, npart), dtype=cdtype, device=x.device)
    dpart = torch.empty((b, npart), dtype=cdtype, device=x.device)
    grid = (b, npart)
    _pgd_l2_gsq_kernel[grid](gpart, grad, m, chunk, iters, npart, CDT=cdt, BLOCK=block, num_warps=4)
    _pgd_l2_update_kernel[grid](
        dpart, x, grad, x0, gpart, step_p, m, chunk, iters, npart, direction, step_v,
        CDT=cdt, PART_BLOCK=part_block, STEP_PTR=step_from_ptr, BLOCK=block, num_warps=4,
    )
    _pgd_l2_project_kernel[grid](
        out, x, grad, x0, gpart, dpart, step_p, eps_p, bounds, m, chunk, iters, npart, direction, lo, hi,
        step_v, eps_v, CDT=cdt, HAS_CLAMP=has_clamp, BOUNDS_FROM_PTR=bounds_from_ptr,
        STEP_PTR=step_from_ptr, EPS_PTR=eps_from_ptr, PART_BLOCK=part_block, BLOCK=block, num_warps=4,
    )
    return out
