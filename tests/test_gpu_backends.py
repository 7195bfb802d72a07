"""GPU backends ("cuda" = native kernels of maep_fast._C, "triton") of the three fused ops
against the fp64 torch reference, on CUDA tensors. Skips cleanly without a CUDA device.

Equivalence rule (design.md):
- fp32: allclose(rtol=1e-5, atol=1e-6) against the fp64 reference. TF32 is switched off
  for the whole module (fixture ``_no_tf32``: torch.backends.cuda.matmul.allow_tf32 and
  cudnn.allow_tf32 False, restored afterwards), so Triton's fp32 tl.dot runs in IEEE fp32.
  Stated fallbacks where that bound is not meaningful: attention gradients (flash-style
  backward, dS = P (dP - Delta) is a difference of O(|dO| |V|) terms) may also pass with
  max err <= 3 * err(fp32 reference) + 1e-5 * (1 + max|grad|); patch_recon_loss with
  norm_pix on 3-element patches (ill-conditioned 1/std) may pass with
  max err <= 2x / 3x err(fp32 reference) + 1e-6 * (1 + max|ref|).
- fp16 / bf16: max|fast - ref64| <= 2 * max|ref_lowp - ref64| + atol (3x for gradients),
  ref_lowp = the reference run in the same dtype; atol = eps(dtype) * (1 + max|ref64|)
  (attention, pgd_step) and eps(dtype) * max|ref64| for patch_recon_loss (scale-relative:
  its gradients are O(1 / (N L D))).
Outputs are written into allocator blocks poisoned with NaN first; every output must be finite.

Covered: masked_patch_attention forward + dq/dk/dv (B = 1, primes, L in {1, 17, 65, 257},
D in {16, 48, 64, 96, 128}; keep None / all / one / ragged / a sample with none kept;
hidden query rows exactly 0 in out and dq, hidden keys exactly 0 in dk and dv; B*H > 65535);
patch_recon_loss forward + d pred / d imgs (31x31 patch 1, 15x15 patch 5, 32x32 patch 4;
every reduction, p in {1, 2}, norm_pix, mask patterns); pgd_step / pgd_step_ (linf / l2,
scalar and per-sample step/eps, both directions); "cuda" vs "triton" agreement; that an
explicit backend really runs its kernels (not the reference); native ops inside
torch.compile(mode="reduce-overhead") (CUDA graphs) and on a non-default stream behind a
long matmul (kernels launched on the wrong stream race: pytorch/extension-cpp#118);
end to end: Purifier fused vs reference (fp32) and a MAEP training step under bf16 autocast.
"""
from __future__ import annotations

import copy
import importlib
import math

import pytest
import torch

from maep_fast.ops import _dispatch
from maep_fast.ops._dispatch import unavailable_reason

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DEV = torch.device("cuda")
BACKENDS = ("cuda", "triton")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LOWP = (torch.float16, torch.bfloat16)
KEEPS = ("none", "all", "one", "ragged", "empty_sample")


@pytest.fixture(autouse=True)
def _no_tf32():
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def need(op: str, backend: str) -> None:
    why = unavailable_reason(op, backend, DEV)
    if why:
        pytest.skip(why)


def poison(numel: int) -> None:
    """Fill a block with NaN and free it: the caching allocator is likely to hand it to the outputs."""
    t = torch.full((max(int(numel), 1),), float("nan"), device=DEV)
    del t


def maxerr(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return (a.double() - b.double()).abs().max().item()


def amax(t: torch.Tensor) -> float:
    return t.abs().max().item() if t.numel() else 0.0


def assert_equiv(fast, ref64, ref_lp, dtype, what, k=2, scale_rel=False, fp32_atol=None):
    """design.md's rule; ``ref_lp`` is the reference run in ``dtype`` (fp32 for fp32)."""
    assert fast.dtype == dtype, (what, fast.dtype)
    assert fast.shape == ref64.shape, (what, tuple(fast.shape), tuple(ref64.shape))
    assert torch.isfinite(fast).all(), f"non-finite value (unwritten / poisoned element): {what}"
    if dtype == torch.float64:
        torch.testing.assert_close(fast, ref64, rtol=1e-12, atol=1e-12, msg=what)
        return
    if dtype == torch.float32:
        if torch.allclose(fast.double(), ref64, rtol=1e-5, atol=1e-6):
            return
        err, err_ref = maxerr(fast, ref64), maxerr(ref_lp, ref64)
        atol = 1e-6 * (1 + amax(ref64)) if fp32_atol is None else fp32_atol
        assert err <= k * err_ref + atol, (what, "fp32", err, err_ref, atol)
        return
    eps = torch.finfo(dtype).eps
    atol = eps * amax(ref64) if scale_rel else eps * (1 + amax(ref64))
    err, err_ref = maxerr(fast, ref64), maxerr(ref_lp, ref64)
    assert err <= k * err_ref + atol, (what, str(dtype), err, err_ref, atol)


# ==========================================================================================
# masked_patch_attention
# ==========================================================================================
MPA = "masked_patch_attention"
# (B, H, L, D), keep patterns
MPA_CASES = [
    ((1, 1, 1, 16), ("none", "all", "empty_sample")),
    ((1, 3, 17, 48), ("none", "one", "ragged")),
    ((3, 2, 65, 96), KEEPS),
    ((2, 1, 257, 128), KEEPS),
    ((5, 2, 257, 64), ("none", "ragged")),
    ((1, 2, 65, 16), ("ragged",)),
]
MPA_PARAMS = [(s, kp) for s, kps in MPA_CASES for kp in kps]


def make_keep(kind, b, length):
    if kind == "none":
        return None
    if kind == "all":
        return torch.ones(b, length, dtype=torch.bool, device=DEV)
    if kind == "one":
        keep = torch.zeros(b, length, dtype=torch.bool, device=DEV)
        keep[torch.arange(b, device=DEV), torch.randint(0, length, (b,), device=DEV)] = True
        return keep
    keep = torch.rand(b, length, device=DEV) < torch.rand(b, 1, device=DEV).clamp(0.2, 0.9)  # ragged counts
    keep[:, 0] = True
    if kind == "empty_sample":
        keep[b // 2] = False  # a sample with no visible patch at all
    return keep


def mpa_ref(q, k, v, keep, go, dtype, scale=None):
    from maep_fast.ops.masked_patch_attention import masked_patch_attention_reference

    xs = [t.detach().to(dtype).requires_grad_(True) for t in (q, k, v)]
    out = masked_patch_attention_reference(*xs, keep, scale)
    return (out.detach(),) + torch.autograd.grad(out, xs, go.to(dtype))


def mpa_fast(q, k, v, keep, go, backend, scale=None):
    from maep_fast.ops.masked_patch_attention import masked_patch_attention

    xs = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    poison(8 * q.numel())
    out = masked_patch_attention(*xs, keep, scale=scale, backend=backend)
    poison(8 * q.numel())
    return (out.detach(),) + torch.autograd.grad(out, xs, go)


def mpa_check(res, q, k, v, keep, go, scale=None, what=""):
    dtype = q.dtype
    r64 = mpa_ref(q, k, v, keep, go, torch.float64, scale)
    rlp = mpa_ref(q, k, v, keep, go, dtype, scale)
    gmag = max(amax(t) for t in r64[1:])
    for i, name in enumerate(("out", "dq", "dk", "dv")):
        assert_equiv(res[i], r64[i], rlp[i], dtype, f"{name} {what}", k=2 if i == 0 else 3,
                     fp32_atol=None if i == 0 else 1e-5 * (1 + gmag))
    if keep is not None:
        hid_q = (~keep)[:, None, :, None].expand_as(q)
        for name, t in (("out", res[0]), ("dq", res[1]), ("dk", res[2]), ("dv", res[3])):
            assert torch.all(t[hid_q] == 0), f"{name} not exactly 0 on hidden rows {what}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,keep_kind", MPA_PARAMS, ids=[f"{s}-{kp}" for s, kp in MPA_PARAMS])
def test_mpa_vs_fp64_reference(backend, dtype, shape, keep_kind):
    need(MPA, backend)
    q, k, v, go = (torch.randn(shape, device=DEV, dtype=dtype) for _ in range(4))
    keep = make_keep(keep_kind, shape[0], shape[2])
    res = mpa_fast(q, k, v, keep, go, backend)
    mpa_check(res, q, k, v, keep, go, what=f"{backend} {shape} {dtype} keep={keep_kind}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_mpa_explicit_scale_and_noncontiguous(backend):
    need(MPA, backend)
    b, h, length, d = 2, 3, 33, 48
    qkv = torch.randn(b, length, 3, h, d, device=DEV).permute(2, 0, 3, 1, 4)  # [3, B, H, L, D] views
    q, k, v = qkv.unbind(0)
    go = torch.randn(b, h, length, d, device=DEV)
    keep = make_keep("ragged", b, length)
    res = mpa_fast(q, k, v, keep, go, backend, scale=0.37)
    mpa_check(res, q, k, v, keep, go, scale=0.37, what=f"{backend} non-contiguous scale=0.37")


@pytest.mark.parametrize("backend", BACKENDS)
def test_mpa_many_heads_times_batch(backend):
    """B*H > 65535 programs: a launch grid must not put B*H on a 65535-limited axis."""
    need(MPA, backend)
    shape = (4099, 16, 2, 16)
    q, k, v, go = (torch.randn(shape, device=DEV) for _ in range(4))
    keep = make_keep("ragged", shape[0], shape[2])
    res = mpa_fast(q, k, v, keep, go, backend)
    torch.cuda.synchronize()
    mpa_check(res, q, k, v, keep, go, what=f"{backend} B*H={shape[0] * shape[1]}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mpa_cuda_vs_triton(dtype):
    need(MPA, "cuda")
    need(MPA, "triton")
    shape = (3, 2, 65, 96)
    q, k, v, go = (torch.randn(shape, device=DEV, dtype=dtype) for _ in range(4))
    keep = make_keep("empty_sample", shape[0], shape[2])
    a = mpa_fast(q, k, v, keep, go, "cuda")
    b = mpa_fast(q, k, v, keep, go, "triton")
    r64 = mpa_ref(q, k, v, keep, go, torch.float64)
    rlp = mpa_ref(q, k, v, keep, go, dtype)
    for i, name in enumerate(("out", "dq", "dk", "dv")):
        kk = 2 if i == 0 else 3
        if dtype == torch.float32:
            bound = 2 * (1e-5 * amax(r64[i]) + 1e-6) if i == 0 else 2e-5 * (1 + max(amax(t) for t in r64[1:]))
        else:
            bound = 2 * (kk * maxerr(rlp[i], r64[i]) + torch.finfo(dtype).eps * (1 + amax(r64[i])))
        assert maxerr(a[i], b[i]) <= bound, (name, str(dtype), maxerr(a[i], b[i]), bound)


@pytest.mark.parametrize("dtype,d", [(torch.float64, 16), (torch.float32, 320)], ids=("fp64", "D320"))
def test_mpa_auto_runs_inputs_no_gpu_kernel_takes(monkeypatch, dtype, d):
    """backend='auto' must not raise on CUDA inputs that neither Triton (fp64, D > 256) nor the
    CUDA kernel (fp64, D > 128) takes: the docstring promises the next available backend."""
    monkeypatch.delenv("MAEP_FAST_BACKEND", raising=False)
    from maep_fast.ops.masked_patch_attention import masked_patch_attention

    shape = (2, 2, 17, d)
    q, k, v, go = (torch.randn(shape, device=DEV, dtype=dtype) for _ in range(4))
    keep = make_keep("ragged", 2, 17)
    xs = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = masked_patch_attention(*xs, keep, backend="auto")
    grads = torch.autograd.grad(out, xs, go)
    r64 = mpa_ref(q, k, v, keep, go, torch.float64)
    rlp = mpa_ref(q, k, v, keep, go, dtype)
    for i, t in enumerate((out.detach(),) + grads):
        assert_equiv(t, r64[i], rlp[i], dtype, f"auto {i}",
                     k=2 if i == 0 else 3, fp32_atol=1e-5 * (1 + max(amax(g) for g in r64[1:])))


def test_mpa_cuda_rejects_what_it_cannot_run():
    need(MPA, "cuda")
    from maep_fast.ops.masked_patch_attention import masked_patch_attention

    q = torch.randn(1, 1, 4, 16, device=DEV, dtype=torch.float64)
    with pytest.raises(TypeError, match="float64"):
        masked_patch_attention(q, q, q, backend="cuda")
    q = torch.randn(1, 1, 4, 160, device=DEV)
    with pytest.raises(ValueError, match="head dim"):
        masked_patch_attention(q, q, q, backend="cuda")


def test_mpa_cuda_native_op_refuses_wide_heads():
    """The native op called directly (below the Python refusal) refuses in its C++ host checks.
    This call crashed the H200 runs' worker: formatting the message's integers went through a copy
    of libstdc++ that the toolchain had linked into _C (bench/gpu_runs/2026-11-29-s4/README.md;
    CMakeLists.txt now keeps such copies local, tests/test_native_error_messages.py)."""
    need(MPA, "cuda")
    q = torch.randn(1, 1, 4, 160, device=DEV)
    with pytest.raises(RuntimeError, match="head dim"):
        torch.ops.maep_fast.masked_patch_attention(q, q, q, None, 0.1)
    with pytest.raises(RuntimeError, match="float64"):
        torch.ops.maep_fast.masked_patch_attention(q.double(), q.double(), q.double(), None, 0.1)


# ==========================================================================================
# patch_recon_loss
# ==========================================================================================
PRL = "patch_recon_loss"
# (N, C, H, W, patch), norm_pix, p, reduction, mask kind
PRL_CASES = [
    ((1, 3, 31, 31, 1), True, 2, "mean", "none"),
    ((2, 3, 31, 31, 1), False, 1, "per_sample", "ragged"),
    ((3, 3, 15, 15, 5), True, 2, "per_sample", "empty_sample"),
    ((1, 3, 15, 15, 5), True, 1, "sum", "one"),
    ((5, 3, 32, 32, 4), True, 2, "mean", "ragged"),
    ((5, 3, 32, 32, 4), False, 2, "none", "all"),
    ((2, 1, 32, 32, 4), True, 2, "mean", "empty_sample"),
    ((7, 3, 32, 32, 4), False, 1, "mean", "none"),
    # the patch-row kernel with more than 48 KB of shared memory (224 x 224, patch 16), and a row
    # too wide to stage (W = 2048): the warp-per-patch fallback
    ((2, 3, 224, 224, 16), True, 2, "per_sample", "ragged"),
    ((1, 3, 16, 2048, 16), True, 1, "mean", "ragged"),
]


def make_mask(kind, n, length):
    if kind == "none":
        return None
    if kind == "all":
        return torch.ones(n, length, device=DEV)
    if kind == "one":
        m = torch.zeros(n, length, device=DEV)
        m[:, length // 3] = 1
        return m
    m = (torch.rand(n, length, device=DEV) < 0.6).float()
    m[:, 0] = 1
    if kind == "empty_sample":
        m[n // 2] = 0
    return m


def prl_inputs(geo, dtype):
    n, c, h, w, ps = geo
    length, dim = (h // ps) * (w // ps), ps * ps * c
    imgs = torch.rand(n, c, h, w, device=DEV).to(dtype)
    pred = torch.randn(n, length, dim, device=DEV).to(dtype)
    return pred, imgs, length


def prl_run(fn, pred, imgs, dtype):
    p = pred.detach().to(dtype).requires_grad_(True)
    i = imgs.detach().to(dtype).requires_grad_(True)
    loss = fn(p, i)
    # upstream gradient in {0.5, 1, 1.5}: exact in every dtype, so all runs see the same values
    go = ((torch.arange(loss.numel(), device=DEV) % 3 + 1) / 2).reshape(loss.shape).to(loss.dtype)
    gp, gi = torch.autograd.grad(loss, (p, i), go)
    return loss.detach(), gp, gi


def prl_ref(pred, imgs, mask, ps, norm_pix, p, reduction, dtype):
    from maep_fast.ops.patch_recon_loss import patch_recon_loss_reference

    m = None if mask is None else mask.to(dtype)
    return prl_run(lambda a, b: patch_recon_loss_reference(a, b, m, ps, norm_pix, p, reduction), pred, imgs, dtype)


def prl_fast(pred, imgs, mask, ps, norm_pix, p, reduction, backend):
    from maep_fast.ops.patch_recon_loss import patch_recon_loss

    poison(4 * (pred.numel() + imgs.numel()))
    return prl_run(lambda a, b: patch_recon_loss(a, b, mask, patch_size=ps, norm_pix=norm_pix, p=p,
                                                 reduction=reduction, backend=backend), pred, imgs, pred.dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", PRL_CASES, ids=lambda c: f"{c[0]}-np{int(c[1])}-p{c[2]}-{c[3]}-{c[4]}")
def test_prl_vs_fp64_reference(backend, dtype, case):
    need(PRL, backend)
    geo, norm_pix, p, reduction, mask_kind = case
    pred, imgs, length = prl_inputs(geo, dtype)
    mask = make_mask(mask_kind, geo[0], length)
    ps = geo[4]
    res = prl_fast(pred, imgs, mask, ps, norm_pix, p, reduction, backend)
    r64 = prl_ref(pred, imgs, mask, ps, norm_pix, p, reduction, torch.float64)
    rlp = prl_ref(pred, imgs, mask, ps, norm_pix, p, reduction, dtype)
    for i, name in enumerate(("loss", "dpred", "dimgs")):
        assert_equiv(res[i], r64[i], rlp[i], dtype, f"{name} {backend} {case} {dtype}", k=2 if i == 0 else 3,
                     scale_rel=True)
    if mask is not None:  # patches not counted get exactly zero gradient
        dead = (mask == 0)[:, :, None].expand_as(res[1])
        assert torch.all(res[1][dead] == 0), "dpred not exactly 0 on uncounted patches"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_prl_cuda_vs_triton(dtype):
    need(PRL, "cuda")
    need(PRL, "triton")
    geo = (3, 3, 32, 32, 4)
    pred, imgs, length = prl_inputs(geo, dtype)
    mask = make_mask("empty_sample", 3, length)
    args = (pred, imgs, mask, 4, True, 2, "per_sample")
    a, b = prl_fast(*args, "cuda"), prl_fast(*args, "triton")
    r64, rlp = prl_ref(*args, torch.float64), prl_ref(*args, dtype)
    for i, name in enumerate(("loss", "dpred", "dimgs")):
        kk = 2 if i == 0 else 3
        if dtype == torch.float32:
            bound = 2 * (1e-5 * amax(r64[i]) + 1e-6)
        else:
            bound = 2 * (kk * maxerr(rlp[i], r64[i]) + torch.finfo(dtype).eps * amax(r64[i]))
        assert maxerr(a[i], b[i]) <= bound, (name, str(dtype), maxerr(a[i], b[i]), bound)


@pytest.mark.parametrize("backend", BACKENDS)
def test_prl_mixed_dtypes_under_autocast_shape(backend):
    """bf16 pred with fp32 images (what autocast produces in training): promoted, finite, close."""
    need(PRL, backend)
    from maep_fast.ops.patch_recon_loss import patch_recon_loss, patch_recon_loss_reference

    pred, imgs, length = prl_inputs((2, 3, 32, 32, 4), torch.float32)
    pred_b = pred.to(torch.bfloat16).requires_grad_(True)
    imgs_f = imgs.clone().requires_grad_(True)
    loss = patch_recon_loss(pred_b, imgs_f, None, patch_size=4, norm_pix=False, p=1, backend=backend)
    loss.backward()
    want = patch_recon_loss_reference(pred_b.detach().double(), imgs.double(), None, 4, False, 1, "mean")
    assert loss.dtype == torch.float32
    assert abs(loss.item() - want.item()) <= 1e-2 * abs(want.item()) + 1e-3
    assert pred_b.grad.dtype == torch.bfloat16 and imgs_f.grad.dtype == torch.float32
    assert torch.isfinite(pred_b.grad).all() and torch.isfinite(imgs_f.grad).all()


# ==========================================================================================
# pgd_step
# ==========================================================================================
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
    assert_equiv(out, r64, rlp, dtype, f"cuda pgd {shape} {dtype} {norm} offset={offset}")
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
    assert_equiv(out, r64, rlp, dtype, what)
    xi = x.clone()
    ret = pgd_step_(xi, g, x0, step, eps, norm=norm, direction=direction, backend=backend)
    assert ret is xi
    assert_equiv(xi, r64, rlp, dtype, "in-place " + what)
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
        assert_equiv(nat, r64, rlp, dtype, "torch.ops.maep_fast.pgd_step " + what)
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


# ==========================================================================================
# an explicitly requested backend runs its kernels, not the torch reference
# ==========================================================================================
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", (PGD, PRL, MPA))
def test_explicit_backend_does_not_run_reference(monkeypatch, backend, op):
    need(op, backend)
    # the submodules (maep_fast.ops re-exports functions of the same names)
    mpa_mod = importlib.import_module("maep_fast.ops.masked_patch_attention")
    prl_mod = importlib.import_module("maep_fast.ops.patch_recon_loss")
    pgd_mod = importlib.import_module("maep_fast.ops.pgd_step")

    def boom(*a, **k):
        raise AssertionError(f"backend={backend!r} for {op} ran the torch reference")

    if op == PGD:
        monkeypatch.setattr(pgd_mod, "pgd_step_reference", boom)
        x, g, x0, step, eps = pgd_inputs((3, 3, 8, 8), torch.float32, True)
        for norm in ("linf", "l2"):
            pgd_mod.pgd_step(x, g, x0, step, eps, norm=norm, backend=backend)
            pgd_mod.pgd_step_(x.clone(), g, x0, step, eps, norm=norm, backend=backend)
    elif op == PRL:
        monkeypatch.setattr(prl_mod, "patch_recon_loss_reference", boom)
        pred, imgs, length = prl_inputs((2, 3, 8, 8, 4), torch.float32)
        prl_mod.patch_recon_loss(pred, imgs, None, patch_size=4, backend=backend)
    else:
        monkeypatch.setattr(mpa_mod, "masked_patch_attention_reference", boom)
        q = torch.randn(2, 2, 5, 16, device=DEV)
        mpa_mod.masked_patch_attention(q, q, q, make_keep("ragged", 2, 5), backend=backend)
    torch.cuda.synchronize()


def test_auto_on_cuda_picks_a_gpu_backend(monkeypatch):
    monkeypatch.delenv("MAEP_FAST_BACKEND", raising=False)
    for op in (PGD, PRL, MPA):
        got = _dispatch.resolve_backend(op, "auto", DEV)
        if any(not unavailable_reason(op, b, DEV) for b in BACKENDS):
            assert got in BACKENDS, (op, got)


# ==========================================================================================
# streams and CUDA graphs: native kernels must launch on the current stream
# ==========================================================================================
def native_inputs():
    b, h, length, d = 3, 2, 65, 64
    imgs = torch.rand(5, 3, 32, 32, device=DEV)
    return {
        "q": torch.randn(b, h, length, d, device=DEV),
        "k": torch.randn(b, h, length, d, device=DEV),
        "v": torch.randn(b, h, length, d, device=DEV),
        "go": torch.randn(b, h, length, d, device=DEV),
        "keep": make_keep("empty_sample", b, length),
        "pred": torch.randn(5, 64, 48, device=DEV),
        "imgs": imgs,
        "mask": make_mask("ragged", 5, 64),
        "gl": torch.linspace(0.5, 1.5, 5, device=DEV),
        "x": (imgs + 0.02 * torch.randn_like(imgs)).clamp(0, 1),
        "g": torch.randn_like(imgs),
        "step": torch.rand(5, device=DEV) * 0.05,
        "eps": torch.rand(5, device=DEV) * 0.1,
    }


def native_suite(t):
    ops = torch.ops.maep_fast
    out, lse = ops.masked_patch_attention_fwd(t["q"], t["k"], t["v"], t["keep"], 0.125)
    dq, dk, dv = ops.masked_patch_attention_bwd(t["go"], t["q"], t["k"], t["v"], out, lse, t["keep"], 0.125)
    loss = ops.patch_recon_loss(t["pred"], t["imgs"], t["mask"], 4, True, 2, "per_sample")
    gp, gi = ops.patch_recon_loss_backward(t["gl"], t["pred"], t["imgs"], t["mask"], 4, True, 2, "per_sample")
    x1 = ops.pgd_step(t["x"], t["g"], t["imgs"], t["step"], t["eps"], "linf", 1, 0.0, 1.0)
    x2 = ops.pgd_step(t["x"], t["g"], t["imgs"], t["step"], t["eps"], "l2", -1, 0.0, 1.0)
    return [out, lse, dq, dk, dv, loss, gp, gi, x1, x2]


SUITE_NAMES = ("out", "lse", "dq", "dk", "dv", "loss", "dpred", "dimgs", "pgd_linf", "pgd_l2")


def need_native_cuda():
    for op in (PGD, PRL, MPA):
        need(op, "cuda")


def busy(stream):
    """A long kernel chain on ``stream`` (~tens of ms): later work on it must wait for it."""
    a = torch.randn(6144, 6144, device=DEV) / 80.0
    for _ in range(3):
        a = a @ a
    return a


def compare_lists(got, want, what):
    for name, a, b in zip(SUITE_NAMES, got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=lambda m, n=name: f"{what} {n}: {m}")


def test_native_ops_on_a_side_stream():
    need_native_cuda()
    src = native_inputs()
    want = [t.clone() for t in native_suite(src)]
    dst = {n: torch.zeros_like(t) for n, t in src.items()}  # what a too-early read would see
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        busy(s)
        for n in src:
            dst[n].copy_(src[n])  # queued behind the matmuls on s
        got = native_suite(dst)
        # the in-place step too
        xi = dst["x"].clone()
        torch.ops.maep_fast.pgd_step_(xi, dst["g"], dst["imgs"], dst["step"], dst["eps"], "l2", -1, 0.0, 1.0)
    torch.cuda.synchronize()
    compare_lists(got, want, "side stream")
    torch.testing.assert_close(xi, want[-1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_public_ops_on_a_side_stream(backend):
    """The public entry points (autograd included) on a non-default stream."""
    for op in (PGD, PRL, MPA):
        need(op, backend)
    from maep_fast.ops import masked_patch_attention, patch_recon_loss, pgd_step

    def run(t):
        q, k, v = (t[n].detach().clone().requires_grad_(True) for n in "qkv")
        out = masked_patch_attention(q, k, v, t["keep"], backend=backend)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), t["go"])
        pred = t["pred"].detach().clone().requires_grad_(True)
        imgs = t["imgs"].detach().clone().requires_grad_(True)
        loss = patch_recon_loss(pred, imgs, t["mask"], patch_size=4, reduction="per_sample", backend=backend)
        gp, gi = torch.autograd.grad(loss, (pred, imgs), t["gl"])
        x2 = pgd_step(t["x"], t["g"], t["imgs"], t["step"], t["eps"], norm="l2", direction=-1, backend=backend)
        return [out.detach(), dq, dk, dv, loss.detach(), gp, gi, x2]

    src = native_inputs()
    want = [t.clone() for t in run(src)]
    dst = {n: torch.zeros_like(t) for n, t in src.items()}
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        busy(s)
        for n in src:
            dst[n].copy_(src[n])
        got = run(dst)
    torch.cuda.synchronize()
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m, i=i: f"{backend} output {i}: {m}")


def test_native_ops_under_cuda_graphs():
    """torch.compile(mode="reduce-overhead") captures the ops into a CUDA graph on a capture
    stream; a kernel launched on the legacy default stream breaks the capture or reads stale data."""
    need_native_cuda()
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(native_suite, mode="reduce-overhead", fullgraph=True)
    with torch.no_grad():
        for it in range(4):  # warm-up, record, replays with fresh inputs each time
            t = native_inputs()
            want = native_suite(t)
            got = [g.clone() for g in compiled(t)]
            torch.cuda.synchronize()
            compare_lists(got, want, f"cuda graph call {it}")
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    torch._dynamo.reset()


# ==========================================================================================
# end to end
# ==========================================================================================
def test_purifier_fused_matches_reference_fp32():
    import maep_fast
    from maep_fast import Purifier

    model = maep_fast.create_mae("mae_vit_tiny_patch4").cuda()
    x = torch.rand(6, 3, 32, 32, device=DEV)
    x_big = torch.rand(2, 3, 45, 40, device=DEV)  # tiled path
    fused = Purifier(model, fused=True)
    a, a_big = fused.purify(x), fused.purify(x_big)
    ref = Purifier(model, fused=False)  # same weights, reference ops everywhere
    b, b_big = ref.purify(x), ref.purify(x_big)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a_big, b_big, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ("auto", "cuda", "triton"))
def test_maep_training_step_bf16_autocast_matches_reference(backend):
    import maep_fast
    from maep_fast.train.maep import maep_loss

    if backend != "auto":
        for op in (PRL, MPA):
            need(op, backend)
    base = maep_fast.create_mae("mae_vit_tiny_patch4").cuda().train()
    x = torch.rand(4, 3, 32, 32, device=DEV)
    x_adv = (x + 8 / 255 * torch.randn_like(x).sign()).clamp(0, 1)

    def step(be):
        model = copy.deepcopy(base).set_backend(be)
        torch.manual_seed(1234)  # same random masking in both runs
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, parts = maep_loss(model, x_adv, x, mask_ratio=0.75, w_pur=1.0, w_mae=1.0)
        loss.backward()
        grads = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])
        return loss.detach().float(), parts, grads

    l_fast, p_fast, g_fast = step(backend)
    l_ref, p_ref, g_ref = step("torch")
    assert torch.isfinite(l_fast) and torch.isfinite(g_fast).all()
    assert abs(l_fast.item() - l_ref.item()) <= 2e-2 * abs(l_ref.item()) + 1e-3, (l_fast.item(), l_ref.item())
    for key in ("l1_pur", "mae"):
        a, b = p_fast[key].float().item(), p_ref[key].float().item()
        assert abs(a - b) <= 3e-2 * abs(b) + 1e-3, (key, a, b)
    assert g_fast.shape == g_ref.shape
    cos = torch.nn.functional.cosine_similarity(g_fast.double(), g_ref.double(), dim=0).item()
    rel = ((g_fast - g_ref).norm() / g_ref.norm().clamp_min(1e-12)).item()
    assert cos > 0.99 and rel < 0.1, (cos, rel)
