"""DiffPure baseline: VP-SDE closed forms, the DDPM CIFAR-10 UNet size, and both samplers
driven by *exact* noise predictors (point-mass and Gaussian data), where the right answer is known."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from maep_fast.baselines import DiffPure, VPSDE, ddpm_cifar10_unet

BMIN, BMAX = 0.1, 20.0


# --------------------------------------------------------------- schedule
@pytest.mark.parametrize("t", [0.0, 1e-3, 0.05, 0.1, 0.3, 0.7, 1.0])
def test_vpsde_closed_forms(t):
    sde = VPSDE()
    beta = BMIN + t * (BMAX - BMIN)
    assert sde.beta(t) == pytest.approx(beta, rel=1e-12)
    # integral of beta, by a fine trapezoid rule in float64
    s = torch.linspace(0, t, 20001, dtype=torch.float64)
    integral = float(torch.trapezoid(BMIN + s * (BMAX - BMIN), s)) if t > 0 else 0.0
    assert sde.integral_beta(t) == pytest.approx(integral, rel=1e-9, abs=1e-15)
    alpha = math.exp(-0.25 * t * t * (BMAX - BMIN) - 0.5 * t * BMIN)
    assert sde.mean_coeff(t) == pytest.approx(alpha, rel=1e-12)
    assert sde.mean_coeff(t) == pytest.approx(math.exp(-0.5 * integral), rel=1e-9)
    assert sde.std(t) == pytest.approx(math.sqrt(1 - alpha**2), rel=1e-9, abs=1e-12)
    # tensor inputs give the same numbers
    tt = torch.tensor([t], dtype=torch.float64)
    assert float(sde.mean_coeff(tt)) == pytest.approx(alpha, rel=1e-12)
    assert float(sde.std(tt)) == pytest.approx(math.sqrt(1 - alpha**2), rel=1e-9, abs=1e-12)
    assert float(sde.mean_coeff(tt) ** 2 + sde.std(tt) ** 2) == pytest.approx(1.0, abs=1e-12)


def test_vpsde_known_values_and_derivative():
    sde = VPSDE()
    # t* = 0.1: alpha = exp(-0.04975 - 0.005), the noise DiffPure adds (about 0.32 on [-1, 1] pixels)
    assert sde.mean_coeff(0.1) == pytest.approx(math.exp(-0.05475), rel=1e-12)
    assert sde.std(0.1) == pytest.approx(0.32196, abs=1e-4)
    assert sde.mean_coeff(0.0) == 1.0 and sde.std(0.0) == 0.0
    # d/dt log alpha = -beta/2 (the forward SDE's drift)
    for t in (0.02, 0.1, 0.5):
        h = 1e-6
        d = (sde.log_mean_coeff(t + h) - sde.log_mean_coeff(t - h)) / (2 * h)
        assert d == pytest.approx(-0.5 * sde.beta(t), rel=1e-6)
    drift, diff = sde.sde(torch.ones(2), 0.1)
    assert torch.allclose(drift, torch.full((2,), -0.5 * sde.beta(0.1)))
    assert diff == pytest.approx(math.sqrt(sde.beta(0.1)))
    with pytest.raises(ValueError):
        VPSDE(beta_min=1.0, beta_max=0.5)


# ------------------------------------------------------------------ UNet
def test_ddpm_cifar10_unet_size():
    unet = ddpm_cifar10_unet()
    n = sum(p.numel() for p in unet.parameters())
    assert abs(n - 35.7e6) <= 0.1e6, n
    assert unet.config.sample_size == 32 and unet.config.in_channels == 3


# ------------------------------------------------- exact noise predictors
class PointMassEps(nn.Module):
    """Exact eps for data = the single image x0 (in [-1, 1]): eps*(x_t, t) = (x_t - alpha(t) x0) / sigma(t)."""

    def __init__(self, x0: torch.Tensor, scale: float = 999.0):
        super().__init__()
        self.register_buffer("x0", x0)
        self.sde, self.scale, self.calls = VPSDE(), scale, 0

    def forward(self, sample, timestep):
        self.calls += 1
        t = (timestep.double() / self.scale).view(-1, 1, 1, 1)
        a, s = self.sde.mean_coeff(t).float(), self.sde.std(t).float()
        return SimpleNamespace(sample=(sample - a * self.x0) / s)


class GaussianEps(nn.Module):
    """Exact eps for data ~ N(mu, sig^2) per pixel: eps* = s (x_t - a mu) / (a^2 sig^2 + s^2)."""

    def __init__(self, mu: float, sig: float, scale: float = 999.0):
        super().__init__()
        self.mu, self.sig, self.sde, self.scale = mu, sig, VPSDE(), scale
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, sample, timestep):
        t = (timestep.double() / self.scale).view(-1, 1, 1, 1)
        a, s = self.sde.mean_coeff(t).float(), self.sde.std(t).float()
        return SimpleNamespace(sample=s * (sample - a * self.mu) / (a * a * self.sig**2 + s * s))


def _x0(n=4, c=3, s=16):
    return torch.rand(n, c, s, s) * 0.6 + 0.2  # image space, away from the clamp


def test_sde_point_mass_moves_back_to_x0():
    x0 = _x0()
    eps = PointMassEps(x0 * 2 - 1)
    dp = DiffPure(eps, sampler="sde", seed=0)
    assert dp.sde_steps == 100 and dp.network_calls == 100
    out = dp.purify(x0)
    assert eps.calls == 100
    # distance of the diffused point (what the reverse SDE starts from), in image units
    noised = (dp.diffuse(x0 * 2 - 1, torch.Generator().manual_seed(1)) + 1) / 2
    d_noised = (noised - x0).pow(2).mean().sqrt()
    d_out = (out - x0).pow(2).mean().sqrt()
    assert d_noised > 0.15  # sigma(0.1)/2 ~ 0.16
    assert d_out < 0.1 * d_noised, (float(d_out), float(d_noised))


def test_sde_point_mass_from_an_adversarial_point():
    # a perturbed input (8/255 L-inf) is also pulled to the data point
    x0 = _x0()
    x_adv = (x0 + (8 / 255) * torch.sign(torch.randn_like(x0))).clamp(0, 1)
    out = DiffPure(PointMassEps(x0 * 2 - 1), seed=3).purify(x_adv)
    assert (out - x0).abs().mean() < 0.25 * (x_adv - x0).abs().mean()


def test_ddim_point_mass_is_exact():
    x0 = _x0()
    eps = PointMassEps(x0 * 2 - 1)
    dp = DiffPure(eps, sampler="ddim", ddim_steps=5, seed=0)
    out = dp.purify((x0 + 0.03 * torch.randn_like(x0)).clamp(0, 1))
    assert eps.calls == 5 and dp.network_calls == 5
    torch.testing.assert_close(out, x0, atol=2e-5, rtol=0)


def test_sde_gaussian_data_keeps_the_data_distribution():
    # with the exact score, diffuse + reverse SDE is a Markov kernel that preserves p_data
    mu, sig = 0.0, 0.1  # in [-1, 1] units -> image mean 0.5, std 0.05
    x = (0.5 + 0.5 * sig * torch.randn(8, 3, 32, 32)).clamp(0, 1)
    out = DiffPure(GaussianEps(mu, sig), sampler="sde", seed=0).purify(x)
    assert float(out.mean()) == pytest.approx(0.5, abs=0.003)
    assert float(out.std()) == pytest.approx(0.05, rel=0.05)
    # DDIM (probability-flow ODE, 5 steps) transports the marginal too, up to its discretization
    out = DiffPure(GaussianEps(mu, sig), sampler="ddim", seed=0).purify(x)
    assert float(out.mean()) == pytest.approx(0.5, abs=0.003)
    assert float(out.std()) == pytest.approx(0.05, rel=0.1)


# ----------------------------------------------------- API, shapes, inputs
def _small_unet():
    return ddpm_cifar10_unet(block_out_channels=(32, 32, 32, 32), layers_per_block=1)


def test_real_unet_small_shapes_range_and_seed():
    torch.manual_seed(0)
    unet = _small_unet()
    x = torch.rand(3, 3, 32, 32)
    for sampler in ("sde", "ddim"):
        dp = DiffPure(unet, sampler=sampler, t_star=0.1, dt=0.05, ddim_steps=2, seed=7, batch_size=2)
        a, b = dp.purify(x), dp.purify(x)
        assert a.shape == x.shape and a.dtype == x.dtype
        assert float(a.min()) >= 0 and float(a.max()) <= 1 and torch.isfinite(a).all()
        torch.testing.assert_close(a, b)  # seeded: a deterministic function of x
    dp = DiffPure(unet, sampler="sde", dt=0.05, seed=None)
    assert not torch.equal(dp.purify(x), dp.purify(x))  # unseeded: fresh noise per call


def test_forward_is_differentiable():
    x0 = _x0(2, 3, 8)
    dp = DiffPure(PointMassEps(x0 * 2 - 1), sampler="ddim", ddim_steps=2, seed=0)
    x = x0.clone().requires_grad_(True)
    dp(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_bad_inputs():
    unet = _small_unet()
    dp = DiffPure(unet, dt=0.05)
    with pytest.raises(ValueError, match="x must hold pixel values"):
        dp.purify(torch.rand(1, 3, 32, 32) * 2)
    with pytest.raises(ValueError, match="channel"):
        dp.purify(torch.rand(1, 1, 32, 32))
    with pytest.raises(ValueError, match="rank"):
        dp.purify(torch.rand(3, 32, 32))
    with pytest.raises(TypeError):
        dp.purify(torch.zeros(1, 3, 32, 32, dtype=torch.int64))
    with pytest.raises(ValueError, match="NaN"):
        dp.purify(torch.full((1, 3, 32, 32), float("nan")))
    with pytest.raises(TypeError):
        DiffPure(lambda x, t: x)
    for kw in (dict(sampler="ode"), dict(t_star=0.0), dict(t_star=1.5), dict(dt=0.0), dict(dt=0.2),
               dict(ddim_steps=0), dict(batch_size=0), dict(t_star=float("nan"))):
        with pytest.raises(ValueError):
            DiffPure(unet, **kw)
    wrong = PointMassEps(torch.zeros(1, 3, 8, 8))
    wrong.forward = lambda sample, timestep: SimpleNamespace(sample=sample[:, :1])
    with pytest.raises(ValueError, match="shape"):
        DiffPure(wrong, sampler="ddim", ddim_steps=1).purify(torch.rand(1, 3, 8, 8))
