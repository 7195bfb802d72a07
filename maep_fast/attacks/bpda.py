"""BPDA (Athalye et al., 2018), straight-through version: the forward pass is
the purifier, the backward pass is the identity.

``BPDA(purifier)(x) = x + (purifier(x) - x).detach()``: numerically equal to
``purifier(x)``, with d/dx = I. Put it in front of the classifier
(``nn.Sequential(BPDA(purifier), classifier)``, or ``bpda_model``) and attack
with EOT for randomized purifiers (the ``bpda-eot`` threat model).
"""
from __future__ import annotations

import torch
import torch.nn as nn


class BPDA(nn.Module):
    def __init__(self, purifier: nn.Module | None):
        super().__init__()
        self.purifier = purifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.purifier is None:
            return x
        with torch.no_grad():
            fn = getattr(self.purifier, "purify", None)
            out = fn(x.detach()) if callable(fn) else self.purifier(x.detach())
        return x + (out - x).detach()


def bpda_model(purifier: nn.Module | None, classifier: nn.Module) -> nn.Module:
    """classifier(BPDA(purifier)(x)): forward through the purifier, identity gradient."""
    return nn.Sequential(BPDA(purifier), classifier)
