"""Tests of the native (C++ CPU) masked-patch attention ops:
maep_fast::masked_patch_attention (public, differentiable), and
masked_patch_attention_fwd -> (out, lse) / masked_patch_attention_bwd -> (dq, dk, dv).

Compared with the fp64 torch reference
(maep_fast.ops.masked_patch_attention.masked_patch_attention_reference) under
design.md's equivalence rule: fp64 1e-12; fp32 allclose(rtol 1e-5, atol 1e-6)
(else 2x / 3x the fp32 reference's own error + 1e-6 * (1 + max|ref|), and for
gradients + 1e-5 * (1 + max gradient magnitude), see check_case and op_helpers.assert_close_fp);
fp16/bf16 max|fast - ref64| <= 2 * max|ref_lowp - ref64| + atol (3x for
gradients), atol = eps(dtype) * (1 + max|ref64|). Covered: L in {1, 7, 17, 65}
(+ 600: several key blocks), D in {16, 24, 48, 64}, B/H in {1, 2, 3, 5}, keep
patterns (None, all, one, ragged, an empty sample), exact zeros for hidden
query rows (out, dq) and hidden keys (dk, dv), all outputs finite after
poisoning the allocator with NaN, lse, hypothesis, opcheck of the three ops,
torch.compile(fullgraph=True, backend="aot_eager"), fp64 gradcheck, argument
errors naming the argument. Skips (with the reason) when maep_fast._C is not built.
"""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from op_helpers import amax, assert_close_fp, make_keep, make_qkv

from maep_fast import native_available
from maep_fast._native import native_unavailable_reason  # the reason has no public name
from maep_fast.ops.masked_patch_attention import masked_patch_attention_reference

NATIVE = native_available() and hasattr(torch.ops.maep_fast, "masked_patch_attention_fwd")
pytestmark = pytest.mark.skipif(
    not NATIVE,
    reason=f"native extension maep_fast._C with masked_patch_attention is not built ({native_unavailable_reason()})",
)
if NATIVE:
    import maep_fast.ops  # noqa: F401  (registers the native ops' fakes and autograd)

KEEPS = ("none", "all", "one", "ragged", "empty_sample")
LS = (1, 7, 17, 65)
DS = (16, 24, 48, 64)


def mpa(*args):
    return torch.ops.maep_fast.masked_patch_attention(*args)


def keep_mask(kind, b, length, gen=None):
    return make_keep(kind, b, length, gen=gen, density=0.5, one_at=length // 2)


def qkv(shape, dtype, gen=None):
    return make_qkv(shape, dtype, gen=gen, draw_dtype=torch.float64)


def ref_and_grads(q, k, v, keep, scale, go, dtype=torch.float64):
    leaves = [t.detach().to(dtype).requires_grad_(True) for t in (q, k, v)]
    out = masked_patch_attention_reference(*leaves, keep, scale)
    grads = torch.autograd.grad(out, leaves, go.to(dtype))
    return (out.detach(),) + tuple(grads)


def native_and_grads(q, k, v, keep, scale, go):
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    poison = torch.full((4 * q.numel(),), float("nan"), dtype=q.dtype)
    del poison  # a freed NaN block is likely reused by the outputs
    out = mpa(*leaves, keep, scale)
    grads = torch.autograd.grad(out, leaves, go.to(q.dtype))
    return (out.detach(),) + tuple(grads)


def check_case(shape, dtype, keep_kind, gen=None, scale=None):
    b, h, length, d = shape
    q, k, v = qkv(shape, dtype, gen)
    keep = keep_mask(keep_kind, b, length, gen)
    scale = d**-0.5 if scale is None else scale
    go = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    r64 = ref_and_grads(q, k, v, keep, scale, go)
    rlp = ref_and_grads(q, k, v, keep, scale, go, dtype=dtype) if dtype != torch.float64 else r64
    fast = native_and_grads(q, k, v, keep, scale, go)
    tag = f"{shape} {dtype} keep={keep_kind}"
    # fp32 gradients: the flash-style backward forms dS = P * (dP - Delta), Delta = rowsum(dO * O), a
    # difference of O(|dO| |V|) terms, so its absolute error scales with the gradients' magnitude
    # (gmag = max over dq, dk, dv) even where the exact gradient is 0 (dq at L = 1)
    gmag = max(amax(t) for t in r64[1:])
    for name, f, r, lp, kk in zip(("out", "dq", "dk", "dv"), fast, r64, rlp, (2, 3, 3, 3)):
        assert_close_fp(f, r, lp, dtype, f"{name} {tag}", kk, fp32_atol=None if name == "out" else 1e-5 * (1 + gmag))
    if keep is not None:
        hidden = ~keep  # [B, L]
        out, dq, dk, dv = fast
        for t in (out, dq, dk, dv):
            assert (t.transpose(1, 2)[hidden] == 0).all(), "hidden rows must be exact zeros"
    return fast


# ---------------------------------------------------------------- vs the fp64 reference
@pytest.mark.parametrize("keep_kind", KEEPS)
@pytest.mark.parametrize("d", DS)
@pytest.mark.parametrize("length", LS)
def test_matches_fp64_reference_fp32(length, d, keep_kind):
    i = LS.index(length) + DS.index(d) + KEEPS.index(keep_kind)
    b, h = [(1, 1), (2, 3), (3, 2), (5, 1)][i % 4]
    check_case((b, h, length, d), torch.float32, keep_kind)


@pytest.mark.parametrize("keep_kind", KEEPS)
@pytest.mark.parametrize("length", LS)
def test_matches_fp64_reference_fp64(length, keep_kind):
    i = LS.index(length) + KEEPS.index(keep_kind)
    b, h = [(1, 1), (2, 3), (3, 2), (5, 1)][i % 4]
    check_case((b, h, length, DS[i % len(DS)]), torch.float64, keep_kind)


def test_vit_tiny_shape_and_custom_scale():
    gen = torch.Generator().manual_seed(5)
    check_case((2, 3, 65, 64), torch.float32, "ragged", gen)
    check_case((2, 2, 17, 24), torch.float32, "ragged", gen, scale=0.37)


def test_several_key_blocks():
    # 600 visible keys > the 512-key block: exercises the online-softmax rescaling
    gen = torch.Generator().manual_seed(6)
    check_case((1, 1, 600, 16), torch.float32, "none", gen)
    check_case((1, 1, 530, 8), torch.float64, "all", gen)


def test_lse_output():
    gen = torch.Generator().manual_seed(7)
    q, k, v = qkv((2, 3, 17, 24), torch.float32, gen)
    keep = keep_mask("ragged", 2, 17, gen)
    out, lse = torch.ops.maep_fast.masked_patch_attention_fwd(q, k, v, keep, 0.25)
    assert lse.dtype == torch.float32 and lse.shape == (2, 3, 17)
    s = torch.matmul(q.double(), k.double().transpose(-2, -1)) * 0.25
    s = s.masked_fill(~keep[:, None, None, :], float("-inf"))
    want = torch.logsumexp(s, dim=-1)
    vis = keep[:, None, :].expand(2, 3, 17)
    torch.testing.assert_close(lse[vis].double(), want[vis], rtol=1e-5, atol=1e-5)
    assert (lse[~vis] == 0).all()


# ---------------------------------------------------------------- fp16 / bf16
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("keep_kind", ["none", "ragged", "empty_sample"])
@pytest.mark.parametrize("shape", [(2, 3, 17, 24), (1, 2, 65, 64), (3, 1, 7, 48)])
def test_low_precision(dtype, keep_kind, shape):
    check_case(shape, dtype, keep_kind, torch.Generator().manual_seed(11))


# ---------------------------------------------------------------- hypothesis
@st.composite
def cases(draw):
    shape = (
        draw(st.integers(1, 3)),
        draw(st.integers(1, 3)),
        draw(st.sampled_from([1, 2, 3, 7, 15, 17, 31, 65])),
        draw(st.sampled_from([1, 3, 16, 24, 48, 64])),
    )
    return (
        shape,
        draw(st.sampled_from([torch.float32, torch.float64])),
        draw(st.sampled_from(KEEPS)),
        draw(st.floats(0.05, 1.0)),
        draw(st.integers(0, 2**31 - 1)),
    )


@settings(deadline=None, max_examples=10, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=cases())
@example(case=((1, 1, 1, 16), torch.float32, "none", 1.0, 1))  # L = 1: exact-zero dq, fp32 cancellation bound
def test_property_matches_reference(case):
    shape, dtype, keep_kind, scale, seed = case
    check_case(shape, dtype, keep_kind, torch.Generator().manual_seed(seed), scale=scale)


# ---------------------------------------------------------------- opcheck, compile, gradcheck
@pytest.mark.parametrize("keep_kind", ["none", "empty_sample"])
def test_opcheck(keep_kind):
    q, k, v = [t.requires_grad_(True) for t in qkv((2, 3, 7, 16), torch.float32)]
    keep = keep_mask(keep_kind, 2, 7)
    torch.library.opcheck(torch.ops.maep_fast.masked_patch_attention_fwd.default, (q, k, v, keep, 0.25))
    torch.library.opcheck(torch.ops.maep_fast.masked_patch_attention.default, (q, k, v, keep, 0.25))
    out, lse = torch.ops.maep_fast.masked_patch_attention_fwd(q.detach(), k.detach(), v.detach(), keep, 0.25)
    go = torch.randn_like(out)
    torch.library.opcheck(
        torch.ops.maep_fast.masked_patch_attention_bwd.default,
        (go, q.detach(), k.detach(), v.detach(), out, lse, keep, 0.25),
    )


def test_torch_compile_fullgraph():
    import torch._dynamo

    def f(q, k, v, keep):
        a = torch.ops.maep_fast.masked_patch_attention(q, k, v, keep, 0.25)
        return torch.ops.maep_fast.masked_patch_attention(a, k, v, None, 0.5).square().sum()

    q, k, v = qkv((2, 3, 17, 16), torch.float32)
    keep = keep_mask("ragged", 2, 17)
    l1 = [t.clone().requires_grad_(True) for t in (q, k, v)]
    l2 = [t.clone().requires_grad_(True) for t in (q, k, v)]
    torch._dynamo.reset()
    try:
        got = torch.compile(f, fullgraph=True, backend="aot_eager")(*l1, keep)
        got.backward()
    finally:
        torch._dynamo.reset()
    want = f(*l2, keep)
    want.backward()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for a, b in zip(l1, l2):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)


@pytest.mark.parametrize("keep_kind", ["none", "ragged", "empty_sample"])
def test_gradcheck_fp64(keep_kind):
    q, k, v = [t.requires_grad_(True) for t in qkv((2, 2, 7, 5), torch.float64)]
    keep = keep_mask(keep_kind, 2, 7)
    assert torch.autograd.gradcheck(lambda a, b, c: mpa(a, b, c, keep, 0.4), (q, k, v))


def test_loop_gemm_fallback_without_blas():
    # MAEP_FAST_CPU_NO_BLAS=1: the plain loop GEMM used where torch exports no sgemm_/dgemm_
    import subprocess
    import sys

    code = (
        "import torch, maep_fast; assert maep_fast.native_available()\n"
        "import maep_fast.ops\n"
        "from maep_fast.ops.masked_patch_attention import masked_patch_attention_reference as ref\n"
        "torch.manual_seed(0)\n"
        "for dt, tol in ((torch.float32, 1e-5), (torch.float64, 1e-12)):\n"
        "    q, k, v = [torch.randn(2, 3, 17, 24, dtype=dt, requires_grad=True) for _ in range(3)]\n"
        "    keep = torch.rand(2, 17) < 0.5; keep[:, 0] = True\n"
        "    o = torch.ops.maep_fast.masked_patch_attention(q, k, v, keep, 0.3)\n"
        "    r = ref(q.double(), k.double(), v.double(), keep, 0.3)\n"
        "    go = torch.randn_like(r)\n"
        "    g = torch.autograd.grad(o, [q, k, v], go.to(dt))\n"
        "    gr = torch.autograd.grad(r, [q, k, v], go)\n"
        "    for a, b in zip((o,) + g, (r,) + gr):\n"
        "        torch.testing.assert_close(a.double(), b.detach().double(), rtol=tol, atol=10 * tol)\n"
        "print('ok')\n"
    )
    env = dict(os.environ, MAEP_FAST_CPU_NO_BLAS="1", OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


# ---------------------------------------------------------------- argument errors
def test_bad_arguments_name_the_argument():
    q, k, v = qkv((2, 3, 7, 16), torch.float32)
    keep = torch.ones(2, 7, dtype=torch.bool)
    fwd = torch.ops.maep_fast.masked_patch_attention_fwd
    fwd(q, k, v, keep, 0.25)
    bad = [
        ((q, k.double(), v, keep, 0.25), "k must have the dtype of q"),
        ((q, k, v.half(), keep, 0.25), "v must have the dtype of q"),
        ((q, k[:, :2], v, keep, 0.25), "k must have the shape of q"),
        ((q, k, v[..., :8], keep, 0.25), "v must have the shape of q"),
        ((q[0], k[0], v[0], keep, 0.25), "q must have rank 4"),
        ((q.long(), k.long(), v.long(), keep, 0.25), "q must have dtype"),
        ((q, k, v, keep.float(), 0.25), "keep must have dtype bool"),
        ((q, k, v, keep[:, :5], 0.25), "keep must have shape"),
        ((q, k, v, keep, 0.0), "scale must be a positive"),
        ((q, k, v, keep, float("nan")), "scale must be a positive"),
    ]
    for args, msg in bad:
        with pytest.raises(RuntimeError, match=msg):
            fwd(*args)
        with pytest.raises(RuntimeError, match=msg):
            mpa(*args)
    out, lse = fwd(q, k, v, keep, 0.25)
    bwd = torch.ops.maep_fast.masked_patch_attention_bwd
    with pytest.raises(RuntimeError, match="lse must have dtype"):
        bwd(out, q, k, v, out, lse.double(), keep, 0.25)
    with pytest.raises(RuntimeError, match="lse must have shape"):
        bwd(out, q, k, v, out, lse[:, :2], keep, 0.25)
    with pytest.raises(RuntimeError, match="grad_out must have the shape"):
        bwd(out[:, :2], q, k, v, out, lse, keep, 0.25)
    with pytest.raises(RuntimeError, match="out must have the dtype"):
        bwd(out, q, k, v, out.double(), lse, keep, 0.25)
