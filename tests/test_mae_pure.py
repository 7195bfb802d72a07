"""MAE-Pure: loss goes down, the eta-ball and [0, 1] hold, seeded determinism,
early stop, gradients, AMV diagnostic."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import tiny_mae
from maep_fast.purify.amv import attention_matrix_variation, decoder_attention_maps, save_amv_heatmap
from maep_fast.purify.mae_pure import MAEPure


@pytest.fixture(scope="module")
def mae():
    torch.manual_seed(0)
    return tiny_mae().eval()


def _mean_loss(pur, x, seed=123, reps=4):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return torch.stack([pur.recon_loss(x, g) for _ in range(reps)]).mean()


@pytest.mark.parametrize("norm_pix", [False, True])
def test_lowers_reconstruction_loss(norm_pix):
    torch.manual_seed(0)
    m = tiny_mae(norm_pix_loss=norm_pix).eval()
    x = torch.rand(6, 1, 8, 8)
    pur = MAEPure(m, steps=30, step_size=2 / 255, eta=16 / 255, mask_ratio=0.25, n_masks=2, seed=0)
    y = pur.purify(x)
    assert _mean_loss(pur, y) < _mean_loss(pur, x)


@settings(deadline=None, max_examples=10)
@given(eta=st.floats(0.0, 0.2), step=st.floats(0.0, 0.1), steps=st.integers(0, 6), n=st.integers(1, 3),
       n_masks=st.integers(1, 3), halve=st.booleans())
def test_stays_in_eta_ball_and_range(eta, step, steps, n, n_masks, halve):
    torch.manual_seed(0)
    m = tiny_mae().eval()
    x = torch.rand(n, 1, 8, 8)
    x[0, 0, 0, :4] = torch.tensor([0.0, 1.0, 0.0, 1.0])  # pixels at the box edges
    pur = MAEPure(m, steps=steps, step_size=step, eta=eta, n_masks=n_masks, halve_step=halve)
    y = pur.purify(x)
    assert y.shape == x.shape
    assert (y - x).abs().max() <= eta + 1e-6
    assert y.min() >= 0 and y.max() <= 1
    xg = x.clone().requires_grad_(True)
    z = pur(xg)  # differentiable path obeys the same constraints
    assert (z.detach() - x).abs().max() <= eta + 1e-6 and z.min() >= 0 and z.max() <= 1


def test_seeded_determinism_and_randomness(mae):
    x = torch.rand(4, 1, 8, 8)
    a = MAEPure(mae, steps=8, seed=7).purify(x)
    b = MAEPure(mae, steps=8, seed=7).purify(x)
    c = MAEPure(mae, steps=8, seed=8).purify(x)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert MAEPure(mae).randomized


def test_step_halving(mae):
    pur = MAEPure(mae, steps=10, step_size=0.02, halve_step=True)
    assert [pur.step_size_at(s) for s in (0, 4, 5, 9)] == [0.02, 0.02, 0.01, 0.01]
    assert MAEPure(mae, steps=10, step_size=0.02, halve_step=False).step_size_at(9) == 0.02


def test_early_stop_freezes_samples(mae):
    x = torch.rand(5, 1, 8, 8)
    pur = MAEPure(mae, steps=40, early_stop=1e9, seed=0)  # every change is "small": stop after 2 steps
    y = pur.purify(x)
    assert pur.last_steps_run.tolist() == [2] * 5
    assert (y - x).abs().max() <= 2 * pur.step_size + 1e-6
    full = MAEPure(mae, steps=40, early_stop=0.0, seed=0)
    full.purify(x)
    assert full.last_steps_run.tolist() == [40] * 5
    xg = x.clone().requires_grad_(True)
    pur(xg)
    assert pur.last_steps_run.tolist() == [2] * 5


def test_gradient_through_the_loop_matches_create_graph(mae):
    """d sign/dg = 0: the cheap graph gives the exact create_graph gradient."""
    x = torch.rand(3, 1, 8, 8)
    outs, grads = [], []
    for exact in (False, True):
        xg = x.clone().requires_grad_(True)
        out = MAEPure(mae, steps=4, step_size=0.05, eta=0.1, seed=3, exact_graph=exact)(xg)
        grads.append(torch.autograd.grad((out ** 2).sum(), xg)[0])
        outs.append(out.detach())
    assert torch.allclose(outs[0], outs[1], atol=1e-6)
    assert torch.allclose(grads[0], grads[1], atol=1e-5)
    assert grads[0].abs().sum() > 0
    assert torch.allclose(outs[0], MAEPure(mae, steps=4, step_size=0.05, eta=0.1, seed=3).purify(x), atol=1e-6)


def test_bad_arguments(mae):
    with pytest.raises(TypeError):
        MAEPure(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="mask_ratio"):
        MAEPure(mae, mask_ratio=0.0)
    with pytest.raises(ValueError, match="n_masks"):
        MAEPure(mae, n_masks=0)
    with pytest.raises(ValueError, match="eta"):
        MAEPure(mae, eta=-1.0)
    with pytest.raises(ValueError, match="8x8"):
        MAEPure(mae, steps=1).purify(torch.rand(1, 1, 16, 16))


def test_amv_zero_for_identical_and_positive_for_perturbed(mae, tmp_path):
    x = torch.rand(4, 1, 8, 8)
    maps = decoder_attention_maps(mae, x)
    assert len(maps) == len(mae.decoder_blocks) and maps[0].shape == (4, 2, 17, 17)
    assert torch.allclose(maps[0].sum(-1), torch.ones(4, 2, 17))
    assert all(not b.attn.keep_attn for b in mae.decoder_blocks)  # switches restored
    assert attention_matrix_variation(mae, x, x, mask_ratio=0.25).abs().max() < 1e-6
    x_adv = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    amv = attention_matrix_variation(mae, x, x_adv)
    assert amv.shape == (1,) and amv[0] > 0
    out = tmp_path / "amv.png"
    save_amv_heatmap(mae, x, x_adv, out, x_purified=MAEPure(mae, steps=2).purify(x_adv))
    assert out.stat().st_size > 1000
