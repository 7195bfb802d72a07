"""One MAEP training recipe on the embedded digits, scored against a fixed classifier.

Trains the ``demo`` preset (stage 1 + stage 2) with the given options, then reports the
classifier's accuracy on the purified clean images, on purified oblivious PGD-20 examples
(L-inf, step eps/4, random start) at 8, 16 and 32/255 on all 360 test images (16/255 also on
the first 360 train images), and under adaptive full-gradient PGD-20 at 16/255 through the
purifier. Appends one JSON line to ``--out``.

    OMP_NUM_THREADS=1 python3 bench/maep_recipe_sweep.py --classifier runs/demo_full/classifier \\
        --name guided60 --epochs 60 --w-cls 1 --clean-frac 0.2 --train-eps 28 --eps-min 4

(the recipe table in docs/results.md ran two of these side by side on the 2-core machine, one thread each).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_record, digits_setup  # noqa: E402
from maep_fast import Purifier, pgd_attack  # noqa: E402
from maep_fast.models.presets import create_mae  # noqa: E402
from maep_fast.train.loop import LoopConfig
from maep_fast.train.maep import AttackConfig, MAEPConfig, train_maep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--classifier", required=True, help="classifier checkpoint (the demo's SmallCNN)")
    ap.add_argument("--name", required=True)
    ap.add_argument("--epochs", type=int, default=30, help="stage 1 epochs")
    ap.add_argument("--stage2-epochs", type=int, default=5)
    ap.add_argument("--mask-ratio", type=float, default=0.5)
    ap.add_argument("--train-eps", type=float, default=16, help="training eps, in 1/255")
    ap.add_argument("--eps-min", type=float, default=None, help="per-batch eps range lower end, in 1/255")
    ap.add_argument("--steps", type=int, default=10, help="PGD steps of the training pairs")
    ap.add_argument("--w-cls", type=float, default=0.0)
    ap.add_argument("--clean-frac", type=float, default=0.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="bench/results/maep_recipes_cpu.jsonl")
    a = ap.parse_args()
    clf, train, test = digits_setup(a.classifier, a.threads)
    model = create_mae("demo", img_size=16)
    teps = a.train_eps / 255
    cfg = MAEPConfig(
        mask_ratio=a.mask_ratio, w_cls=a.w_cls, clean_frac=a.clean_frac,
        attack=AttackConfig(norm="linf", eps=teps, step_size=teps / 4, steps=a.steps,
                            eps_min=None if a.eps_min is None else a.eps_min / 255),
        stage1=LoopConfig(epochs=a.epochs, batch_size=64, lr=2e-3, seed=0, progress=False, desc="stage 1"),
        stage2=LoopConfig(epochs=a.stage2_epochs, batch_size=64, lr=1e-3, warmup_epochs=0.5, seed=1, progress=False,
                          desc="stage 2"))
    t0 = time.time()
    train_maep(model, train, cfg, clf)
    model.eval()
    pur = Purifier(model)
    res = {"name": a.name, "args": vars(a), "train_s": round(time.time() - t0)}
    g = torch.Generator().manual_seed(5)
    for split, ds in (("train", train), ("test", test)):
        x, y = ds.images[:360], ds.labels[:360]

        def acc(z):
            return round((clf(z).argmax(1) == y).float().mean().item() * 100, 2)

        with torch.no_grad():
            res[split] = {"pur_clean": acc(pur.purify(x))}
        for e in ((8, 16, 32) if split == "test" else (16,)):
            xa = pgd_attack(clf, x, y, eps=e / 255, step_size=e / 4 / 255, steps=20, norm="linf", generator=g)
            with torch.no_grad():
                res[split][f"obl{e}"] = acc(pur.purify(xa))
        if split == "test":
            xa = pgd_attack(lambda z: clf(pur(z)), x, y, eps=16 / 255, step_size=4 / 255, steps=20, norm="linf",
                            generator=g)
            with torch.no_grad():
                res[split]["adapt16"] = acc(pur.purify(xa))
    append_record(res, a.out)


if __name__ == "__main__":
    main()
