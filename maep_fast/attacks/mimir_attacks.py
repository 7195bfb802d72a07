"""MIMIR's adaptive attacks, for an adversary who knows the defense (white-box on the ViT).

* ``pgd_feature``: label-free L-inf/L2 PGD that maximizes the squared distance between the
  encoder features of ``x_adv`` and of ``x`` (``model.forward_features`` by default: the
  pooled, normalized encoder output the classifier head reads).
* ``pgd_mi``: PGD on ``CE(model(x_adv), y) + mi_sign * mi_weight * HSIC(features(x_adv), x_adv)``:
  cross-entropy (summed over the chunk, as ``pgd_attack``) plus the mutual-information (normalized-CCA HSIC) term MIMIR penalizes during
  pretraining. ``mi_sign=-1`` (default) looks for examples that fool the classifier while keeping
  the features' dependence on the input low (where the defense was trained to be), ``+1`` pushes
  the dependence up. The HSIC is a batch statistic: it is computed over each chunk of
  ``batch_size`` images (the whole input by default); a non-finite HSIC contributes 0.

Both take images in [0, 1] [N, C, H, W], use a uniform random start (``generator`` seeds it),
step ``step_size`` and return ``x_adv`` with ``||x_adv - x|| <= eps`` clamped to [0, 1].
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from maep_fast._checks import check_images, check_nonneg_number, check_tensor
from maep_fast.attacks.pgd import random_start
from maep_fast.ops.pgd_step import NORMS, pgd_step_

__all__ = ["feature_distance", "hsic_normalized_cca", "mi_term", "pgd_feature", "pgd_mi"]


def hsic_normalized_cca(x: torch.Tensor, y: torch.Tensor, sigma: float = 5.0, eps: float = 1e-5) -> torch.Tensor:
    """The attacker's copy of the MI term MIMIR penalizes: ``maep_fast.train.hsic.hsic_normalized_cca``
    (normalized-CCA HSIC, Gaussian kernels exp(-D / (2 sigma^2 dim)), centred K H, regularizer
    eps * m); attacks sit below ``train`` in the layering, so it is restated here, and
    tests/test_mimir.py checks that the two agree. NaN when ill-posed."""
    m = x.shape[0]
    xf, yf = x.reshape(m, -1), y.reshape(m, -1).to(x.dtype)

    def centred(z):
        r = (z * z).sum(1, keepdim=True)
        k = torch.exp(-(r - 2 * z @ z.t() + r.t()).abs() / (2.0 * sigma * sigma * z.shape[1]))
        return k @ (torch.eye(m, device=z.device, dtype=z.dtype) - 1.0 / m)

    kx, ky = centred(xf), centred(yf)
    reg = eps * m * torch.eye(m, device=xf.device, dtype=xf.dtype)
    try:
        rx, ry = torch.linalg.solve(kx + reg, kx), torch.linalg.solve(ky + reg, ky)
    except RuntimeError:
        return torch.full((), float("nan"), device=xf.device, dtype=xf.dtype)
    return (rx * ry.t()).sum()


def _features_of(model: nn.Module, features: Callable | None) -> Callable:
    if features is not None:
        return features
    if not hasattr(model, "forward_features"):
        raise TypeError(f"{type(model).__name__} has no forward_features; pass features=")
    return model.forward_features


def _check(x, eps, step_size, steps, norm) -> tuple[float, float]:
    check_images(x, "x")
    eps = check_nonneg_number(eps, "eps")
    step_size = check_nonneg_number(step_size, "step_size")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got {steps!r}")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    return eps, step_size


def _chunks(n: int, batch_size: int | None):
    b = n if not batch_size else batch_size
    return [(k, min(n, k + b)) for k in range(0, n, b)]


@torch.no_grad()
def feature_distance(model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor,
                     features: Callable | None = None) -> torch.Tensor:
    """Per-sample squared L2 distance [N] between the features of ``x_adv`` and ``x``."""
    f = _features_of(model, features)
    return (f(x_adv) - f(x)).flatten(1).pow(2).sum(1)


def _ascend(xc: torch.Tensor, objective: Callable[[torch.Tensor], torch.Tensor], *, eps: float, step_size: float,
            steps: int, norm: str, random_init: bool, generator: torch.Generator | None) -> torch.Tensor:
    """``steps`` PGD ascent steps on the scalar ``objective(x_adv)`` from ``xc`` [n, C, H, W], projected
    to the ``norm`` ball of radius ``eps`` around ``xc`` and to [0, 1]."""
    x_adv = random_start(xc, eps, norm, generator) if random_init else xc.clone()
    for _ in range(steps):
        xg = x_adv.detach().requires_grad_(True)
        with torch.enable_grad():
            grad = torch.autograd.grad(objective(xg), xg)[0]
        x_adv = xg.detach()
        pgd_step_(x_adv, grad, xc, step_size, eps, norm=norm, direction=1, clamp=(0.0, 1.0))
    return x_adv


def pgd_feature(model: nn.Module, x: torch.Tensor, *, eps: float, step_size: float, steps: int = 20,
                norm: str = "linf", features: Callable | None = None, random_init: bool = True,
                generator: torch.Generator | None = None, batch_size: int | None = None) -> torch.Tensor:
    """PGD maximizing ``||features(x_adv) - features(x)||^2`` (summed over the batch); no labels."""
    eps, step_size = _check(x, eps, step_size, steps, norm)
    f = _features_of(model, features)
    x0 = x.detach()
    if eps == 0 or steps == 0:
        return x0.clone()
    out = []
    for a, b in _chunks(x0.shape[0], batch_size):
        xc = x0[a:b]
        with torch.no_grad():
            target = f(xc).detach()
        out.append(_ascend(xc, lambda xg, target=target: (f(xg) - target).flatten(1).pow(2).sum(),
                           eps=eps, step_size=step_size, steps=steps, norm=norm, random_init=random_init,
                           generator=generator))
    return torch.cat(out)


def mi_term(model: nn.Module, x_adv: torch.Tensor, features: Callable | None = None,
            sigma: float = 5.0) -> torch.Tensor:
    """HSIC(features(x_adv), x_adv) over the batch (normalized CCA, MIMIR's sigma 5); NaN if ill-posed."""
    f = _features_of(model, features)
    return hsic_normalized_cca(f(x_adv).flatten(1).float(), x_adv.flatten(1).float(), sigma=sigma)


def pgd_mi(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, step_size: float, steps: int = 20,
           mi_weight: float = 1.0, mi_sign: float = -1.0, sigma: float = 5.0, norm: str = "linf",
           features: Callable | None = None, random_init: bool = True, generator: torch.Generator | None = None,
           batch_size: int | None = None) -> torch.Tensor:
    """PGD maximizing CE (summed over the chunk, as ``pgd_attack``) + ``mi_sign * mi_weight * HSIC`` per chunk."""
    eps, step_size = _check(x, eps, step_size, steps, norm)
    check_tensor(y, "y", ndim=1, dtypes=(torch.int64, torch.int32))
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"y must have one label per image ({x.shape[0]}), got {y.shape[0]}")
    if mi_sign not in (-1, 1, -1.0, 1.0):
        raise ValueError(f"mi_sign must be +1 or -1, got {mi_sign!r}")
    f = _features_of(model, features)
    x0 = x.detach()
    if eps == 0 or steps == 0:
        return x0.clone()
    def objective(xg, yc):
        loss = F.cross_entropy(model(xg), yc, reduction="sum")
        if mi_weight and xg.shape[0] > 1:
            h = hsic_normalized_cca(f(xg).flatten(1).float(), xg.flatten(1).float(), sigma=sigma)
            if bool(torch.isfinite(h)):
                loss = loss + mi_sign * mi_weight * h
        return loss

    out = []
    for a, b in _chunks(x0.shape[0], batch_size):
        out.append(_ascend(x0[a:b], lambda xg, yc=y[a:b]: objective(xg, yc), eps=eps, step_size=step_size,
                           steps=steps, norm=norm, random_init=random_init, generator=generator))
    return torch.cat(out)
