"""HSIC in normalized-CCA form (the HSIC-bottleneck code MIMIR uses).

For X [m, dx], Y [m, dy] (rows = samples, flattened):

    D_ij   = ||x_i - x_j||^2
    K      = exp(-D / (2 sigma^2 dim))          Gaussian kernel, dim = number of features
    Kc     = K H,   H = I - (1/m) 1 1^T         (centred on the right, as in the reference code)
    R      = Kc (Kc + eps m I)^-1               eps = 1e-5
    HSIC   = sum_ij (R_x o R_y^T)_ij            normalized-CCA score

sigma = 5 and eps = 1e-5 are MIMIR's published values. ``hsic_normalized_cca``
returns NaN (never raises) when a matrix is singular or the value is not
finite; ``hsic_penalty`` then contributes 0, as MIMIR skips the term.
"""
from __future__ import annotations

import torch


def distmat(x: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances [m, m] (abs() guards tiny negative round-off)."""
    r = (x * x).sum(1, keepdim=True)
    return (r - 2 * x @ x.t() + r.t()).abs()


def gaussian_kernel_centered(x: torch.Tensor, sigma: float = 5.0) -> torch.Tensor:
    """K H with K = exp(-D / (2 sigma^2 dim)), H = I - 1/m."""
    m, dim = x.shape
    k = torch.exp(-distmat(x) / (2.0 * sigma * sigma * dim))
    h = torch.eye(m, device=x.device, dtype=x.dtype) - 1.0 / m
    return k @ h


def hsic_normalized_cca(x: torch.Tensor, y: torch.Tensor, sigma: float = 5.0, eps: float = 1e-5) -> torch.Tensor:
    """Scalar normalized-CCA HSIC between x [m, ...] and y [m, ...] (flattened per sample); NaN if ill-posed."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y need the same number of samples, got {x.shape[0]} and {y.shape[0]}")
    m = x.shape[0]
    xf = x.reshape(m, -1)
    yf = y.reshape(m, -1).to(xf.dtype)
    kx = gaussian_kernel_centered(xf, sigma)
    ky = gaussian_kernel_centered(yf, sigma)
    reg = eps * m * torch.eye(m, device=xf.device, dtype=xf.dtype)
    try:
        # Kc (Kc + cI)^-1 == (Kc + cI)^-1 Kc (both are functions of Kc): one solve, no explicit inverse
        rx = torch.linalg.solve(kx + reg, kx)
        ry = torch.linalg.solve(ky + reg, ky)
    except RuntimeError:  # singular
        return torch.full((), float("nan"), device=xf.device, dtype=xf.dtype)
    return (rx * ry.t()).sum()


def hsic_penalty(latent: torch.Tensor, x_adv: torch.Tensor, weight: float = 1e-5, sigma: float = 5.0,
                 eps: float = 1e-5) -> torch.Tensor:
    """``weight * HSIC(latent, x_adv)``, or 0 when the HSIC is not finite (the term is skipped)."""
    if weight == 0:
        return latent.new_zeros(())
    h = hsic_normalized_cca(latent.float(), x_adv.float(), sigma, eps)
    if not bool(torch.isfinite(h)):
        return latent.new_zeros(()).float()
    return weight * h
