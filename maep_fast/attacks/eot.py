"""Expectation over Transformation (Athalye et al., 2018) for randomized defenses.

Two forms:

* ``eot_grad(model, x, y, n, loss_fn)``: the gradient of the loss averaged
  over ``n`` stochastic forward passes (what ``pgd_attack(eot=n)`` does).
* ``EOT(model, n)``: an nn.Module whose forward returns the *mean logits* of
  ``n`` stochastic passes, so any gradient-based attack (torchattacks
  included) sees the averaged gradient of the logits. Predictions of a
  randomized defense should still be scored with a single stochastic pass
  (the deployed defense), not through this wrapper.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


class EOT(nn.Module):
    def __init__(self, model: nn.Module, n: int = 20):
        super().__init__()
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        self.model, self.n = model, n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        for _ in range(self.n - 1):
            out = out + self.model(x)
        return out / self.n


def eot_grad(model: nn.Module | Callable, x: torch.Tensor, y: torch.Tensor, n: int = 20,
             loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Mean over ``n`` passes of d loss(model(x), y) / dx (loss: summed cross-entropy)."""
    loss_fn = loss_fn or (lambda logits, t: F.cross_entropy(logits, t, reduction="sum"))
    xg = x.detach().requires_grad_(True)
    grad = torch.zeros_like(xg)
    for _ in range(n):
        grad += torch.autograd.grad(loss_fn(model(xg), y), xg)[0]
    return grad / n
