"""Robust-accuracy evaluation under named threat models.

Every row of a report records: defense, threat_model, attack, norm, eps,
steps, step_size, eot, n (samples), accuracy. Threat models:

- ``none``:                 clean images, no attack.
- ``oblivious``:            PGD on the bare classifier; the purifier is applied after.
- ``adaptive-full-gradient``: PGD through purifier + classifier end to end.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from maep_fast.attacks.pgd import pgd_attack
from maep_fast.purify.maep import PurifiedClassifier


@dataclass
class AttackSpec:
    norm: str = "linf"
    eps: float = 8 / 255
    step_size: float = 2 / 255
    steps: int = 20
    eot: int = 1

    @property
    def name(self) -> str:
        return f"PGD-{self.steps}"


@torch.no_grad()
def _predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).argmax(1)


def evaluate(
    classifier: nn.Module,
    purifier: nn.Module | None,
    images: torch.Tensor,
    labels: torch.Tensor,
    attack: AttackSpec,
    batch_size: int = 256,
    seed: int = 0,
    progress: bool = True,
    keep_examples: int = 0,
) -> dict:
    """Accuracy of the undefended and purified classifier under each threat model.

    Returns {"rows": [...], "examples": {...}} where examples (first
    ``keep_examples`` images) hold clean / adversarial (oblivious) / purified tensors.
    """
    device = next(classifier.parameters()).device
    classifier.eval()
    defended = PurifiedClassifier(purifier, classifier).eval() if purifier is not None else None
    gen = torch.Generator(device=device).manual_seed(seed)
    correct: dict[str, int] = {}
    examples: dict[str, list] = {"clean": [], "adversarial": [], "purified": []}

    def add(key: str, pred: torch.Tensor, y: torch.Tensor):
        correct[key] = correct.get(key, 0) + int((pred == y).sum())

    n = images.shape[0]
    batches = range(0, n, batch_size)
    for k in tqdm(batches, desc="evaluate", leave=False, disable=not progress):
        x, y = images[k:k + batch_size].to(device), labels[k:k + batch_size].to(device)
        kw = dict(eps=attack.eps, step_size=attack.step_size, steps=attack.steps, norm=attack.norm, generator=gen)
        add("none/none", _predict(classifier, x), y)
        x_obl = pgd_attack(classifier, x, y, **kw)
        add("none/oblivious", _predict(classifier, x_obl), y)
        if defended is not None:
            add("purifier/none", _predict(defended, x), y)
            add("purifier/oblivious", _predict(defended, x_obl), y)
            x_ada = pgd_attack(defended, x, y, eot=attack.eot, **kw)
            add("purifier/adaptive-full-gradient", _predict(defended, x_ada), y)
            if keep_examples and sum(t.shape[0] for t in examples["clean"]) < keep_examples:
                with torch.no_grad():
                    examples["clean"].append(x.cpu())
                    examples["adversarial"].append(x_obl.cpu())
                    examples["purified"].append(purifier(x_obl).cpu())
    rows = []
    for key, c in correct.items():
        defense, threat = key.split("/")
        attacked = threat != "none"
        rows.append({
            "defense": defense,
            "threat_model": threat,
            "attack": attack.name if attacked else "none",
            "norm": attack.norm if attacked else None,
            "eps": attack.eps if attacked else 0.0,
            "steps": attack.steps if attacked else 0,
            "step_size": attack.step_size if attacked else 0.0,
            "eot": (attack.eot if threat == "adaptive-full-gradient" else 1) if attacked else 0,
            "n": n,
            "accuracy": c / n,
        })
    ex = {k: torch.cat(v)[:keep_examples] for k, v in examples.items() if v}
    return {"rows": rows, "attack": asdict(attack), "examples": ex}


def format_table(rows: list[dict], defense_names: dict[str, str] | None = None) -> str:
    """A plain-text table, one row per (defense, threat model)."""
    names = defense_names or {}
    head = f"{'defense':<14} {'threat model':<24} {'attack':<8} {'norm':<5} {'eps':>8} {'steps':>5} {'EOT':>3} {'n':>5} {'accuracy':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        eps = f"{r['eps'] * 255:.1f}/255" if r["norm"] == "linf" else (f"{r['eps']:.3g}" if r["norm"] else "-")
        lines.append(
            f"{names.get(r['defense'], r['defense']):<14} {r['threat_model']:<24} {r['attack']:<8} {r['norm'] or '-':<5} "
            f"{eps:>8} {r['steps']:>5} {r['eot']:>3} {r['n']:>5} {100 * r['accuracy']:>8.2f}%"
        )
    return "\n".join(lines)
