"""MIMIR on the embedded digits: the recipe search and the side-by-side comparison.

Three subcommands, one JSON line each (results under bench/results/):

* ``train``: trains one recipe (``maep_fast.train.mimir.train_mimir_vit``; every
  ``MIMIRRecipe`` field is a flag), saves the ViT (``--save``), and scores it on all
  360 test images: clean, and white-box PGD-20 (ours, L-inf, step eps/4, random
  start) at each ``--quick-eps`` -> ``mimir_recipes_cpu.jsonl``.
* ``eval``: the full evaluation of a saved classifier (ViT or CNN): clean; PGD-20
  (torchattacks), AutoAttack standard (torchattacks, cut budget ``--aa-steps`` /
  ``--aa-queries``), PGD-feature and PGD-MI (maep_fast.attacks.mimir_attacks) at
  every ``--eps`` -> ``mimir_compare_cpu.jsonl``.
* ``table``: the comparison records as one markdown table.
* ``cnn``: trains (or loads from ``--save``) the demo's undefended SmallCNN
  (15 epochs, lr 2e-3, wd 5e-4, batch 64, seed 0) for the baseline rows.

Run one at a time with one thread (``OMP_NUM_THREADS=1``), e.g.

    OMP_NUM_THREADS=1 python bench/mimir_sweep.py train --name mimir_default --save /tmp/mimir/a
    OMP_NUM_THREADS=1 python bench/mimir_sweep.py eval --name mimir_default --model /tmp/mimir/a
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from fractions import Fraction
from pathlib import Path

import torch

from maep_fast.checkpoint import load_model, save_model
from maep_fast.data import load_digits_dataset
from maep_fast.train.classifier import accuracy
from maep_fast.train.mimir import MIMIRRecipe, train_mimir_vit

RESULTS = Path(__file__).resolve().parent / "results"


def _num(text: str) -> float:
    return float(Fraction(text)) if "/" in text else float(text)


def _opt(cast):
    def f(text: str):
        return None if text.lower() == "none" else cast(text)
    return f


def _machine() -> dict:
    return {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()}


def _append(path: Path, rec: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(rec, default=str) + "\n")
    print(json.dumps(rec, default=str))


def _white_box_pgd(model, x, y, eps: float, steps: int = 20, seed: int = 0) -> float:
    from maep_fast.attacks.pgd import pgd_attack

    g = torch.Generator().manual_seed(seed)
    x_adv = pgd_attack(model, x, y, eps=eps, step_size=eps / 4, steps=steps, generator=g)
    return accuracy(model, x_adv, y)


def cmd_train(a) -> None:
    fields = {f.name for f in dataclasses.fields(MIMIRRecipe)}
    recipe = MIMIRRecipe(**{k: getattr(a, k) for k in fields})
    train, test = load_digits_dataset(16, "train"), load_digits_dataset(16, "test")
    t0 = time.time()
    vit, _, info = train_mimir_vit(train, recipe, progress=not a.no_progress)
    secs = round(time.time() - t0, 1)
    if a.save:
        save_model(vit, a.save, meta={"data": "digits", "image_size": 16, "trained": recipe.describe(),
                                      "recipe": dataclasses.asdict(recipe)})
    vit.eval()
    for p in vit.parameters():
        p.requires_grad_(False)
    x, y = test.images, test.labels
    rec = {"name": a.name, "recipe": dataclasses.asdict(recipe), "description": recipe.describe(),
           "train_seconds": secs, "stage_seconds": info["seconds"], "n": len(y),
           "clean": accuracy(vit, x, y), "train_clean": accuracy(vit, train.images, train.labels),
           "pretrain_last": info["pretrain_history"][-1] if info["pretrain_history"] else None,
           "finetune_last": info["finetune_history"][-1] if info["finetune_history"] else None,
           "attack": "our PGD-20, white-box on the ViT, L-inf, step eps/4, random start", "machine": _machine()}
    for e in a.quick_eps:
        rec[f"pgd20_{round(e * 255)}"] = _white_box_pgd(vit, x, y, e)
    _append(Path(a.out or RESULTS / "mimir_recipes_cpu.jsonl"), rec)


def cmd_cnn(a) -> None:
    from maep_fast.models.classifiers import SmallCNN
    from maep_fast.train.classifier import train_classifier
    from maep_fast.train.common import set_seed
    from maep_fast.train.loop import LoopConfig

    if Path(a.save, "config.json").is_file():
        print(f"{a.save} exists; keeping it")
        return
    set_seed(0)
    train = load_digits_dataset(16, "train")
    clf = SmallCNN(in_chans=1, num_classes=10)
    train_classifier(clf, train, LoopConfig(epochs=15, batch_size=64, lr=2e-3, weight_decay=5e-4, seed=0,
                                            progress=not a.no_progress, desc="classifier"))
    save_model(clf, a.save, meta={"data": "digits", "image_size": 16, "trained": "demo SmallCNN, 15 epochs"})
    print(f"saved {a.save}")


def cmd_eval(a) -> None:
    from maep_fast.attacks.mimir_attacks import pgd_feature, pgd_mi
    from maep_fast.attacks.torchattacks_adapter import run_attack

    model = load_model(a.model, expect_kind="classifier").eval()
    for p in model.parameters():
        p.requires_grad_(False)
    test = load_digits_dataset(16, "test")
    if a.n and a.n < len(test):
        test = test.subset(a.n, seed=0)
    x, y = test.images, test.labels
    rec = {"name": a.name, "model": a.model, "trained": getattr(model, "checkpoint_meta", {}).get("trained"),
           "n": len(y), "threat_model": "white-box on the classifier itself (full gradient)",
           "clean": accuracy(model, x, y), "rows": [], "machine": _machine()}
    has_features = hasattr(model, "forward_features")
    for eps in a.eps:
        tag = f"{round(eps * 255)}/255"
        t = time.time()
        import torchattacks

        torch.manual_seed(0)
        atk = torchattacks.PGD(model, eps=eps, alpha=eps / 4, steps=20, random_start=True)
        acc = accuracy(model, atk(x, y), y)
        rec["rows"].append({"attack": "torchattacks-PGD-20", "eps": tag, "steps": 20, "step_size": "eps/4",
                            "accuracy": acc, "seconds": round(time.time() - t, 1)})
        if has_features:
            for name, fn in (("PGD-feature-20", lambda: pgd_feature(model, x, eps=eps, step_size=eps / 4, steps=20,
                                                                   generator=torch.Generator().manual_seed(0))),
                             ("PGD-MI-20", lambda: pgd_mi(model, x, y, eps=eps, step_size=eps / 4, steps=20,
                                                          mi_sign=-1.0, generator=torch.Generator().manual_seed(0))),
                             ("PGD-MI+-20", lambda: pgd_mi(model, x, y, eps=eps, step_size=eps / 4, steps=20,
                                                           mi_sign=1.0, generator=torch.Generator().manual_seed(0)))):
                t = time.time()
                acc = accuracy(model, fn(), y)
                rec["rows"].append({"attack": name, "eps": tag, "steps": 20, "step_size": "eps/4",
                                    "accuracy": acc, "seconds": round(time.time() - t, 1)})
        if a.aa_steps:
            t = time.time()
            x_aa = run_attack(model, x, y, "autoattack", norm="linf", eps=eps, version="standard",
                              steps=a.aa_steps, n_queries=a.aa_queries, n_classes=10, seed=0)
            rec["rows"].append({"attack": "AutoAttack-standard", "eps": tag, "steps": a.aa_steps,
                                "queries": a.aa_queries, "accuracy": accuracy(model, x_aa, y),
                                "seconds": round(time.time() - t, 1)})
        print(rec["rows"][-4:], flush=True)
    _append(Path(a.out or RESULTS / "mimir_compare_cpu.jsonl"), rec)


def cmd_table(a) -> None:
    """The comparison as a markdown table (one row per model x attack x eps), from ``--inp``."""
    recs = {}
    for line in Path(a.inp).read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            recs[r["name"]] = r  # the last record of a name wins
    names = a.names or list(recs)
    print("| model | attack | eps | steps | n | accuracy |")
    print("|---|---|---|---|---|---|")
    for name in names:
        r = recs[name]
        label = f"{name}: {r['trained']}" if a.describe and r.get("trained") else name
        print(f"| {label} | none (clean) | - | - | {r['n']} | {100 * r['clean']:.2f} % |")
        for row in sorted(r["rows"], key=lambda q: (int(q["eps"].split("/")[0]), q["attack"])):
            print(f"| {label} | {row['attack']} | {row['eps']} | {row['steps']} | {r['n']} | "
                  f"{100 * row['accuracy']:.2f} % |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("train")
    p.add_argument("--name", required=True)
    p.add_argument("--save", default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--quick-eps", type=_num, nargs="+", default=[8 / 255, 16 / 255])
    d = MIMIRRecipe()
    for f in dataclasses.fields(MIMIRRecipe):
        v = getattr(d, f.name)
        if f.name in ("eps_start", "alpha", "trades_beta"):
            p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=_opt(_num), default=v)
        elif isinstance(v, str):
            p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=v)
        else:
            p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=_num if isinstance(v, float) else int,
                           default=v)
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("eval")
    p.add_argument("--name", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--eps", type=_num, nargs="+", default=[8 / 255, 16 / 255])
    p.add_argument("--n", type=int, default=0)
    p.add_argument("--aa-steps", type=int, default=10)
    p.add_argument("--aa-queries", type=int, default=250)
    p.add_argument("--out", default=None)
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("table")
    p.add_argument("--inp", default=str(RESULTS / "mimir_compare_cpu.jsonl"))
    p.add_argument("--names", nargs="*", default=None)
    p.add_argument("--describe", action="store_true", help="label rows with the checkpoint's training description")
    p.set_defaults(func=cmd_table)
    p = sub.add_parser("cnn")
    p.add_argument("--save", default="/tmp/mimir/cnn")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_cnn)
    a = ap.parse_args()
    torch.set_num_threads(1)
    a.func(a)


if __name__ == "__main__":
    main()
