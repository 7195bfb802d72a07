"""AutoAttack / APGD from ``torchattacks`` behind one function.

``torchattacks`` is optional: importing this module works without it, and a
call raises an ImportError that says how to install it.

* ``attack="autoattack", version="standard"``: APGD-CE, APGD-T, FAB-T, Square
  (Croce & Hein 2020), applied in sequence, each only to the samples still
  classified correctly (the per-sample minimum of the ensemble).
* ``attack="autoattack", version="rand"``: APGD-CE and APGD-DLR with EOT
  (default 20): AutoAttack's version for randomized defenses.
* ``attack="apgd"`` (APGD-CE) / ``"apgd-t"`` (APGD-T, targeted DLR).

Norms: ``"linf"`` / ``"l2"`` (maep_fast names) or ``"Linf"`` / ``"L2"``.
``steps`` (APGD/FAB iterations; AutoAttack's default is 100) and
``n_queries`` (Square; default 5000) are exposed so small smoke runs are
possible; the standard evaluation keeps the defaults.
"""
from __future__ import annotations

import torch
import torch.nn as nn

ATTACKS = ("autoattack", "apgd", "apgd-t")
_NORMS = {"linf": "Linf", "l2": "L2", "Linf": "Linf", "L2": "L2"}


def _torchattacks():
    try:
        import torchattacks
    except ImportError as exc:  # pragma: no cover - exercised only without the package
        raise ImportError(
            "AutoAttack/APGD need the optional package 'torchattacks' (pip install torchattacks==3.5.1); "
            "maep_fast's own PGD (attack='pgd') works without it"
        ) from exc
    return torchattacks


def build_attack(model: nn.Module, attack: str = "autoattack", *, norm: str = "linf", eps: float = 8 / 255,
                 version: str = "standard", steps: int = 100, eot: int | None = None, n_classes: int = 10,
                 n_queries: int = 5000, n_restarts: int = 1, seed: int = 0):
    """A torchattacks Attack object (callable as ``atk(images, labels)``)."""
    ta = _torchattacks()
    if attack not in ATTACKS:
        raise ValueError(f"attack must be one of {ATTACKS}, got {attack!r}")
    if norm not in _NORMS:
        raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")
    tn = _NORMS[norm]
    need = 4 if (attack == "apgd-t" or (attack == "autoattack" and version == "standard")) else (
        3 if attack == "autoattack" else 2)
    if n_classes < need:
        raise ValueError(f"{attack} ({version}) uses the DLR loss and needs at least {need} classes, got n_classes={n_classes}")
    if attack == "apgd":
        return ta.APGD(model, norm=tn, eps=eps, steps=steps, n_restarts=n_restarts, seed=seed, loss="ce",
                       eot_iter=eot or 1)
    if attack == "apgd-t":
        return ta.APGDT(model, norm=tn, eps=eps, steps=steps, n_restarts=n_restarts, seed=seed, eot_iter=eot or 1,
                        n_classes=n_classes)
    if version == "standard":
        e = eot or 1
        parts = [
            ta.APGD(model, norm=tn, eps=eps, steps=steps, n_restarts=n_restarts, seed=seed, loss="ce", eot_iter=e),
            ta.APGDT(model, norm=tn, eps=eps, steps=steps, n_restarts=n_restarts, seed=seed, eot_iter=e,
                     n_classes=n_classes),
            ta.FAB(model, norm=tn, eps=eps, steps=steps, n_restarts=n_restarts, seed=seed, multi_targeted=True,
                   n_classes=n_classes),
            ta.Square(model, norm=tn, eps=eps, n_queries=n_queries, n_restarts=n_restarts, seed=seed),
        ]
    elif version == "rand":
        e = eot or 20
        parts = [
            ta.APGD(model, norm=tn, eps=eps, steps=steps, n_restarts=n_restarts, seed=seed, loss="ce", eot_iter=e),
            ta.APGD(model, norm=tn, eps=eps, steps=steps, n_restarts=n_restarts, seed=seed, loss="dlr", eot_iter=e),
        ]
    else:
        raise ValueError(f"version must be 'standard' or 'rand', got {version!r}")
    return ta.MultiAttack(parts)


def attack_name(attack: str, version: str = "standard", steps: int = 100) -> str:
    if attack == "autoattack":
        return f"AutoAttack-{version}"
    return f"{'APGD-CE' if attack == 'apgd' else 'APGD-T'}-{steps}"


def effective_eot(attack: str, version: str, eot: int | None) -> int:
    if attack == "autoattack" and version == "rand":
        return eot or 20
    return eot or 1


def run_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: str = "autoattack", **kwargs) -> torch.Tensor:
    """Adversarial examples for (x [N, C, H, W] in [0, 1], y [N]) under ``build_attack(model, attack, **kwargs)``."""
    atk = build_attack(model, attack, **kwargs)
    with torch.enable_grad():
        x_adv = atk(x.detach(), y.detach())
    return x_adv.detach()
