"""Triton backend of the fused PGD step against ``pgd_step_reference``.

Runs on CUDA tensors where a GPU exists, else on CPU tensors under the Triton
interpreter (TRITON_INTERPRET=1, set by conftest.py). L-inf is elementwise in
the reference's operation order: bitwise equal in fp32 and fp16 (the product
step * sign is exact, so an FMA cannot change the sum). L2 re-associates the
two per-sample norms (tree sums): rtol 1e-5 / atol 1e-6 in fp32 (the
interpreter is bitwise in practice), 1e-12 in fp64, design.md's rule in fp16
(max|fast - ref64| <= 2 * max|ref_fp16 - ref64| + eps(fp16)). bf16 runs only
on a GPU (the interpreter rounds fp32 -> bf16 by truncation).
"""
from __future__ import annotations

import math

import pytest
import torch
from pgd_inputs import assert_in_ball_and_range, make_pgd_inputs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import maep_fast.ops._dispatch as dispatch
from maep_fast.ops.pgd_step import pgd_step, pgd_step_, pgd_step_reference

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
_WHY = dispatch.unavailable_reason("pgd_step", "triton", torch.device(DEVICE))
pytestmark = [
    pytest.mark.skipif(bool(_WHY), reason=_WHY or "ok"),
    # the interpreter's runtime loop bounds (numpy 2.3): not ours
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning"),
]
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
LOWP = (torch.float16, torch.bfloat16)


def cdtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def make_inputs(shape, dtype=torch.float32, *, seed=None):
    x, g, x0, step, eps = make_pgd_inputs(shape, dtype, seed=seed)
    cd = cdtype(dtype)
    return x.to(DEVICE), g.to(DEVICE), x0.to(DEVICE), step.to(DEVICE, cd), eps.to(DEVICE, cd)


def reference(x, g, x0, step, eps, norm, direction, clamp):
    lo, hi = (-math.inf, math.inf) if clamp is None else clamp
    return pgd_step_reference(x, g, x0, step, eps, norm, direction, lo, hi)


def check(fast, x, g, x0, step, eps, norm, direction, clamp):
    dtype = x.dtype
    ref = reference(x, g, x0, step, eps, norm, direction, clamp)
    assert fast.dtype == dtype and fast.shape == x.shape
    assert not torch.isnan(fast).any(), "NaN in the output: unwritten or poisoned elements"
    if dtype in LOWP:
        ref64 = reference(x.double(), g.double(), x0.double(), step.double(), eps.double(), norm, direction, clamp)
        err_fast = (fast.double() - ref64).abs().max().item()
        err_ref = (ref.double() - ref64).abs().max().item()
        assert err_fast <= 2 * err_ref + torch.finfo(dtype).eps, (err_fast, err_ref)
        if norm == "linf" and dtype == torch.float16:
            assert torch.equal(fast, ref)
    elif norm == "linf":
        assert torch.equal(fast, ref)  # elementwise, same operation order
    elif dtype == torch.float64:
        torch.testing.assert_close(fast, ref, rtol=1e-12, atol=1e-12)
    else:
        torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-6)


SHAPES = [
    (1,),  # 1-D: one element per sample
    (13,),  # prime batch, 1-D
    (1, 1),
    (1, 7),  # B = 1
    (5, 13),  # primes
    (3, 31),  # 2^k - 1
    (2, 3, 15, 15),  # images with 2^k - 1 sides
    (7, 1, 3, 5),
    (2, 4097),
]


# ---------------------------------------------------------------- triton vs reference
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(shape, norm, dtype):
    x, g, x0, step, eps = make_inputs(shape, dtype)
    direction = -1 if (len(shape) + shape[0]) % 2 else 1
    clamp = None if shape[0] % 3 == 0 else (0.0, 1.0)
    out = pgd_step(x, g, x0, step, eps, norm=norm, direction=direction, clamp=clamp, backend="triton")
    check(out, x, g, x0, step, eps, norm, direction, clamp)

    # in place: x lives inside a NaN-filled buffer at an offset; the guards must stay NaN
    numel, pad = x.numel(), 37
    buf = torch.full((numel + 2 * pad,), float("nan"), dtype=dtype, device=DEVICE)
    xi = buf[pad:pad + numel].view(shape)
    xi.copy_(x)
    ret = pgd_step_(xi, g, x0, step, eps, norm=norm, direction=direction, clamp=clamp, backend="triton")
    assert ret.data_ptr() == xi.data_ptr()
    assert torch.isnan(buf[:pad]).all() and torch.isnan(buf[pad + numel:]).all(), "write outside x"
    assert torch.equal(xi, out)


@pytest.mark.parametrize("direction", [1, -1])
@pytest.mark.parametrize("clamp", [None, (0.1, 0.9), (0.0, 1.0)])
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_directions_clamps_scalar_and_per_sample(norm, clamp, direction):
    x, g, x0, step, eps = make_inputs((4, 3, 5, 5), torch.float32)
    for s, e in ((step, eps), (0.02, 0.03), (torch.tensor(0.02, device=DEVICE), eps), (step, torch.tensor([0.03], device=DEVICE))):
        out = pgd_step(x, g, x0, s, e, norm=norm, direction=direction, clamp=clamp, backend="triton")
        want = pgd_step(x, g, x0, s, e, norm=norm, direction=direction, clamp=clamp, backend="torch")
        if norm == "linf":
            assert torch.equal(out, want)
        else:
            torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)


def test_fp64_clamp_bounds_are_exact():
    # Python floats reach a Triton kernel as fp32; fp64 bounds are passed by pointer
    x, g, x0, step, eps = make_inputs((3, 50), torch.float64)
    for norm in ("linf", "l2"):
        out = pgd_step(x, g, x0, step * 20, eps * 20, norm=norm, clamp=(0.1, 0.7), backend="triton")
        assert out.min().item() == 0.1 and out.max().item() == 0.7
        check(out, x, g, x0, step * 20, eps * 20, norm, 1, (0.1, 0.7))


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("shape", [(3, 1000), (1, 3, 17, 19)])
def test_launcher_poisoned_out_and_multi_part_loops(shape, norm):
    # small blocks and few parts: several programs per sample and several loop iterations per program
    from maep_fast.ops.triton_kernels.pgd_step import pgd_step_triton

    x, g, x0, step, eps = make_inputs(shape, torch.float32)
    for block, parts in ((16, 4), (64, 3), (None, 256)):
        out = torch.full_like(x, float("nan"))
        pgd_step_triton(x, g, x0, step, eps, norm, -1, 0.0, 1.0, out=out, block=block, max_parts=parts)
        check(out, x, g, x0, step, eps, norm, -1, (0.0, 1.0))


@pytest.mark.parametrize("m", [4096, 4097])  # the last one-pass size, the first three-launch one
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_l2_one_pass_and_three_launch_paths_meet(m, dtype):
    from maep_fast.ops.triton_kernels import pgd_step as tk

    x, g, x0, step, eps = make_inputs((3, m), dtype)
    out = torch.full_like(x, float("nan"))
    tk.pgd_step_triton(x, g, x0, step, eps, "l2", -1, 0.0, 1.0, out=out)
    check(out, x, g, x0, step, eps, "l2", -1, (0.0, 1.0))
    assert (m <= tk.RESIDENT_MAX) == (m == 4096)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_nan_propagates_like_reference(norm):
    x, g, x0, step, eps = make_inputs((3, 17), torch.float32)
    x[0, 3] = float("nan")
    g[1, 5] = float("nan")
    out = pgd_step(x, g, x0, step, eps, norm=norm, backend="triton")
    want = pgd_step(x, g, x0, step, eps, norm=norm, backend="torch")
    assert torch.isnan(out).any()
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6, equal_nan=True)


@gpu
@needs_cuda
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("shape", [(5, 13), (2, 3, 15, 15), (1, 3, 224, 224), (64, 3, 32, 32)])
def test_bf16_and_large_gpu(shape, norm):
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        x, g, x0, step, eps = make_inputs(shape, dtype)
        out = pgd_step(x, g, x0, step, eps, norm=norm, direction=-1, backend="triton")
        check(out, x, g, x0, step, eps, norm, -1, (0.0, 1.0))
        xi = x.clone()
        pgd_step_(xi, g, x0, step, eps, norm=norm, direction=-1, backend="triton")
        assert torch.equal(xi, out)


# ---------------------------------------------------------------- properties
@st.composite
def pgd_cases(draw):
    return dict(
        b=draw(st.integers(1, 5)), n=draw(st.integers(1, 40)), seed=draw(st.integers(0, 2**31 - 1)),
        norm=draw(st.sampled_from(["linf", "l2"])), dtype=draw(st.sampled_from([torch.float32, torch.float64])),
        step=draw(st.one_of(st.just(0.0), st.floats(1e-3, 0.5))), eps=draw(st.one_of(st.just(0.0), st.floats(0.0, 0.5))),
        direction=draw(st.sampled_from([1, -1])), inplace=draw(st.booleans()),
    )


@settings(deadline=None, max_examples=15, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=pgd_cases())
def test_property_ball_range_and_reference(case):
    b, n, dtype, norm, eps = case["b"], case["n"], case["dtype"], case["norm"], case["eps"]
    gen = torch.Generator().manual_seed(case["seed"])
    x0 = torch.rand(b, n, generator=gen, dtype=dtype).to(DEVICE)
    x = torch.rand(b, n, generator=gen, dtype=dtype).to(DEVICE)  # anywhere in [0, 1], maybe outside the ball
    g = torch.randn(b, n, generator=gen, dtype=dtype).to(DEVICE)
    kw = dict(norm=norm, direction=case["direction"], clamp=(0.0, 1.0))
    if case["inplace"]:
        out = x.clone()
        pgd_step_(out, g, x0, case["step"], eps, backend="triton", **kw)
    else:
        out = pgd_step(x, g, x0, case["step"], eps, backend="triton", **kw)
    assert_in_ball_and_range(out, x0, eps, norm, dtype)
    want = pgd_step(x, g, x0, case["step"], eps, backend="torch", **kw)
    if norm == "linf":
        assert torch.equal(out, want)
    else:
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        torch.testing.assert_close(out, want, rtol=tol, atol=tol)


@settings(deadline=None, max_examples=15, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=pgd_cases())
def test_property_descent_opposes_gradient(case):
    b, n, norm, step = case["b"], case["n"], case["norm"], case["step"]
    gen = torch.Generator().manual_seed(case["seed"])
    x = torch.rand(b, n, generator=gen, dtype=case["dtype"]).to(DEVICE)
    g = torch.randn(b, n, generator=gen, dtype=case["dtype"]).to(DEVICE)
    out = pgd_step(x, g, x.clone(), step, 1e3, norm=norm, direction=-1, clamp=None, backend="triton")
    move = (out - x).double() * g.double()
    if step > 0:
        assert (move[g != 0] < 0).all() if norm == "linf" else (move <= 0).all()
    out = pgd_step(x, g, x, step, case["eps"], norm=norm, direction=-1, clamp=(0.0, 1.0), backend="triton")
    assert (((out - x).double() * g.double()) <= 0).all()


# ---------------------------------------------------------------- torch.library / torch.compile
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_opcheck(norm):
    x, g, x0, step, eps = make_inputs((3, 2, 5), torch.float32)
    # per-sample tensors, then Python floats (step_size_t / eps_t None)
    for tensors, floats in (((step, eps), (0.0, 0.0)), ((None, None), (0.02, 0.05))):
        args = (x, g, x0, *tensors, *floats, norm, -1, 0.0, 1.0)
        torch.library.opcheck(torch.ops.maep_fast.pgd_step_triton.default, args)
        torch.library.opcheck(torch.ops.maep_fast.pgd_step_triton_.default, (x.clone(),) + args[1:])


def test_torch_compile_fullgraph_matches_eager():
    import torch._dynamo

    def f(x, g, x0):
        y = pgd_step(x, g, x0, 0.01, 0.03, norm="l2", direction=-1, backend="triton")
        y = pgd_step(y, g, x0, 0.01, 0.03, norm="linf", direction=1, backend="triton") * 2.0
        z = y.clone()
        pgd_step_(z, g, x0, 0.02, 0.05, norm="l2", direction=1, clamp=None, backend="triton")
        return y, z

    x, g, x0, _, _ = make_inputs((4, 3, 7, 7), torch.float32)
    torch._dynamo.reset()
    try:
        got = torch.compile(f, fullgraph=True, backend="aot_eager")(x, g, x0)
    finally:
        torch._dynamo.reset()
    for a, e in zip(got, f(x, g, x0)):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


# ---------------------------------------------------------------- errors
def test_bad_inputs_raise_before_launch():
    x, g, x0, _, _ = make_inputs((2, 3, 4), torch.float32)
    with pytest.raises(ValueError, match="grad"):
        pgd_step(x, g[:, :2], x0, 0.01, 0.03, backend="triton")
    with pytest.raises(TypeError, match="x0"):
        pgd_step(x, g, x0.half(), 0.01, 0.03, backend="triton")
    with pytest.raises(ValueError, match="eps"):
        pgd_step(x, g, x0, 0.01, -0.03, backend="triton")
    with pytest.raises(ValueError, match="step_size"):
        pgd_step(x, g, x0, torch.tensor([0.01, 0.02, 0.03], device=DEVICE), 0.03, backend="triton")
    with pytest.raises(ValueError, match="norm"):
        pgd_step(x, g, x0, 0.01, 0.03, norm="l3", backend="triton")
    with pytest.raises(ValueError, match="direction"):
        pgd_step_(x, g, x0, 0.01, 0.03, direction=0, backend="triton")
