"""GPU backends ("cuda" = native kernels of maep_fast._C, "triton") of pgd_step / pgd_step_ against the
fp64 torch reference, on CUDA tensors (skipped without a CUDA device): linf / l2, scalar and
per-sample step and eps, both directions, every path of kernels/pgd_step.cu (packed or not, L2
one-pass or grouped, misaligned pointers), the native op called directly, "cuda" vs "triton".

Equivalence rule: op_helpers.assert_close_fp (design.md), TF32 off. Outputs are written into
allocator blocks poisoned with NaN first; every output must be finite.
"""
from __future__ import annotations

import importlib
import math

import pytest
import torch
from op_helpers import GPU_BACKENDS as BACKENDS
from op_helpers import GPU_DTYPES as DTYPES
from op_helpers import GPU_MODULE_MARKS, need, no_tf32, poison  # noqa: F401  (no_tf32: a fixture)
from op_helpers import assert_close_fp

pytestmark = GPU_MODULE_MARKS
DEV = torch.device("cuda")


PGD = "pgd_step"
PGD_SHAPES = [(1, 3, 31, 31), (5, 3, 32, 32), (7, 17), (2, 1, 15, 15)]


def pgd_inputs(shape, dtype, per_sample):
    b = shape[0]
    x0 = torch.rand(shape, device=DEV).to(dtype)
    x = (x0.float() + 0.03 * torch.randn(shape, device=DEV)).clamp(0, 1).to(dtype)
    g = torch.randn(shape, device=DEV).to(dtype)
    if per_sample:
        step = torch.rand(b, device=DEV) * 0.05 + 0.001
        eps = torch.rand(b, device=DEV) * 0.1 + 0.01
        eps[0] = 0.0  # a sample that may not move at all
    else:
        step, eps = 2.0 / 255.0, 8.0 / 255.0
    return x, g, x0, step, eps


def pgd_ref(x, g, x0, step, eps, norm, direction, dtype):
    from maep_fast.ops.pgd_step import pgd_step_reference

    b = x.shape[0]
    cd = torch.float64 if dtype == torch.float64 else torch.float32

    def per(v):
        # a Python float reaches the kernels unrounded (fp64 math for fp64 x), a tensor in its own dtype
        return v.to(cd) if isinstance(v, torch.Tensor) else torch.full((b,), v, device=DEV, dtype=cd)

    return pgd_step_reference(x.to(dtype), g.to(dtype), x0.to(dtype), per(step), per(eps), norm, direction, 0.0, 1.0)


# Every path of kernels/pgd_step.cu: packed (size % pack == 0, aligned) or not; L2 one-pass
# (<= 4096 elements per sample) or the three-kernel grouped path (4097+, and 3x224x224); and an
# input offset by one element, so its pointer is not 16-byte aligned (the unpacked fallback).
PGD_PATH_SHAPES = [(5, 4096), (3, 4095), (2, 4097), (4, 8200), (2, 3, 224, 224), (9, 3, 7, 7)]


@pytest.mark.parametrize("dtype", DTYPES + (torch.float64,), ids=str)
@pytest.mark.parametrize("norm", ("linf", "l2"))
@pytest.mark.parametrize("shape", PGD_PATH_SHAPES, ids=str)
@pytest.mark.parametrize("offset", (0, 1))
def test_pgd_cuda_kernel_paths(shape, norm, dtype, offset):
    need(PGD, "cuda")
    from maep_fast.ops.pgd_step import pgd_step, pgd_step_

    x, x0 = (torch.rand(shape, device=DEV).to(dtype) for _ in range(2))
    g = (torch.rand(shape, device=DEV) - 0.5).to(dtype)
    if offset:  # data pointers one element past a 16-byte boundary: the unpacked fallback
        x, g, x0 = (_misaligned(t) for t in (x, g, x0))
    step, eps = (3 / 255, 0.5) if norm == "l2" else (2 / 255, 8 / 255)
    r64 = pgd_ref(x, g, x0, step, eps, norm, -1, torch.float64)
    rlp = pgd_ref(x, g, x0, step, eps, norm, -1, dtype)
    out = pgd_step(x, g, x0, step, eps, norm=norm, direction=-1, backend="cuda")
    assert_close_fp(out, r64, rlp, dtype, f"cuda pgd {shape} {dtype} {norm} offset={offset}")
    xi = x.clone() if offset == 0 else _misaligned(x)
    pgd_step_(xi, g, x0, step, eps, norm=norm, direction=-1, backend="cuda")
    torch.testing.assert_close(xi, out, rtol=0, atol=0)


def _misaligned(t):
    """A contiguous copy of ``t`` whose data pointer is one element past a 16-byte boundary."""
    buf = torch.empty(t.numel() + 1, device=t.device, dtype=t.dtype)
    out = buf[1:].view(t.shape)
    out.copy_(t)
    assert out.data_ptr() % 16 != 0
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norm", ("linf", "l2"))
@pytest.mark.parametrize("direction", (1, -1))
@pytest.mark.parametrize("per_sample", (False, True), ids=("scalar", "per_sample"))
def test_pgd_vs_fp64_reference(backend, dtype, norm, direction, per_sample):
    need(PGD, backend)
    from maep_fast.ops.pgd_step import pgd_step, pgd_step_

    shape = PGD_SHAPES[(DTYPES.index(dtype) + 2 * int(per_sample) + (norm == "l2")) % len(PGD_SHAPES)]
    x, g, x0, step, eps = pgd_inputs(shape, dtype, per_sample)
    r64 = pgd_ref(x, g, x0, step, eps, norm, direction, torch.float64)
    rlp = pgd_ref(x, g, x0, step, eps, norm, direction, dtype)
    what = f"{backend} {shape} {dtype} {norm} dir={direction} per_sample={per_sample}"
    x_before = x.clone()
    poison(4 * x.numel())
    out = pgd_step(x, g, x0, step, eps, norm=norm, direction=direction, backend=backend)
    assert torch.equal(x, x_before), "out-of-place pgd_step modified x"
    assert_close_fp(out, r64, rlp, dtype, what)
    xi = x.clone()
    ret = pgd_step_(xi, g, x0, step, eps, norm=norm, direction=direction, backend=backend)
    assert ret is xi
    assert_close_fp(xi, r64, rlp, dtype, "in-place " + what)
    torch.testing.assert_close(xi, out, rtol=0, atol=0, msg="pgd_step_ differs from pgd_step")
    # projection and clamp hold (up to the storage dtype's rounding)
    tol = 1e-6 if dtype == torch.float32 else torch.finfo(dtype).eps
    assert out.min().item() >= 0 and out.max().item() <= 1
    e = eps if isinstance(eps, torch.Tensor) else torch.full((shape[0],), eps, device=DEV)
    d = (out.double() - x0.double()).reshape(shape[0], -1)
    size = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
    slack = tol * (1 if norm == "linf" else math.sqrt(d.shape[1])) * 2
    assert torch.all(size <= e.double() + slack), what
    if backend == "cuda":  # the native op itself, whatever the Python dispatch does
        stp = step if isinstance(step, torch.Tensor) else torch.full((shape[0],), step, device=DEV)
        ep = eps if isinstance(eps, torch.Tensor) else torch.full((shape[0],), eps, device=DEV)
        nat = torch.ops.maep_fast.pgd_step(x, g, x0, stp.float(), ep.float(), norm, direction, 0.0, 1.0)
        assert_close_fp(nat, r64, rlp, dtype, "torch.ops.maep_fast.pgd_step " + what)
        xn = x.clone()
        torch.ops.maep_fast.pgd_step_(xn, g, x0, stp.float(), ep.float(), norm, direction, 0.0, 1.0)
        torch.testing.assert_close(xn, nat, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norm", ("linf", "l2"))
def test_pgd_cuda_vs_triton(dtype, norm):
    need(PGD, "cuda")
    need(PGD, "triton")
    from maep_fast.ops.pgd_step import pgd_step

    x, g, x0, step, eps = pgd_inputs((5, 3, 32, 32), dtype, True)
    a = torch.ops.maep_fast.pgd_step(x, g, x0, step, eps, norm, -1, 0.0, 1.0)  # the native kernel itself
    b = pgd_step(x, g, x0, step, eps, norm=norm, direction=-1, backend="triton")
    # same fp32 arithmetic; only the L2 norms' summation order differs
    atol = (1e-6 if norm == "linf" else 2e-6) if dtype == torch.float32 else torch.finfo(dtype).eps
    torch.testing.assert_close(a, b, rtol=0, atol=atol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_explicit_backend_does_not_run_reference(monkeypatch, backend):
    """An explicitly requested backend runs its kernels, not the torch reference."""
    need(PGD, backend)
    mod = importlib.import_module("maep_fast.ops.pgd_step")  # the module (maep_fast.ops re-exports the function)
    monkeypatch.setattr(mod, "pgd_step_reference", lambda *a, **k: pytest.fail(f"backend={backend!r} ran the reference"))
    x, g, x0, step, eps = pgd_inputs((3, 3, 8, 8), torch.float32, True)
    for norm in ("linf", "l2"):
        out = mod.pgd_step(x, g, x0, step, eps, norm=norm, backend=backend)
        xi = x.clone()
        mod.pgd_step_(xi, g, x0, step, eps, norm=norm, backend=backend)
        torch.cuda.synchronize()
        assert torch.isfinite(out).all() and torch.equal(xi, out), norm
