"""Tests of the native (C++ CPU) maep_fast::patch_recon_loss op and its backward.

The op is compared with the fp64 torch reference
(maep_fast.ops.patch_recon_loss.patch_recon_loss_reference) under design.md's
equivalence rule: fp32 allclose(rtol 1e-5, atol 1e-6) (or, for ill-conditioned
norm_pix patches of 2-3 elements, 2x / 3x the fp32 reference's own error, see
op_helpers.assert_close_fp); fp64 1e-12; fp16/bf16
max|fast - ref64| <= 2 * max|ref_lowp - ref64| + atol (3x for gradients),
atol = eps(dtype) * (1 + max|ref64|). Covered: every reduction, p in {1, 2},
norm_pix on/off, mask patterns (None, all, one, ragged, an empty sample,
non-binary weights, bool/int/float dtypes), awkward shapes (B = 1, primes,
2^k - 1), finite outputs after poisoning the allocator with NaN, hypothesis,
torch.library.opcheck, torch.compile(fullgraph=True, backend="aot_eager"),
fp64 gradcheck through the native op, and argument errors naming the argument.
Skips (with the reason) when maep_fast._C is not built.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from op_helpers import assert_close_fp

from maep_fast import native_available
from maep_fast._native import native_unavailable_reason  # the reason has no public name
from maep_fast.ops.patch_recon_loss import patch_recon_loss_reference

NATIVE = native_available() and hasattr(torch.ops.maep_fast, "patch_recon_loss")
pytestmark = pytest.mark.skipif(
    not NATIVE,
    reason=f"native extension maep_fast._C with patch_recon_loss is not built ({native_unavailable_reason()})",
)
if NATIVE:
    import maep_fast.ops  # noqa: F401  (registers the native ops' fakes and autograd)

REDUCTIONS = ("mean", "sum", "per_sample", "none")
MASKS = ("none", "all", "one", "ragged", "empty_sample")
# (N, C, H, W, patch_size): B = 1, primes, 2^k - 1, non-square grids
SHAPES = [
    (1, 3, 4, 4, 2),
    (5, 3, 14, 7, 7),
    (3, 1, 15, 15, 5),
    (7, 2, 6, 10, 2),
    (2, 3, 16, 16, 4),
    (3, 2, 3, 3, 1),
]


def op(*args):
    return torch.ops.maep_fast.patch_recon_loss(*args)


def make_mask(kind, n, length, gen=None):
    if kind == "none":
        return None
    if kind == "all":
        return torch.ones(n, length)
    if kind == "one":
        m = torch.zeros(n, length)
        m[0, length // 2] = 1.0
        return m
    m = (torch.rand(n, length, generator=gen) < 0.6).float()
    if kind == "empty_sample":
        m[n // 2] = 0.0
    return m


def make_inputs(shape, dtype, gen=None):
    n, c, h, w, ps = shape
    length, dim = (h // ps) * (w // ps), ps * ps * c
    imgs = torch.rand(n, c, h, w, generator=gen, dtype=torch.float64).to(dtype)
    pred = torch.randn(n, length, dim, generator=gen, dtype=torch.float64).to(dtype)
    return pred, imgs


def ref_and_grads(pred, imgs, mask, ps, norm_pix, p, reduction, grad_out, dtype=torch.float64):
    pr = pred.detach().to(dtype).requires_grad_(True)
    im = imgs.detach().to(dtype).requires_grad_(True)
    out = patch_recon_loss_reference(pr, im, mask, ps, norm_pix, p, reduction)
    gp, gi = torch.autograd.grad(out, [pr, im], grad_out.to(dtype))
    return out.detach(), gp, gi


def native_and_grads(pred, imgs, mask, ps, norm_pix, p, reduction, grad_out):
    pr = pred.detach().clone().requires_grad_(True)
    im = imgs.detach().clone().requires_grad_(True)
    poison = torch.full((pred.numel() + imgs.numel(),), float("nan"), dtype=pred.dtype)
    del poison  # a freed NaN block is likely reused by the outputs
    out = op(pr, im, mask, ps, norm_pix, p, reduction)
    gp, gi = torch.autograd.grad(out, [pr, im], grad_out.to(pred.dtype))
    return out.detach(), gp, gi


def check_case(shape, dtype, reduction, p, norm_pix, mask_kind, gen=None):
    pred, imgs = make_inputs(shape, dtype, gen)
    n, length = pred.shape[:2]
    mask = make_mask(mask_kind, n, length, gen)
    out_shape = {"mean": (), "sum": (), "per_sample": (n,), "none": (n, length)}[reduction]
    grad_out = torch.randn(out_shape, generator=gen, dtype=torch.float64).to(dtype)
    r_out, r_gp, r_gi = ref_and_grads(pred, imgs, mask, shape[4], norm_pix, p, reduction, grad_out)
    r32 = ref_and_grads(pred, imgs, mask, shape[4], norm_pix, p, reduction, grad_out, dtype=dtype)
    f_out, f_gp, f_gi = native_and_grads(pred, imgs, mask, shape[4], norm_pix, p, reduction, grad_out)
    for t in (f_out, f_gp, f_gi):
        assert torch.isfinite(t).all(), "non-finite output (unwritten / poisoned element)"
    tag = f"{shape} {dtype} {reduction} p={p} norm_pix={norm_pix} mask={mask_kind}"
    assert_close_fp(f_out, r_out, r32[0], dtype, "loss " + tag, 2)
    assert_close_fp(f_gp, r_gp, r32[1], dtype, "grad pred " + tag, 3)
    assert_close_fp(f_gi, r_gi, r32[2], dtype, "grad imgs " + tag, 3)
    if mask is not None and reduction == "none":
        assert (f_out[mask == 0] == 0).all()


# ---------------------------------------------------------------- fp32 / fp64 vs the fp64 reference
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("norm_pix", [True, False])
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_fp64_reference(dtype, reduction, p, norm_pix, mask_kind):
    i = REDUCTIONS.index(reduction) * 5 + MASKS.index(mask_kind) + 2 * p + int(norm_pix)
    check_case(SHAPES[i % len(SHAPES)], dtype, reduction, p, norm_pix, mask_kind)


@pytest.mark.parametrize("shape", SHAPES)
def test_all_shapes_fp32(shape):
    for reduction in REDUCTIONS:
        check_case(shape, torch.float32, reduction, 2, True, "ragged")


def test_mae_shape_mask_75():
    # MAE-style: 75 % of the patches counted, norm_pix, mean
    gen = torch.Generator().manual_seed(1)
    pred, imgs = make_inputs((4, 3, 32, 32, 4), torch.float32, gen)
    mask = (torch.rand(4, 64, generator=gen) < 0.75).float()
    r, gp, gi = ref_and_grads(pred, imgs, mask, 4, True, 2, "mean", torch.tensor(1.0))
    f, fp, fi = native_and_grads(pred, imgs, mask, 4, True, 2, "mean", torch.tensor(1.0))
    assert_close_fp(f, r, None, torch.float32, "loss")
    assert_close_fp(fp, gp, None, torch.float32, "grad pred")
    assert_close_fp(fi, gi, None, torch.float32, "grad imgs")


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.float64, torch.float32])
def test_mask_dtypes_and_weights(mask_dtype):
    pred, imgs = make_inputs((3, 2, 8, 8, 2), torch.float64)
    m = torch.rand(3, 16) < 0.5
    mask = m.to(mask_dtype)
    if mask_dtype.is_floating_point:
        mask = mask * torch.rand(3, 16, dtype=mask_dtype) * 3  # non-binary weights
    for reduction in REDUCTIONS:
        go = torch.randn({"mean": (), "sum": (), "per_sample": (3,), "none": (3, 16)}[reduction], dtype=torch.float64)
        r = ref_and_grads(pred, imgs, mask, 2, True, 2, reduction, go)
        f = native_and_grads(pred, imgs, mask, 2, True, 2, reduction, go)
        for a, b in zip(f, r):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_empty_mask_gives_zero_loss_and_grads():
    pred, imgs = make_inputs((2, 3, 8, 8, 4), torch.float32)
    mask = torch.zeros(2, 4)
    for reduction in REDUCTIONS:
        go = torch.ones({"mean": (), "sum": (), "per_sample": (2,), "none": (2, 4)}[reduction])
        out, gp, gi = native_and_grads(pred, imgs, mask, 4, True, 2, reduction, go)
        assert (out == 0).all() and (gp == 0).all() and (gi == 0).all()


def test_noncontiguous_inputs_and_expanded_grad():
    pred, imgs = make_inputs((3, 3, 8, 12, 4), torch.float32)
    imgs_nc = imgs.transpose(2, 3).contiguous().transpose(2, 3)  # same values, other strides
    pred_nc = pred.transpose(0, 1).contiguous().transpose(0, 1)
    assert not imgs_nc.is_contiguous() and not pred_nc.is_contiguous()
    mask = (torch.rand(3, 6) < 0.5).float()
    want = op(pred, imgs, mask, 4, True, 2, "none")
    torch.testing.assert_close(op(pred_nc, imgs_nc, mask, 4, True, 2, "none"), want, rtol=0, atol=0)
    # an expanded (stride-0) grad_out, as produced by sum()
    pr = pred_nc.clone().requires_grad_(True)
    out = op(pr, imgs_nc, mask, 4, True, 2, "none").sum()
    out.backward()
    r = ref_and_grads(pred, imgs, mask, 4, True, 2, "sum", torch.tensor(1.0))
    torch.testing.assert_close(pr.grad.double(), r[1], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- fp16 / bf16: 2x (3x grads) the low-precision reference's error
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("p,norm_pix", [(2, True), (1, False)])
def test_low_precision(dtype, reduction, p, norm_pix):
    gen = torch.Generator().manual_seed(3)
    shape = (3, 3, 12, 8, 4)
    pred, imgs = make_inputs(shape, dtype, gen)
    mask = make_mask("ragged", 3, 6, gen)
    go = torch.randn({"mean": (), "sum": (), "per_sample": (3,), "none": (3, 6)}[reduction], generator=gen).to(dtype)
    r64 = ref_and_grads(pred, imgs, mask, 4, norm_pix, p, reduction, go)
    rlp = ref_and_grads(pred, imgs, mask, 4, norm_pix, p, reduction, go, dtype=dtype)
    fast = native_and_grads(pred, imgs, mask, 4, norm_pix, p, reduction, go)
    for name, f, lp, ref, k in zip(("loss", "grad pred", "grad imgs"), fast, rlp, r64, (2, 3, 3)):
        assert_close_fp(f, ref, lp, dtype, name, k)


# ---------------------------------------------------------------- hypothesis
@st.composite
def cases(draw):
    n = draw(st.integers(1, 4))
    c = draw(st.integers(1, 3))
    ps = draw(st.integers(1, 5))
    gh, gw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    norm_pix = draw(st.booleans()) and ps * ps * c > 1  # a 1-element patch has no unbiased variance
    return (
        (n, c, gh * ps, gw * ps, ps),
        draw(st.sampled_from([torch.float32, torch.float64])),
        draw(st.sampled_from(REDUCTIONS)),
        draw(st.sampled_from([1, 2])),
        norm_pix,
        draw(st.sampled_from(MASKS)),
        draw(st.integers(0, 2**31 - 1)),
    )


@settings(deadline=None, max_examples=10, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=cases())
def test_property_matches_reference(case):
    shape, dtype, reduction, p, norm_pix, mask_kind, seed = case
    check_case(shape, dtype, reduction, p, norm_pix, mask_kind, torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- opcheck, compile, gradcheck
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("with_mask", [False, True])
def test_opcheck(reduction, with_mask):
    pred, imgs = make_inputs((2, 3, 8, 4, 2), torch.float32)
    pred.requires_grad_(True)
    imgs.requires_grad_(True)
    mask = (torch.rand(2, 8) < 0.5).float() if with_mask else None
    torch.library.opcheck(torch.ops.maep_fast.patch_recon_loss.default, (pred, imgs, mask, 2, True, 2, reduction))
    go = torch.randn({"mean": (), "sum": (), "per_sample": (2,), "none": (2, 8)}[reduction])
    torch.library.opcheck(
        torch.ops.maep_fast.patch_recon_loss_backward.default,
        (go, pred.detach(), imgs.detach(), mask, 2, False, 1, reduction),
    )


def test_torch_compile_fullgraph():
    import torch._dynamo

    def f(pred, imgs, mask):
        a = torch.ops.maep_fast.patch_recon_loss(pred, imgs, mask, 4, True, 2, "mean")
        b = torch.ops.maep_fast.patch_recon_loss(pred, imgs, None, 4, False, 1, "per_sample")
        return a * 2.0 + b.sum()

    pred, imgs = make_inputs((3, 3, 8, 8, 4), torch.float32)
    mask = (torch.rand(3, 4) < 0.5).float()
    p1, i1 = pred.clone().requires_grad_(True), imgs.clone().requires_grad_(True)
    p2, i2 = pred.clone().requires_grad_(True), imgs.clone().requires_grad_(True)
    torch._dynamo.reset()
    try:
        got = torch.compile(f, fullgraph=True, backend="aot_eager")(p1, i1, mask)
        got.backward()
    finally:
        torch._dynamo.reset()
    want = f(p2, i2, mask)
    want.backward()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(p1.grad, p2.grad, rtol=0, atol=0)
    torch.testing.assert_close(i1.grad, i2.grad, rtol=0, atol=0)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("p,norm_pix", [(2, True), (1, True), (2, False)])
def test_gradcheck_fp64(reduction, p, norm_pix):
    pred, imgs = make_inputs((2, 2, 4, 6, 2), torch.float64)
    pred.requires_grad_(True)
    imgs.requires_grad_(True)
    mask = torch.tensor([[1.0, 0, 1, 1, 0, 1], [0, 0, 0, 0, 0, 0]])
    assert torch.autograd.gradcheck(lambda a, b: op(a, b, mask, 2, norm_pix, p, reduction), (pred, imgs))


# ---------------------------------------------------------------- argument errors
def test_bad_arguments_name_the_argument():
    pred, imgs = make_inputs((2, 3, 8, 8, 4), torch.float32)
    m = torch.ones(2, 4)
    ok = (pred, imgs, m, 4, True, 2, "mean")
    op(*ok)
    bad = [
        ((pred.double(), imgs, m, 4, True, 2, "mean"), "imgs must have the dtype of pred"),
        ((pred.long(), imgs.long(), m, 4, True, 2, "mean"), "pred must have dtype"),
        ((pred[:, :3], imgs, m, 4, True, 2, "mean"), "pred must have shape"),
        ((pred, imgs[:, :, :7], m, 4, True, 2, "mean"), "divisible by patch_size"),
        ((pred, imgs[0], m, 4, True, 2, "mean"), "imgs must have rank 4"),
        ((pred[0], imgs, m, 4, True, 2, "mean"), "pred must have rank 3"),
        ((pred, imgs, m[:, :3], 4, True, 2, "mean"), "mask must have shape"),
        ((pred, imgs, m, 0, True, 2, "mean"), "patch_size must be a positive"),
        ((pred, imgs, m, 4, True, 3, "mean"), "p must be 1 or 2"),
        ((pred, imgs, m, 4, True, 2, "avg"), "reduction must be"),
    ]
    for args, msg in bad:
        with pytest.raises(RuntimeError, match=msg):
            op(*args)
    bwd = torch.ops.maep_fast.patch_recon_loss_backward
    with pytest.raises(RuntimeError, match="grad_out must have the loss shape"):
        bwd(torch.ones(2), pred, imgs, m, 4, True, 2, "mean")
    with pytest.raises(RuntimeError, match="grad_out must have the dtype"):
        bwd(torch.ones((), dtype=torch.float64), pred, imgs, m, 4, True, 2, "mean")
