"""DiffPure-style diffusion purifier (Nie et al., 2022) on a diffusers ``UNet2DModel``.

The baseline every purifier in this package is timed against (see
``bench/bench_purify.py``). Facts from the paper / NVlabs/DiffPure
(docs/methods.md): VP-SDE with beta in [0.1, 20], diffuse the input to t* = 0.1
in closed form, integrate the reverse SDE with Euler-Maruyama steps of
dt = 1e-3 (100 score evaluations per image).

VP-SDE (Song et al., 2021), t in [0, 1]::

    dx = -1/2 beta(t) x dt + sqrt(beta(t)) dW,       beta(t) = bmin + t (bmax - bmin)
    x_t | x_0 ~ N(alpha(t) x_0, sigma(t)^2 I)
    alpha(t) = exp(-1/4 t^2 (bmax - bmin) - 1/2 t bmin),  sigma(t) = sqrt(1 - alpha(t)^2)

The network is a noise predictor eps_theta(x_t, 999 t) (score_sde's continuous
VP labels, the DDPM code path of DiffPure); the score is
-eps_theta / sigma(t). Samplers:

- ``"sde"``: reverse-time Euler-Maruyama from t* to 0 with ``dt``
  (x <- x + [1/2 beta x + beta score] dt + sqrt(beta dt) z), evaluated at
  t*, t* - dt, ..., dt: round(t*/dt) network calls, the last step keeps its
  noise (torchsde's Euler, as DiffPure).
- ``"ddim"``: deterministic DDIM (eta = 0) in ``ddim_steps`` equal steps of
  t from t* to 0 with the VP marginals: x0_hat = (x - sigma eps) / alpha,
  x <- alpha' x0_hat + sigma' eps. Few-step, not in DiffPure's paper: a
  faster variant for comparison.
- ``"one_step"``: one reverse evaluation from t*: diffuse x to x_{t*} in
  closed form, then predict x0 from the noise estimate in one step,
  x0_hat = (x_{t*} - sigma(t*) eps_theta(x_{t*}, t*)) / alpha(t*) (DDIM with a
  single step to t = 0). One UNet call per image: the cost of the
  consistency-distilled one-step purifiers (OSCP, DBLP), which map x_{t*} to
  x0 with one network evaluation of a distilled model. With an undistilled
  noise predictor the x0 estimate is blurrier than theirs; for timing the
  evaluation count and the network are what matter, and random weights do.
  ``OneStepDiffPure`` is this sampler by name.

Weights: ``ddpm_cifar10_unet()`` builds the architecture of the DDPM CIFAR-10
model (``google/ddpm-cifar10-32``: 35.7 M parameters) with random weights;
nothing is downloaded. Load trained weights yourself
(``unet.load_state_dict(...)`` or ``UNet2DModel.from_pretrained(path)``) to
purify for real; random weights are enough for timing.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from maep_fast._checks import check_images

DDPM_CIFAR10_CONFIG = dict(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    layers_per_block=2,
    block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    act_fn="silu",
    attention_head_dim=None,
    center_input_sample=False,
    downsample_padding=0,
    flip_sin_to_cos=False,
    freq_shift=1,
    mid_block_scale_factor=1,
    norm_eps=1e-6,
    norm_num_groups=32,
    time_embedding_type="positional",
)


def ddpm_cifar10_unet(**overrides) -> nn.Module:
    """diffusers ``UNet2DModel`` in the DDPM CIFAR-10 configuration (35.7 M parameters), random init.

    ``overrides`` replace configuration fields (e.g. ``block_out_channels`` for a small test model).
    """
    try:
        from diffusers import UNet2DModel
    except ImportError as exc:  # pragma: no cover - diffusers is a declared dependency
        raise ImportError("the DiffPure baseline needs diffusers (pip install diffusers)") from exc
    return UNet2DModel(**{**DDPM_CIFAR10_CONFIG, **overrides})


def _as_t(t, ref: torch.Tensor | None = None) -> torch.Tensor:
    if isinstance(t, torch.Tensor):
        return t.to(torch.float64 if ref is None else ref.dtype)
    return torch.tensor(float(t), dtype=torch.float64 if ref is None else ref.dtype,
                        device=None if ref is None else ref.device)


class VPSDE:
    """Variance-preserving SDE with a linear beta schedule on t in [0, 1] (closed forms)."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
        if not (math.isfinite(beta_min) and math.isfinite(beta_max)) or not 0 <= beta_min <= beta_max or beta_max <= 0:
            raise ValueError(f"need 0 <= beta_min <= beta_max, beta_max > 0; got beta_min={beta_min}, beta_max={beta_max}")
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)

    def __repr__(self) -> str:
        return f"VPSDE(beta_min={self.beta_min}, beta_max={self.beta_max})"

    def beta(self, t):
        """beta(t) = bmin + t (bmax - bmin)."""
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def integral_beta(self, t):
        """int_0^t beta(s) ds = bmin t + 1/2 t^2 (bmax - bmin)."""
        return self.beta_min * t + 0.5 * t * t * (self.beta_max - self.beta_min)

    def log_mean_coeff(self, t):
        """log alpha(t) = -1/4 t^2 (bmax - bmin) - 1/2 t bmin."""
        return -0.25 * t * t * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def mean_coeff(self, t):
        """alpha(t): x_t = alpha(t) x_0 + sigma(t) z."""
        lm = self.log_mean_coeff(t)
        return torch.exp(lm) if isinstance(lm, torch.Tensor) else math.exp(lm)

    def std(self, t):
        """sigma(t) = sqrt(1 - alpha(t)^2) (computed with expm1 for small t)."""
        lm = self.log_mean_coeff(t)
        if isinstance(lm, torch.Tensor):
            return torch.sqrt(-torch.expm1(2 * lm))
        return math.sqrt(-math.expm1(2 * lm))

    def marginal(self, x0: torch.Tensor, t):
        """(mean, std) of x_t | x_0."""
        return self.mean_coeff(t) * x0, self.std(t)

    def sde(self, x: torch.Tensor, t):
        """Forward (drift, diffusion): (-1/2 beta(t) x, sqrt(beta(t)))."""
        b = self.beta(t)
        return -0.5 * b * x, (torch.sqrt(b) if isinstance(b, torch.Tensor) else math.sqrt(b))


SAMPLERS = ("sde", "ddim", "one_step")


class DiffPure(nn.Module):
    """x [N, C, H, W] in [0, 1] -> purified [N, C, H, W] in [0, 1].

    ``unet(sample, timestep)`` predicts the noise eps; it may return a tensor or
    an object with ``.sample`` (diffusers). Any ``UNet2DModel`` works; its input
    is the image scaled to [-1, 1]. ``seed=None``: fresh noise from the global
    RNG every call (a randomized defense: attack it with EOT); ``seed=k``: a
    private generator re-seeded per call (deterministic function of x).
    ``forward`` is differentiable (through all network calls: memory grows
    with the number of steps); ``purify`` runs without gradients in chunks of
    ``batch_size``.
    """

    randomized = True

    def __init__(self, unet: nn.Module, t_star: float = 0.1, dt: float = 1e-3, sampler: str = "sde",
                 ddim_steps: int = 5, seed: int | None = None, beta_min: float = 0.1, beta_max: float = 20.0,
                 timestep_scale: float = 999.0, batch_size: int = 64):
        super().__init__()
        if not isinstance(unet, nn.Module):
            raise TypeError(f"unet must be an nn.Module (e.g. diffusers UNet2DModel), got {type(unet).__name__}")
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        for name, v in (("t_star", t_star), ("dt", dt)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
        if not 0 < t_star <= 1:
            raise ValueError(f"t_star must be in (0, 1], got {t_star}")
        if not 0 < dt <= t_star:
            raise ValueError(f"dt must be in (0, t_star={t_star}], got {dt}")
        if isinstance(ddim_steps, bool) or not isinstance(ddim_steps, int) or ddim_steps < 1:
            raise ValueError(f"ddim_steps must be a positive int, got {ddim_steps!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.unet = unet.eval()
        self.sde = VPSDE(beta_min, beta_max)
        self.t_star, self.dt, self.sampler, self.ddim_steps = float(t_star), float(dt), sampler, ddim_steps
        self.seed, self.timestep_scale, self.batch_size = seed, float(timestep_scale), batch_size

    def extra_repr(self) -> str:
        return (f"sampler={self.sampler!r}, t_star={self.t_star}, dt={self.dt}, ddim_steps={self.ddim_steps}, "
                f"network_calls={self.network_calls}, seed={self.seed}, {self.sde!r}")

    @property
    def sde_steps(self) -> int:
        """Euler-Maruyama steps of the reverse SDE: round(t*/dt) (100 for 0.1 / 1e-3)."""
        return max(1, round(self.t_star / self.dt))

    @property
    def network_calls(self) -> int:
        """UNet evaluations per image."""
        if self.sampler == "one_step":
            return 1
        return self.sde_steps if self.sampler == "sde" else self.ddim_steps

    # ----------------------------------------------------------------- pieces
    def _generator(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None:
            return None
        return torch.Generator(device=device).manual_seed(int(self.seed))

    def _in_channels(self) -> int | None:
        cfg = getattr(self.unet, "config", None)
        c = getattr(cfg, "in_channels", None) if cfg is not None else None
        if c is None and isinstance(cfg, dict):
            c = cfg.get("in_channels")
        return c

    def eps(self, x: torch.Tensor, t: float) -> torch.Tensor:
        """eps_theta(x, t) in fp32 (the UNet may run under autocast)."""
        ts = torch.full((x.shape[0],), t * self.timestep_scale, device=x.device, dtype=torch.float32)
        out = self.unet(x, ts)
        out = getattr(out, "sample", out)
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            raise ValueError(f"unet must return eps with the shape of its input {list(x.shape)}, "
                             f"got {getattr(out, 'shape', type(out).__name__)}")
        return out.float()

    def score(self, x: torch.Tensor, t: float) -> torch.Tensor:
        """grad_x log p_t(x) = -eps_theta(x, t) / sigma(t)."""
        return -self.eps(x, t) / self.sde.std(t)

    def _randn(self, like: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        return torch.randn(like.shape, generator=gen, device=like.device, dtype=like.dtype)

    def diffuse(self, x: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        """x in [-1, 1] -> a sample of x_{t*} | x (closed form)."""
        mean, std = self.sde.marginal(x, self.t_star)
        return mean + std * self._randn(x, gen)

    def reverse_sde(self, x: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        """Euler-Maruyama on the reverse VP-SDE from t* down to 0."""
        n = self.sde_steps
        h = self.t_star / n
        for i in range(n):
            t = self.t_star - i * h
            b = self.sde.beta(t)
            drift = 0.5 * b * x + b * self.score(x, t)  # -(f - g^2 score), time runs backwards
            x = x + drift * h + math.sqrt(b * h) * self._randn(x, gen)
        return x

    def reverse_ddim(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic DDIM (eta = 0) from t* to 0 in ``ddim_steps`` equal steps of t."""
        k = self.ddim_steps
        ts = [self.t_star * (1 - i / k) for i in range(k + 1)]
        for t, t_next in zip(ts[:-1], ts[1:]):
            eps = self.eps(x, t)
            x0_hat = (x - self.sde.std(t) * eps) / self.sde.mean_coeff(t)
            x = self.sde.mean_coeff(t_next) * x0_hat + self.sde.std(t_next) * eps
        return x

    def reverse_one_step(self, x: torch.Tensor) -> torch.Tensor:
        """x_{t*} -> x0_hat = (x - sigma(t*) eps_theta(x, t*)) / alpha(t*): one network evaluation."""
        t = self.t_star
        return (x - self.sde.std(t) * self.eps(x, t)) / self.sde.mean_coeff(t)

    def _check(self, x: torch.Tensor) -> torch.Tensor:
        c = self._in_channels()
        x = check_images(x, "x", channels=c)
        try:
            dev = next(self.unet.parameters()).device
        except StopIteration:
            dev = x.device
        if x.device != dev:
            raise ValueError(f"x is on {x.device} but the unet is on {dev}")
        return x

    def _run(self, x: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        dtype = x.dtype
        z = x.float() * 2 - 1
        z = self.diffuse(z, gen)
        if self.sampler == "sde":
            z = self.reverse_sde(z, gen)
        elif self.sampler == "ddim":
            z = self.reverse_ddim(z)
        else:
            z = self.reverse_one_step(z)
        return ((z + 1) / 2).clamp(0.0, 1.0).to(dtype)

    # ---------------------------------------------------------------- public
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Differentiable purification of the whole batch (no chunking)."""
        self._check(x)
        return self._run(x, self._generator(x.device))

    @torch.no_grad()
    def purify(self, x: torch.Tensor) -> torch.Tensor:
        """Purify any number of images without gradients, ``batch_size`` at a time."""
        self._check(x)
        gen = self._generator(x.device)
        return torch.cat([self._run(x[k:k + self.batch_size], gen) for k in range(0, x.shape[0], self.batch_size)])


class OneStepDiffPure(DiffPure):
    """One-step diffusion purifier: ``DiffPure(unet, sampler="one_step")`` (see the module docstring).

    Diffuse to ``t_star`` (default 0.1, DiffPure's) in closed form, then one UNet evaluation
    predicts x0 -- what a consistency-distilled purifier (OSCP, DBLP) costs per image. ``seed``:
    as DiffPure (the diffusion noise is the only randomness).
    """

    def __init__(self, unet: nn.Module, t_star: float = 0.1, seed: int | None = None, beta_min: float = 0.1,
                 beta_max: float = 20.0, timestep_scale: float = 999.0, batch_size: int = 64):
        super().__init__(unet, t_star=t_star, dt=t_star, sampler="one_step", seed=seed, beta_min=beta_min,
                         beta_max=beta_max, timestep_scale=timestep_scale, batch_size=batch_size)
