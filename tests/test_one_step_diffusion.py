"""One-step diffusion purifier: diffuse to t* in closed form, one UNet evaluation
predicts x0. Exact with an exact noise predictor; runs on the DDPM UNet architecture (random weights,
small widths) with the right shape, range and dtype; deterministic with a seed."""
from __future__ import annotations

import pytest
import torch

from maep_fast.baselines.diffpure import DiffPure, OneStepDiffPure, ddpm_cifar10_unet
from test_diffpure import PointMassEps, _x0


def test_point_mass_is_exact_in_one_call():
    x0 = _x0()
    eps = PointMassEps(x0 * 2 - 1)
    dp = OneStepDiffPure(eps, t_star=0.1, seed=0)
    assert dp.sampler == "one_step" and dp.network_calls == 1
    x_adv = (x0 + (8 / 255) * torch.sign(torch.randn_like(x0))).clamp(0, 1)
    out = dp.purify(x_adv)
    assert eps.calls == 1  # one batch, one UNet evaluation
    # the exact eps of a point mass makes x0_hat = x0 from any x_t*: the adversarial offset is gone
    torch.testing.assert_close(out, x0, atol=2e-5, rtol=0)


def test_matches_single_step_ddim_and_the_formula():
    x0 = _x0(3, 3, 8)
    eps = PointMassEps(torch.zeros(1, 3, 8, 8))  # a smooth, non-trivial eps: (x_t - 0) / sigma
    one = OneStepDiffPure(eps, t_star=0.3, seed=5).purify(x0)
    ddim1 = DiffPure(eps, sampler="ddim", ddim_steps=1, t_star=0.3, seed=5).purify(x0)
    torch.testing.assert_close(one, ddim1, atol=1e-6, rtol=0)
    # by hand: z_t = alpha z + sigma n; x0_hat = (z_t - sigma eps(z_t)) / alpha
    dp = OneStepDiffPure(eps, t_star=0.3)
    z = x0 * 2 - 1
    n = torch.randn(z.shape, generator=torch.Generator().manual_seed(5))
    a, s = dp.sde.mean_coeff(0.3), dp.sde.std(0.3)
    zt = a * z + s * n
    want = (((zt - s * (zt / s)) / a + 1) / 2).clamp(0, 1)
    torch.testing.assert_close(one, want, atol=1e-6, rtol=0)


def test_real_unet_shape_range_dtype_and_seed():
    torch.manual_seed(0)
    unet = ddpm_cifar10_unet(block_out_channels=(32, 32, 32, 32), layers_per_block=1, sample_size=16)
    x = torch.rand(5, 3, 16, 16)
    dp = OneStepDiffPure(unet, seed=7, batch_size=2)  # chunks 2 + 2 + 1
    a, b = dp.purify(x), dp.purify(x)
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.isfinite(a).all() and float(a.min()) >= 0 and float(a.max()) <= 1
    torch.testing.assert_close(a, b, atol=0, rtol=0)  # seeded: a deterministic function of x
    assert not torch.equal(a, OneStepDiffPure(unet, seed=8, batch_size=2).purify(x))
    un = OneStepDiffPure(unet, seed=None)
    assert not torch.equal(un.purify(x), un.purify(x))  # unseeded: fresh diffusion noise per call
    half = dp.purify(x.to(torch.bfloat16))
    assert half.dtype == torch.bfloat16 and half.shape == x.shape
    with torch.autocast("cpu", dtype=torch.bfloat16):  # how bench/bench_purify.py runs its bf16 rows
        y = dp.purify(x)
    assert y.dtype == x.dtype and torch.isfinite(y).all()


def test_differentiable_and_arguments():
    x0 = _x0(2, 3, 8)
    dp = OneStepDiffPure(PointMassEps(x0 * 2 - 1), seed=0)
    x = x0.clone().requires_grad_(True)
    dp(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert "network_calls=1" in repr(dp)
    for kw in (dict(t_star=0.0), dict(t_star=1.5), dict(batch_size=0)):
        with pytest.raises(ValueError):
            OneStepDiffPure(PointMassEps(x0), **kw)
    with pytest.raises(ValueError, match="sampler"):
        DiffPure(PointMassEps(x0), sampler="one-step")
