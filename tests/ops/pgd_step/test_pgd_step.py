"""Tests of the fused PGD / purification step (maep_fast.ops.pgd_step).

(a) torch reference vs an independent numpy formula; (b) C++ CPU kernel
(backend="cpp") vs the reference, all dtypes, awkward shapes, NaN-guarded
in-place buffers; (c) hypothesis properties; (d) torch.library.opcheck;
(e) torch.compile(fullgraph=True) with the aot_eager backend (traces the op
through its fake kernel; inductor is skipped to keep this file fast on 2
cores); (f) argument validation; (g) backend="cpp" / "triton" requested where
it cannot run, and backend="cuda" reaching the native op. Non-contiguous inputs and
a zero gradient run on every fused backend (cpp, triton).
Tests that need maep_fast._C skip with the reason when it is not built.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pgd_inputs import assert_in_ball_and_range, make_pgd_inputs as make_inputs

import maep_fast.ops._dispatch as dispatch
from maep_fast import native_available
from maep_fast._native import native_unavailable_reason  # the reason has no public name
from maep_fast.ops.pgd_step import pgd_step, pgd_step_, pgd_step_reference

NATIVE = native_available()
needs_native = pytest.mark.skipif(
    not NATIVE, reason=f"native extension maep_fast._C is not built ({native_unavailable_reason()})"
)
BACKENDS = [pytest.param("torch"), pytest.param("cpp", marks=needs_native)]
HAS_CUDA = torch.cuda.is_available()
TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"  # on CPU machines triton runs under its interpreter
_TRITON_WHY = dispatch.unavailable_reason("pgd_step", "triton", torch.device(TRITON_DEVICE))
needs_triton = pytest.mark.skipif(bool(_TRITON_WHY), reason=_TRITON_WHY or "ok")
# the fused kernels, each on the tensors it takes
FAST_BACKENDS = [
    pytest.param("cpp", marks=needs_native),
    pytest.param("triton", marks=[needs_triton, pytest.mark.filterwarnings(
        "ignore:Conversion of an array with ndim > 0:DeprecationWarning")]),  # the interpreter's, not ours
]


def device_of(backend):
    return TRITON_DEVICE if backend == "triton" else "cpu"
LOWP = (torch.float16, torch.bfloat16)


# ---------------------------------------------------------------- helpers
def numpy_pgd(x, g, x0, step, eps, norm, direction, clamp):
    """Independent per-sample formula in float64 with plain loops."""
    b = x.shape[0]
    xs = x.double().reshape(b, -1).numpy()
    gs = g.double().reshape(b, -1).numpy()
    x0s = x0.double().reshape(b, -1).numpy()
    out = np.empty_like(xs)
    for i in range(b):
        s, e = float(step[i]), float(eps[i])
        if norm == "linf":
            xn = xs[i] + direction * s * np.sign(gs[i])
            xn = np.minimum(np.maximum(xn, x0s[i] - e), x0s[i] + e)
        else:
            gn = max(math.sqrt(float(np.sum(gs[i] ** 2))), 1e-12)
            xn = xs[i] + direction * s * gs[i] / gn
            d = xn - x0s[i]
            dn = math.sqrt(float(np.sum(d**2)))
            if dn > e:
                d = d * (e / dn)
            xn = x0s[i] + d
        if clamp is not None:
            xn = np.clip(xn, clamp[0], clamp[1])
        out[i] = xn
    return torch.from_numpy(out).reshape(x.shape)


def compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------- (a) reference vs numpy
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("direction", [1, -1])
@pytest.mark.parametrize("shape", [(1, 5), (4, 3, 5, 5), (6,), (3, 17)])
def test_reference_matches_numpy(shape, direction, norm, dtype):
    x, g, x0, step, eps = make_inputs(shape, dtype)
    cd = compute_dtype(dtype)
    want = numpy_pgd(x, g, x0, step.to(cd), eps.to(cd), norm, direction, None)
    got = pgd_step(x, g, x0, step.to(cd), eps.to(cd), norm=norm, direction=direction, clamp=None, backend="torch")
    ref = pgd_step_reference(x, g, x0, step.to(cd), eps.to(cd), norm, direction, -math.inf, math.inf)
    assert got.dtype == dtype and got.shape == x.shape
    assert torch.equal(got, ref)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


def test_reference_scalar_step_and_clamp_match_numpy():
    x, g, x0, _, _ = make_inputs((3, 2, 4, 4), torch.float64)
    got = pgd_step(x, g, x0, 0.02, 0.03, norm="l2", direction=-1, clamp=(0.1, 0.9), backend="torch")
    want = numpy_pgd(x, g, x0, [0.02] * 3, [0.03] * 3, "l2", -1, (0.1, 0.9))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- (b) cpp kernel vs reference
SHAPES = [
    (1,),  # 1-D input: one element per sample
    (13,),  # 1-D, prime batch
    (1, 1),
    (1, 7),  # B = 1
    (5, 13),  # primes
    (3, 31),  # 2^k - 1
    (2, 3, 15, 15),  # 4-D, 2^k - 1 sized images
    (7, 1, 3, 5),
    (3, 4097),
]


def _check_against_reference(fast, x, g, x0, step, eps, norm, direction, clamp):
    dtype = x.dtype
    cd = compute_dtype(dtype)
    lo, hi = (-math.inf, math.inf) if clamp is None else clamp
    ref = pgd_step_reference(x, g, x0, step.to(cd), eps.to(cd), norm, direction, lo, hi)
    assert fast.dtype == dtype and fast.shape == x.shape
    assert not torch.isnan(fast).any(), "NaN in the output: unwritten or poisoned elements"
    if dtype in LOWP:
        # design.md: max|fast - ref_fp64| <= 2 * max|ref_lowp - ref_fp64| + atol
        ref64 = pgd_step_reference(
            x.double(), g.double(), x0.double(), step.to(cd).double(), eps.to(cd).double(), norm, direction, lo, hi
        )
        err_fast = (fast.double() - ref64).abs().max().item()
        err_ref = (ref.double() - ref64).abs().max().item()
        atol = torch.finfo(dtype).eps
        assert err_fast <= 2 * err_ref + atol, (err_fast, err_ref)
    elif norm == "linf":
        assert torch.equal(fast, ref)  # elementwise, same operation order: bitwise equal
    elif dtype == torch.float64:
        torch.testing.assert_close(fast, ref, rtol=1e-12, atol=1e-12)
    else:
        torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-6)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("shape", SHAPES)
def test_cpp_matches_reference(shape, norm, dtype):
    x, g, x0, step, eps = make_inputs(shape, dtype)
    direction = -1 if (len(shape) + shape[0]) % 2 else 1
    cd = compute_dtype(dtype)
    clamp = None if shape[0] % 3 == 0 else (0.0, 1.0)
    # Poison the allocator: a freed NaN block of the output's size is likely reused.
    poison = torch.full(shape, float("nan"), dtype=dtype)
    del poison
    out = pgd_step(x, g, x0, step.to(cd), eps.to(cd), norm=norm, direction=direction, clamp=clamp, backend="cpp")
    _check_against_reference(out, x, g, x0, step, eps, norm, direction, clamp)

    # In-place: x lives inside a NaN-filled buffer at an offset; the guard
    # regions around it must stay NaN and x must equal the out-of-place result.
    numel, pad = x.numel(), 37
    buf = torch.full((numel + 2 * pad,), float("nan"), dtype=dtype)
    xi = buf[pad : pad + numel].view(shape)
    xi.copy_(x)
    ret = pgd_step_(xi, g, x0, step.to(cd), eps.to(cd), norm=norm, direction=direction, clamp=clamp, backend="cpp")
    assert ret.data_ptr() == xi.data_ptr()
    assert torch.isnan(buf[:pad]).all() and torch.isnan(buf[pad + numel :]).all(), "write outside x"
    assert torch.equal(xi, out)


@needs_native
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("shape", [(1, 3, 224, 224), (2, 150001)])
def test_cpp_large_samples(shape, norm):
    # B = 1 with a large sample takes the intra-sample parallel path (parallel
    # reductions for the L2 norms); B = 2 the per-sample path.
    x, g, x0, step, eps = make_inputs(shape, torch.float32, zero_grad_sample=False)
    out = pgd_step(x, g, x0, step.float(), eps.float(), norm=norm, direction=-1, backend="cpp")
    _check_against_reference(out, x, g, x0, step, eps, norm, -1, (0.0, 1.0))


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_noncontiguous_and_scalar_args(backend):
    dev = device_of(backend)
    x, g, x0, _, _ = (t.to(dev) for t in make_inputs((4, 6, 10), torch.float32))
    xt, gt, x0t = x.transpose(1, 2), g.transpose(1, 2), x0.transpose(1, 2)  # non-contiguous views
    for norm in ("linf", "l2"):
        got = pgd_step(xt, gt, x0t, 0.01, 0.02, norm=norm, backend=backend)
        ref = pgd_step(xt, gt, x0t, 0.01, 0.02, norm=norm, backend="torch")
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
        xi = xt.clone(memory_format=torch.preserve_format)
        assert not xi.is_contiguous()
        # a 0-d step and a one-element eps tensor stand for every sample
        pgd_step_(xi, gt, x0t, torch.tensor(0.01, device=dev), torch.tensor([0.02], device=dev), norm=norm,
                  backend=backend)
        torch.testing.assert_close(xi, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_zero_grad_does_not_move(backend):
    x, _, x0, _, _ = (t.to(device_of(backend)) for t in make_inputs((3, 20), torch.float32))
    g = torch.zeros_like(x)
    out = pgd_step(x, g, x0, 0.1, 10.0, norm="linf", clamp=None, backend=backend)
    assert torch.equal(out, x)
    out = pgd_step(x, g, x0, 0.1, 10.0, norm="l2", clamp=None, backend=backend)
    assert torch.equal(out, x0 + (x - x0))  # the reference's rounding: x0 + delta * 1


# ---------------------------------------------------------------- (c) properties
@st.composite
def pgd_cases(draw):
    b = draw(st.integers(1, 5))
    n = draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**31 - 1))
    norm = draw(st.sampled_from(["linf", "l2"]))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    step = draw(st.one_of(st.just(0.0), st.floats(1e-3, 0.5)))  # 0 or large enough to move x in fp32
    eps = draw(st.one_of(st.just(0.0), st.floats(0.0, 0.5)))
    return b, n, seed, norm, dtype, step, eps


@pytest.mark.parametrize("backend", BACKENDS)
@settings(deadline=None, max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=pgd_cases(), direction=st.sampled_from([1, -1]))
def test_property_ball_and_range(backend, case, direction):
    b, n, seed, norm, dtype, step, eps = case
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.rand(b, n, generator=gen, dtype=dtype)
    x = torch.rand(b, n, generator=gen, dtype=dtype)  # anywhere in [0, 1], maybe outside the ball
    g = torch.randn(b, n, generator=gen, dtype=dtype)
    out = pgd_step(x, g, x0, step, eps, norm=norm, direction=direction, clamp=(0.0, 1.0), backend=backend)
    assert_in_ball_and_range(out, x0, eps, norm, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(deadline=None, max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=pgd_cases())
def test_property_descent_opposes_gradient(backend, case):
    b, n, seed, norm, dtype, step, eps = case
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(b, n, generator=gen, dtype=dtype)
    g = torch.randn(b, n, generator=gen, dtype=dtype)
    # Not clipped (huge ball, no clamp): every coordinate with g != 0 moves against g.
    out = pgd_step(x, g, x.clone(), step, 1e3, norm=norm, direction=-1, clamp=None, backend=backend)
    move = (out - x).double() * g.double()
    if step > 0:
        assert (move[g != 0] < 0).all() if norm == "linf" else (move <= 0).all()
    # Purification from x0 = x with projection and clamp: never along the gradient.
    out = pgd_step(x, g, x, step, eps, norm=norm, direction=-1, clamp=(0.0, 1.0), backend=backend)
    assert (((out - x).double() * g.double()) <= 0).all()


# ---------------------------------------------------------------- (d) opcheck
@needs_native
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(norm, dtype):
    x, g, x0, step, eps = make_inputs((3, 2, 5), dtype)
    cd = compute_dtype(dtype)
    args = (x, g, x0, step.to(cd), eps.to(cd), norm, -1, 0.0, 1.0)
    torch.library.opcheck(torch.ops.maep_fast.pgd_step.default, args)
    torch.library.opcheck(torch.ops.maep_fast.pgd_step_.default, (x.clone(),) + args[1:])
    sargs = (x, g, x0, 0.02, 0.05, norm, -1, 0.0, 1.0)  # the .scalar overload: numbers, no tensors
    torch.library.opcheck(torch.ops.maep_fast.pgd_step.scalar, sargs)
    torch.library.opcheck(torch.ops.maep_fast.pgd_step_.scalar, (x.clone(),) + sargs[1:])


@needs_native
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("direction", [1, -1])
@pytest.mark.parametrize("shape", [(1, 5), (7, 3, 5, 5), (2, 33)])
def test_python_float_step_equals_the_per_sample_tensor_step(shape, direction, norm, dtype):
    """Floats reach the native ``.scalar`` overload; it must equal the [B]-tensor overload bit for bit
    (one number per sample is the same arithmetic), and numpy within the dtype's tolerance."""
    x, g, x0, _, _ = make_inputs(shape, dtype)
    cd = compute_dtype(dtype)
    b = shape[0]
    st, et = torch.full((b,), 3 / 255, dtype=cd), torch.full((b,), 5 / 255, dtype=cd)
    by_tensor = pgd_step(x, g, x0, st, et, norm=norm, direction=direction, backend="cpp")
    by_float = pgd_step(x, g, x0, 3 / 255, 5 / 255, norm=norm, direction=direction, backend="cpp")
    assert torch.equal(by_float, by_tensor)
    xi = x.clone()
    pgd_step_(xi, g, x0, 3 / 255, 5 / 255, norm=norm, direction=direction, backend="cpp")
    assert torch.equal(xi, by_tensor)
    ref = pgd_step(x, g, x0, 3 / 255, 5 / 255, norm=norm, direction=direction, backend="torch")
    tol = {torch.float64: 1e-12, torch.float32: 1e-6}.get(dtype, 1e-2)
    torch.testing.assert_close(by_float.double(), ref.double(), rtol=tol, atol=tol)


# ---------------------------------------------------------------- (e) torch.compile
@needs_native
def test_torch_compile_fullgraph_matches_eager():
    import torch._dynamo

    def f(x, g, x0):
        y = pgd_step(x, g, x0, 0.01, 0.03, norm="l2", direction=-1, backend="cpp")
        return pgd_step(y, g, x0, 0.01, 0.03, norm="linf", direction=1, backend="cpp") * 2.0

    x, g, x0, _, _ = make_inputs((4, 3, 7, 7), torch.float32)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
        got = compiled(x, g, x0)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(got, f(x, g, x0), rtol=0, atol=0)


# ---------------------------------------------------------------- (f) bad inputs
def _good():
    x, g, x0, _, _ = make_inputs((2, 3, 4), torch.float32)
    return x, g, x0


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs_raise_naming_argument(backend):
    x, g, x0 = _good()
    with pytest.raises(ValueError, match="grad"):
        pgd_step(x, g[:, :2], x0, 0.01, 0.03, backend=backend)
    with pytest.raises(TypeError, match="grad"):
        pgd_step(x, g.double(), x0, 0.01, 0.03, backend=backend)
    with pytest.raises(TypeError, match="x0"):
        pgd_step(x, g, x0.half(), 0.01, 0.03, backend=backend)
    with pytest.raises(ValueError, match="eps"):
        pgd_step(x, g, x0, 0.01, -0.03, backend=backend)
    with pytest.raises(ValueError, match="eps"):
        pgd_step(x, g, x0, 0.01, torch.tensor([0.1, -0.1]), backend=backend)
    with pytest.raises(ValueError, match="step_size"):
        pgd_step(x, g, x0, float("nan"), 0.03, backend=backend)
    with pytest.raises(ValueError, match="step_size"):
        pgd_step(x, g, x0, torch.tensor([0.01, 0.02, 0.03]), 0.03, backend=backend)
    with pytest.raises(TypeError, match="step_size"):
        pgd_step(x, g, x0, "0.01", 0.03, backend=backend)
    with pytest.raises(ValueError, match="norm"):
        pgd_step(x, g, x0, 0.01, 0.03, norm="l3", backend=backend)
    with pytest.raises(ValueError, match="direction"):
        pgd_step(x, g, x0, 0.01, 0.03, direction=0, backend=backend)
    with pytest.raises(ValueError, match="clamp"):
        pgd_step(x, g, x0, 0.01, 0.03, clamp=(1.0, 0.0), backend=backend)
    with pytest.raises(ValueError, match="x"):
        e = torch.empty(0, 3)
        pgd_step(e, e, e, 0.01, 0.03, backend=backend)
    with pytest.raises(TypeError, match="x"):
        pgd_step(x.long(), g.long(), x0.long(), 0.01, 0.03, backend=backend)
    with pytest.raises(ValueError, match="grad"):
        pgd_step_(x, g[:1], x0, 0.01, 0.03, backend=backend)


@needs_native
def test_native_op_checks_name_the_argument():
    op = torch.ops.maep_fast.pgd_step
    x, g, x0 = _good()
    s = torch.full((2,), 0.01)
    e = torch.full((2,), 0.03)
    ok = (x, g, x0, s, e, "linf", 1, 0.0, 1.0)
    op(*ok)
    bad = [
        ((x.transpose(1, 2).contiguous().transpose(1, 2),) + ok[1:], "x must be contiguous"),
        ((x, g.double()) + ok[2:], "grad must have the dtype"),
        ((x, g[:, :2].contiguous()) + ok[2:], "grad must have the shape"),
        ((x, g, x0[:1].contiguous()) + ok[3:], "x0 must have the shape"),
        ((x, g, x0, s[:1]) + ok[4:], "step_size must have shape"),
        ((x, g, x0, s, e.double()) + ok[5:], "eps must have dtype"),
        ((x, g, x0, s, e, "l3") + ok[6:], "norm must be"),
        ((x, g, x0, s, e, "l2", 0) + ok[7:], "direction"),
        ((x, g, x0, s, e, "l2", 1, 1.0, 0.0), "clamp_min"),
        ((x.long(), g.long(), x0.long()) + ok[3:], "x must have dtype"),
    ]
    for args, msg in bad:
        with pytest.raises(RuntimeError, match=msg):
            op(*args)
    with pytest.raises(RuntimeError, match="x must be contiguous"):
        torch.ops.maep_fast.pgd_step_(x.transpose(1, 2), g.transpose(1, 2), x0.transpose(1, 2), s, e, "l2", 1, 0.0, 1.0)


# ---------------------------------------------------------------- (g) a backend requested but unavailable
@pytest.mark.parametrize("backend, switched_off", [
    ("cpp", "native_available"),
    pytest.param("triton", "triton_interpreted", marks=[
        needs_triton, pytest.mark.skipif(HAS_CUDA, reason="CPU tensors: triton is available only through the interpreter")]),
])
def test_backend_requested_but_unavailable_raises(monkeypatch, backend, switched_off):
    monkeypatch.setattr(dispatch, switched_off, lambda: False)
    x, g, x0 = _good()
    with pytest.raises(RuntimeError, match=backend):
        pgd_step(x, g, x0, 0.01, 0.03, backend=backend)
    with pytest.raises(RuntimeError, match=backend):
        pgd_step_(x, g, x0, 0.01, 0.03, backend=backend)
    # auto falls back to what is available (the reference at least)
    torch.testing.assert_close(
        pgd_step(x, g, x0, 0.01, 0.03, backend="auto"), pgd_step(x, g, x0, 0.01, 0.03, backend="torch")
    )


@pytest.mark.parametrize("inplace", [False, True])
def test_cuda_backend_reaches_the_native_op(monkeypatch, inplace):
    """backend 'cuda' must call the native op (the dispatcher picks its CUDA kernel), never the reference."""
    import importlib

    mod = importlib.import_module("maep_fast.ops.pgd_step")  # the module (maep_fast.ops re-exports a function of that name)

    calls = []
    monkeypatch.setattr(mod, "resolve_backend", lambda op, backend, device: "cuda")

    class _Op:  # stands in for an OpOverload: called directly, or through its C++ entry ``_op``
        def __init__(self, name):
            self.name = name

        def __call__(self, x, *a):
            calls.append(self.name)
            return x.clone()

        @property
        def _op(self):
            return self

    monkeypatch.setattr(mod, "_native", lambda name, per_sample: _Op(name))
    monkeypatch.setattr(mod, "pgd_step_reference", lambda *a: pytest.fail("reference used for backend='cuda'"))
    x = torch.rand(2, 3)
    fn = mod.pgd_step_ if inplace else mod.pgd_step
    fn(x, torch.randn(2, 3), x.clone(), 0.1, 0.2, backend="cuda")
    assert calls == (["pgd_step_"] if inplace else ["pgd_step"])
