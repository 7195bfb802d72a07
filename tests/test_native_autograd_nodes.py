"""The autograd nodes the native differentiable ops record (csrc/autograd_node.h:
PatchReconLossBackward, MaskedPatchAttentionBackward) behave as autograd nodes must,
beyond the gradient values the op tests check: edges only to the differentiable
inputs, freed saved tensors (backward twice), in-place changes to saved tensors
detected, double backward as the autograd fallback gives it (warns, no second-order
term), forward-mode AD refused, and compiled autograd (torch._dynamo.compiled_autograd)
through both nodes. Also: the ops' eager native calls leave the argument checks to the
op, so what no kernel sees (a meta mask) is refused by the fakes, and a refused call
raises the Python checks' error, naming the argument. Skips when maep_fast._C is not built.
"""
from __future__ import annotations

import warnings

import pytest
import torch

from maep_fast import native_available
from maep_fast._native import native_unavailable_reason  # the reason has no public name
from maep_fast.ops import masked_patch_attention, patch_recon_loss

NATIVE = native_available() and hasattr(torch.ops.maep_fast, "masked_patch_attention")
pytestmark = pytest.mark.skipif(not NATIVE, reason=f"maep_fast._C is not built ({native_unavailable_reason()})")


def _loss_inputs(dtype=torch.float64):
    pred = torch.rand(2, 16, 12, dtype=dtype, requires_grad=True)
    imgs = torch.rand(2, 3, 8, 8, dtype=dtype, requires_grad=True)
    mask = (torch.rand(2, 16) < 0.75).to(dtype)
    return pred, imgs, mask


def _attention_inputs(dtype=torch.float64):
    q, k, v = (torch.rand(2, 2, 5, 8, dtype=dtype, requires_grad=True) for _ in range(3))
    keep = torch.tensor([[True, False, True, True, False], [True, True, True, True, True]])
    return q, k, v, keep


def _loss(pred, imgs, mask):
    return patch_recon_loss(pred, imgs, mask, patch_size=2, backend="cpp")


def _attention(q, k, v, keep):
    return masked_patch_attention(q, k, v, keep, backend="cpp")


def test_edges_only_to_the_differentiable_inputs():
    pred, imgs, mask = _loss_inputs()
    fn = _loss(pred, imgs, mask).grad_fn
    assert fn.name() == "PatchReconLossBackward"
    assert [type(f).__name__ for f, _ in fn.next_functions] == ["AccumulateGrad", "AccumulateGrad"]
    q, k, v, keep = _attention_inputs()
    fn = _attention(q, k.detach(), v, keep).grad_fn
    assert fn.name() == "MaskedPatchAttentionBackward"
    assert [f is None for f, _ in fn.next_functions] == [False, True, False]
    assert _attention(q.detach(), k.detach(), v.detach(), keep).grad_fn is None
    with torch.no_grad():
        assert _loss(pred, imgs, mask).grad_fn is None


def test_saved_tensors_are_freed_and_version_checked():
    pred, imgs, mask = _loss_inputs()
    loss = _loss(pred, imgs, mask)
    loss.backward(retain_graph=True)
    loss.backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()
    q, k, v, keep = _attention_inputs()
    out = _attention(q, k, v, keep)
    out.mul_(2)  # out is saved for the backward
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()
    x = q.detach().clone().requires_grad_(True)
    xq = x * 1
    out = _attention(xq, k, v, keep)
    xq.add_(1)  # so is q
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_double_backward_goes_through_the_autograd_fallback():
    pred, imgs, mask = _loss_inputs()
    (g,) = torch.autograd.grad(_loss(pred, imgs, mask), imgs, create_graph=True)
    with pytest.warns(UserWarning, match="patch_recon_loss_backward: an autograd kernel was not registered"):
        torch.autograd.grad(g.sum(), imgs, allow_unused=True)
    q, k, v, keep = _attention_inputs()
    (g,) = torch.autograd.grad(_attention(q, k, v, keep).sum(), q, create_graph=True)
    with pytest.warns(UserWarning, match="masked_patch_attention_bwd: an autograd kernel was not registered"):
        torch.autograd.grad(g.sum(), q, allow_unused=True)


def test_forward_mode_ad_is_refused():
    import torch.autograd.forward_ad as fwad

    q, k, v, keep = _attention_inputs()
    with fwad.dual_level(), pytest.raises(NotImplementedError, match="forward-mode AD"):
        _attention(fwad.make_dual(q, torch.ones_like(q)), k, v, keep)
    pred, imgs, mask = _loss_inputs()
    with fwad.dual_level(), pytest.raises(NotImplementedError, match="forward-mode AD"):
        _loss(fwad.make_dual(pred, torch.ones_like(pred)), imgs, mask)


def test_compiled_autograd_matches_eager():
    from torch._dynamo import compiled_autograd

    pred, imgs, mask = _loss_inputs(torch.float32)
    q, k, v, keep = _attention_inputs(torch.float32)
    leaves = [pred, imgs, q, v]

    def grads(k_):
        loss = _loss(pred, imgs, mask) + _attention(q, k_, v, keep).square().sum()
        return torch.autograd.grad(loss, leaves)

    want = grads(k.detach())
    torch._dynamo.reset()
    try:
        with compiled_autograd._enable(torch.compile(backend="eager")):
            got = grads(k.detach())
    finally:
        torch._dynamo.reset()
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("grad", [False, True])
def test_inputs_no_kernel_sees_are_checked_by_the_fakes(grad):
    pred, imgs, mask = _loss_inputs(torch.float32)
    q, k, v, keep = _attention_inputs(torch.float32)
    with torch.set_grad_enabled(grad):
        with pytest.raises(ValueError, match="mask is on meta"):
            patch_recon_loss(pred, imgs, mask.to("meta"), patch_size=2)
        with pytest.raises(ValueError, match="imgs is on meta"):
            patch_recon_loss(pred, imgs.detach().to("meta"), mask, patch_size=2)
        with pytest.raises(ValueError, match="keep is on meta"):
            masked_patch_attention(q, k, v, keep.to("meta"))


def test_refused_calls_raise_the_python_checks_error():
    pred, imgs, mask = _loss_inputs(torch.float32)
    q, k, v, keep = _attention_inputs(torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="pred must have shape") as info:
            patch_recon_loss(pred[:, :15], imgs, mask, patch_size=2)
        assert info.value.__suppress_context__  # the op's own message is not chained in
        with pytest.raises(TypeError, match="mask must be a torch.Tensor"):
            patch_recon_loss(pred, imgs, mask.tolist(), patch_size=2)
        with pytest.raises(ValueError, match="keep must have shape") as info:
            masked_patch_attention(q, k, v, keep[:, :4])
        assert info.value.__suppress_context__
        with pytest.raises(TypeError, match="k must be a torch.Tensor"):
            masked_patch_attention(q, k.tolist(), v, keep)
