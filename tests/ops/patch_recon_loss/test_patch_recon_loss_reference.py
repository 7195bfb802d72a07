"""The patch_recon_loss reference against a loop formula written independently here."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from maep_fast.ops import patch_recon_loss, unpatchify


def loop_loss(pred, imgs, mask, p, norm_pix, power, reduction):
    n, c, h, w = imgs.shape
    g = w // p
    err = torch.zeros(n, (h // p) * g, dtype=torch.float64)
    for i in range(n):
        for a in range(h // p):
            for b in range(g):
                t = imgs[i, :, a * p:(a + 1) * p, b * p:(b + 1) * p].permute(1, 2, 0).reshape(-1).double()
                if norm_pix:
                    t = (t - t.mean()) / (t.var() + 1e-6).sqrt()
                err[i, a * g + b] = (pred[i, a * g + b].double() - t).abs().pow(power).mean()
    m = torch.ones_like(err) if mask is None else mask.double()
    if reduction == "sum":
        return (err * m).sum()
    if reduction == "none":
        return err * m
    if reduction == "per_sample":
        return torch.stack([(err[i] * m[i]).sum() / m[i].sum() if m[i].sum() > 0 else torch.zeros((), dtype=torch.float64)
                            for i in range(n)])
    return (err * m).sum() / m.sum() if m.sum() > 0 else torch.zeros((), dtype=torch.float64)


@settings(deadline=None, max_examples=25)
@given(n=st.integers(1, 3), c=st.sampled_from([1, 3]), p=st.sampled_from([1, 2, 3]), gh=st.integers(1, 3),
       norm_pix=st.booleans(), power=st.sampled_from([1, 2]),
       reduction=st.sampled_from(["mean", "sum", "per_sample", "none"]), masked=st.sampled_from(["none", "random", "empty"]))
def test_patch_recon_loss_matches_loops(n, c, p, gh, norm_pix, power, reduction, masked):
    if norm_pix and p * p * c == 1:
        norm_pix = False  # one-pixel patches have no variance (unbiased var of 1 value is NaN)
    imgs = torch.rand(n, c, gh * p, gh * p, dtype=torch.float64, requires_grad=True)
    pred = torch.randn(n, gh * gh, p * p * c, dtype=torch.float64, requires_grad=True)
    mask = None if masked == "none" else (torch.rand(n, gh * gh) < 0.5).double() * (masked == "random")
    out = patch_recon_loss(pred, imgs, mask, patch_size=p, norm_pix=norm_pix, p=power, reduction=reduction)
    ref = loop_loss(pred.detach(), imgs.detach(), mask, p, norm_pix, power, reduction)
    torch.testing.assert_close(out.detach(), ref, rtol=1e-9, atol=1e-12)
    assert torch.isfinite(out).all()


def test_patch_recon_loss_gradients_to_pred_and_imgs():
    imgs = torch.rand(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    pred = torch.randn(2, 4, 12, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1.0, 0, 1, 0], [0, 1, 1, 1]], dtype=torch.float64)
    for power in (1, 2):
        f = lambda pr, im: patch_recon_loss(pr, im, mask, patch_size=2, norm_pix=True, p=power)  # noqa: E731
        assert torch.autograd.gradcheck(f, (pred, imgs))
        g_pred, g_imgs = torch.autograd.grad(f(pred, imgs), (pred, imgs))
        assert g_imgs.abs().sum() > 0 and g_pred.abs().sum() > 0


def test_l1_on_patches_equals_pixel_l1():
    imgs = torch.rand(3, 3, 8, 8)
    pred = torch.rand(3, 16, 12)
    out = patch_recon_loss(pred, imgs, None, patch_size=2, norm_pix=False, p=1)
    torch.testing.assert_close(out, torch.nn.functional.l1_loss(unpatchify(pred, 2, 3), imgs))


def test_patch_recon_loss_bad_inputs():
    imgs, pred = torch.rand(2, 1, 4, 4), torch.rand(2, 4, 4)
    with pytest.raises(ValueError, match="pred must have shape"):
        patch_recon_loss(torch.rand(2, 5, 4), imgs, patch_size=2)
    with pytest.raises(ValueError, match="mask must have shape"):
        patch_recon_loss(pred, imgs, torch.ones(2, 3), patch_size=2)
    with pytest.raises(ValueError, match="p must be"):
        patch_recon_loss(pred, imgs, patch_size=2, p=3)
    with pytest.raises(ValueError, match="reduction"):
        patch_recon_loss(pred, imgs, patch_size=2, reduction="avg")
    with pytest.raises(ValueError, match="divisible"):
        patch_recon_loss(pred, torch.rand(2, 1, 5, 5), patch_size=2)
    with pytest.raises(ValueError, match="backend"):
        patch_recon_loss(pred, imgs, patch_size=2, backend="fast")
