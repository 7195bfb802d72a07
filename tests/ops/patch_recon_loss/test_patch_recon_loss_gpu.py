"""GPU backends ("cuda" = native kernels of maep_fast._C, "triton") of patch_recon_loss against the
fp64 torch reference, on CUDA tensors (skipped without a CUDA device): forward + d pred / d imgs
(31x31 patch 1, 15x15 patch 5, 32x32 patch 4, 224x224 patch 16, a 2048-wide row; every reduction,
p in {1, 2}, norm_pix, mask patterns; uncounted patches get exactly zero gradient), "cuda" vs
"triton", bf16 predictions against fp32 images (autocast).

Equivalence rule: op_helpers.assert_close_fp (design.md), TF32 off; low precision scale-relative
(atol = eps(dtype) * max|ref64|: the gradients are O(1 / (N L D))). Outputs are written into
allocator blocks poisoned with NaN first; every output must be finite.
"""
from __future__ import annotations

import importlib

import pytest
import torch
from op_helpers import GPU_BACKENDS as BACKENDS
from op_helpers import GPU_DTYPES as DTYPES
from op_helpers import GPU_MODULE_MARKS, amax, maxerr, need, no_tf32, poison  # noqa: F401  (no_tf32: a fixture)
from op_helpers import assert_close_fp

pytestmark = GPU_MODULE_MARKS
DEV = torch.device("cuda")


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
        assert_close_fp(res[i], r64[i], rlp[i], dtype, f"{name} {backend} {case} {dtype}", k=2 if i == 0 else 3,
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


@pytest.mark.parametrize("backend", BACKENDS)
def test_explicit_backend_does_not_run_reference(monkeypatch, backend):
    """An explicitly requested backend runs its kernels, not the torch reference."""
    need(PRL, backend)
    mod = importlib.import_module("maep_fast.ops.patch_recon_loss")  # the module (maep_fast.ops re-exports the function)
    monkeypatch.setattr(mod, "patch_recon_loss_reference",
                        lambda *a, **k: pytest.fail(f"backend={backend!r} ran the reference"))
    pred, imgs, length = prl_inputs((2, 3, 8, 8, 4), torch.float32)
    loss = mod.patch_recon_loss(pred, imgs, None, patch_size=4, backend=backend)
    torch.cuda.synchronize()
    assert loss.shape == () and torch.isfinite(loss)
