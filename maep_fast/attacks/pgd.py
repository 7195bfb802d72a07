"""Projected gradient descent (Madry et al.) on the fused ``pgd_step``.

``pgd_attack`` maximizes the cross-entropy of ``model`` (any differentiable
nn.Module mapping [N, C, H, W] images in [0, 1] to logits) within an L-inf or
L2 ball of radius ``eps`` around ``x``. Whether the attack is oblivious or
adaptive is decided by what ``model`` is: the bare classifier (oblivious) or
purifier + classifier end to end (adaptive, full gradient).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from maep_fast._checks import check_images, check_nonneg_number, check_tensor
from maep_fast.ops.pgd_step import NORMS, pgd_step_


def random_start(x: torch.Tensor, eps: float, norm: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """A uniform point of the L-inf ball, or a random direction of the L2 ball, clamped to [0, 1]."""
    if norm == "linf":
        noise = (torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1) * eps
    else:
        d = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        flat = d.reshape(x.shape[0], -1)
        r = torch.rand(x.shape[0], 1, generator=generator, device=x.device, dtype=x.dtype)
        d = (flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12) * r * eps).view_as(x)
        noise = d
    return (x + noise).clamp(0, 1)


def check_labels(y: torch.Tensor, logits: object) -> None:
    """Labels y [N] must be class indices of logits [N, K]: in [0, K). One host sync."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != y.shape[0]:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"model must return logits of shape [N={y.shape[0]}, num_classes], got {shape}")
    k = logits.shape[1]
    lo, hi = torch.stack(torch.aminmax(y.detach())).tolist()
    if lo < 0 or hi >= k:
        raise ValueError(f"y must hold class indices in [0, {k - 1}] (the model outputs {k} classes), "
                         f"got labels in [{lo}, {hi}]")


def pgd_attack(
    model: nn.Module | Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
    norm: str = "linf",
    random_init: bool = True,
    eot: int = 1,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Untargeted PGD: returns x_adv [N, C, H, W] with ||x_adv - x|| <= eps, in [0, 1].

    ``eot`` averages the gradient over that many forward passes (for
    randomized defenses); loss defaults to cross-entropy summed over the batch. With that
    default loss, ``y`` [N] must hold class indices of the model's logits [N, K]: checked
    once, on the first forward pass, before any backward.
    """
    check_images(x, "x")
    check_tensor(y, "y", ndim=1, dtypes=(torch.int64, torch.int32))
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"y must have one label per image ({x.shape[0]}), got {y.shape[0]}")
    eps = check_nonneg_number(eps, "eps")
    step_size = check_nonneg_number(step_size, "step_size")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got {steps!r}")
    if isinstance(eot, bool) or not isinstance(eot, int) or eot < 1:
        raise ValueError(f"eot must be a positive int, got {eot!r}")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    labels_unchecked = loss_fn is None
    loss_fn = loss_fn or (lambda logits, target: F.cross_entropy(logits, target, reduction="sum"))
    x0 = x.detach()
    if eps == 0 or steps == 0:
        return x0.clone()
    x_adv = random_start(x0, eps, norm, generator) if random_init else x0.clone()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        grad = torch.zeros_like(x_adv)
        for _ in range(eot):
            logits = model(x_adv)
            if labels_unchecked:
                check_labels(y, logits)
                labels_unchecked = False
            loss = loss_fn(logits, y)
            grad = grad + torch.autograd.grad(loss, x_adv)[0]
        x_adv = x_adv.detach()
        pgd_step_(x_adv, grad, x0, step_size, eps, norm=norm, direction=1, clamp=(0.0, 1.0), backend=backend)
    return x_adv
