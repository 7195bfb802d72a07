"""Purification, a MAEP training step and PGD, run fused (backend auto) and on the
pure-PyTorch reference path (fused=False / MAEP_FAST_BACKEND=torch), compared."""
import copy

import pytest
import torch

from conftest import tiny_mae
from maep_fast.attacks import pgd_attack
from maep_fast.ops._dispatch import requested_backend, resolve_backend
from maep_fast.purify import PurifiedClassifier, Purifier
from maep_fast.train.maep import maep_loss


def test_purification_both_ways():
    m = tiny_mae(in_chans=3)
    x = torch.rand(5, 3, 8, 8)
    fast = Purifier(copy.deepcopy(m), fused=True)
    ref = Purifier(copy.deepcopy(m), fused=False)
    assert ref.model.ops_backend == "torch" and fast.model.ops_backend == "auto"
    torch.testing.assert_close(fast.purify(x), ref.purify(x), rtol=1e-5, atol=1e-5)
    big = torch.rand(2, 3, 19, 11)
    torch.testing.assert_close(fast.purify(big), ref.purify(big), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ratio", [0.0, 0.5])
def test_training_step_both_ways(ratio):
    m = tiny_mae(in_chans=1)
    fast, ref = copy.deepcopy(m).set_backend("auto"), copy.deepcopy(m).set_backend("torch")
    x = torch.rand(6, 1, 8, 8)
    x_adv = (x + 0.05 * torch.randn_like(x)).clamp(0, 1)
    seed = torch.seed()
    torch.manual_seed(seed)
    lf, _ = maep_loss(fast, x_adv, x, ratio, 1.0, 0.5)
    lf.backward()
    torch.manual_seed(seed)  # same masks
    lr, _ = maep_loss(ref, x_adv, x, ratio, 1.0, 0.5)
    lr.backward()
    torch.testing.assert_close(lf, lr, rtol=1e-5, atol=1e-6)
    for (name, pf), (_, pr) in zip(fast.named_parameters(), ref.named_parameters()):
        if pf.grad is not None or pr.grad is not None:
            torch.testing.assert_close(pf.grad, pr.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_adaptive_pgd_both_ways():
    m = tiny_mae(in_chans=1)
    clf = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 4)).eval()
    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    out = []
    for fused, backend in ((True, "auto"), (False, "torch")):
        model = PurifiedClassifier(Purifier(copy.deepcopy(m), fused=fused), clf)
        g = torch.Generator().manual_seed(3)
        out.append(pgd_attack(model, x, y, eps=0.1, step_size=0.01, steps=3, generator=g, backend=backend))
    # sign() of nearly-equal gradients may differ where a component is ~0: allow a few pixels to differ
    diff = (out[0] - out[1]).abs()
    assert (diff > 1e-5).float().mean() < 0.02


def test_environment_variable_selects_reference_everywhere(monkeypatch):
    monkeypatch.setenv("MAEP_FAST_BACKEND", "torch")
    assert requested_backend("auto") == "torch"
    for op in ("pgd_step", "patch_recon_loss", "masked_patch_attention"):
        assert resolve_backend(op, "auto", torch.device("cpu")) == "torch"
    assert resolve_backend("pgd_step", "torch", torch.device("cpu")) == "torch"
    m = tiny_mae()
    calls = []
    import maep_fast.models.vit_blocks as vb
    real = vb.masked_patch_attention_reference
    monkeypatch.setattr(vb, "masked_patch_attention_reference", lambda *a, **k: calls.append(1) or real(*a, **k))
    m.reconstruct(torch.rand(2, 1, 8, 8))
    assert len(calls) == len(m.blocks) + len(m.decoder_blocks)
    monkeypatch.setenv("MAEP_FAST_BACKEND", "fast")
    with pytest.raises(ValueError, match="MAEP_FAST_BACKEND"):
        requested_backend("auto")


def test_explicit_unavailable_backend_raises():
    with pytest.raises(RuntimeError, match="cuda"):
        resolve_backend("pgd_step", "cuda", torch.device("cpu"))
    with pytest.raises(ValueError, match="backend must be one of"):
        tiny_mae().set_backend("fastest")
