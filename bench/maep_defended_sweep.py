"""One MAEP recipe trained through itself (``AttackConfig(target="defended")``), scored on the digits.

Trains the ``demo`` preset against a fixed classifier (optionally starting from a MAEP checkpoint,
``--init``), then reports on all 360 test images, L-inf, eps 16/255 unless ``--eps`` says:

* clean: the classifier on purified clean images;
* oblivious: torchattacks PGD-20 (step eps/4 unless ``--eval-alpha`` says, random start) on the classifier
  alone, then purified;
* adaptive full-gradient: torchattacks PGD-20 through purifier + classifier (for a randomized
  purifier, ``--purifier-mask-ratio`` > 0, torchattacks EOT-PGD with ``--eval-eot`` draws);
* with ``--autoattack``: torchattacks AutoAttack-standard on the classifier alone (no defense, and
  oblivious: those examples purified), and AutoAttack (standard, or rand for a randomized purifier)
  through purifier + classifier; all at the cut budget ``--aa-steps`` APGD/FAB iterations and
  250 Square queries.

``--target classifier`` with ``--w-cls 0`` trains the paper's recipe, ``--w-cls 1`` the guided one;
``--epochs 0 --stage2-epochs 0 --init DIR`` only evaluates a saved purifier; with ``--split-seed S``
it trains and scores on another digits partition (the held-out check; the classifier must be trained
on the same one, e.g. ``maep-fast train-classifier --split-seed S``).

Appends one JSON line to ``--out`` and, with ``--save``, writes the purifier checkpoint.

    OMP_NUM_THREADS=1 python3 bench/maep_defended_sweep.py --classifier /tmp/clf --name def30 \\
        --epochs 30 --target defended --w-cls 1 --steps 5
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torchattacks as ta

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_record, digits_setup, train_timed  # noqa: E402
from maep_fast import Purifier, load_model
from maep_fast.attacks.torchattacks_adapter import run_attack
from maep_fast.models.grow import deepen_mae
from maep_fast.models.presets import create_mae
from maep_fast.train.loop import LoopConfig
from maep_fast.train.maep import AttackConfig, MAEPConfig, train_maep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--classifier", required=True, help="classifier checkpoint (the demo's SmallCNN)")
    ap.add_argument("--name", required=True)
    ap.add_argument("--init", default=None, help="start from this MAEP checkpoint")
    ap.add_argument("--deepen", type=int, nargs=2, default=(0, 0), metavar=("ENC", "DEC"),
                    help="append this many identity blocks to the encoder and the decoder first (deepen_mae)")
    ap.add_argument("--epochs", type=int, default=30, help="stage 1 epochs")
    ap.add_argument("--stage2-epochs", type=int, default=5)
    ap.add_argument("--mask-ratio", type=float, default=0.5)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--train-eps", type=float, default=16, help="training eps, in 1/255")
    ap.add_argument("--eps-min", type=float, default=None, help="per-batch eps range lower end, in 1/255")
    ap.add_argument("--steps", type=int, default=5, help="PGD steps of the training pairs")
    ap.add_argument("--step-frac", type=float, default=0.25, help="PGD step size of the training pairs, in eps")
    ap.add_argument("--target", default="defended", choices=["classifier", "defended"])
    ap.add_argument("--classifier-frac", type=float, default=0.0)
    ap.add_argument("--purifier-mask-ratio", type=float, default=0.0)
    ap.add_argument("--purifier-masks", type=int, default=1)
    ap.add_argument("--train-eot", type=int, default=1)
    ap.add_argument("--noise", type=float, default=0.0,
                    help="Gaussian input noise std (pixels in [0, 1]): in training, in the attack's purifier and at test time")
    ap.add_argument("--w-cls", type=float, default=1.0)
    ap.add_argument("--w-pur", type=float, default=1.0)
    ap.add_argument("--w-mae", type=float, default=1.0)
    ap.add_argument("--clean-frac", type=float, default=0.0)
    ap.add_argument("--eps", type=float, default=16, help="evaluation eps, in 1/255")
    ap.add_argument("--eval-alpha", type=float, default=None,
                    help="PGD-20 step size of the evaluation, in 1/255 (default eps/4)")
    ap.add_argument("--eval-eot", type=int, default=8)
    ap.add_argument("--autoattack", action="store_true")
    ap.add_argument("--aa-steps", type=int, default=10)
    ap.add_argument("--n", type=int, default=360)
    ap.add_argument("--split-seed", type=int, default=0,
                    help="digits train/test partition (0: the demo's); the classifier must come from the same one")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--save", default=None)
    ap.add_argument("--out", default="bench/results/maep_defended_cpu.jsonl")
    a = ap.parse_args()
    clf, train, test = digits_setup(a.classifier, a.threads, a.split_seed)
    model = load_model(a.init, expect_kind="mae") if a.init else create_mae("demo", img_size=16)
    if any(a.deepen):
        model = deepen_mae(model, *a.deepen)
    teps = a.train_eps / 255
    cfg = MAEPConfig(
        mask_ratio=a.mask_ratio, w_cls=a.w_cls, w_pur=a.w_pur, w_mae=a.w_mae, clean_frac=a.clean_frac,
        attack=AttackConfig(norm="linf", eps=teps, step_size=teps * a.step_frac, steps=a.steps,
                            eps_min=None if a.eps_min is None else a.eps_min / 255, target=a.target,
                            classifier_frac=a.classifier_frac, purifier_mask_ratio=a.purifier_mask_ratio,
                            purifier_masks=a.purifier_masks, eot=a.train_eot, purifier_noise=a.noise),
        input_noise=a.noise,
        stage1=LoopConfig(epochs=a.epochs, batch_size=64, lr=a.lr, seed=0, progress=False, desc="stage 1"),
        stage2=LoopConfig(epochs=a.stage2_epochs, batch_size=64, lr=1e-3, warmup_epochs=0.5, seed=1, progress=False,
                          desc="stage 2"))
    hist, train_s = train_timed(model, lambda: train_maep(model, train, cfg, clf), a.save, vars(a))
    randomized = a.purifier_mask_ratio > 0 or a.noise > 0
    if randomized:
        from maep_fast.purify import RandomizedMAEP
    pur = (RandomizedMAEP(model, mask_ratio=a.purifier_mask_ratio, n_masks=a.purifier_masks, noise_std=a.noise)
           if randomized else Purifier(model))
    eot = a.eval_eot if randomized else 1
    defended = torch.nn.Sequential(pur, clf).eval()
    x, y = test.images[:a.n], test.labels[:a.n]

    def acc(z):
        with torch.no_grad():
            return round((clf(pur.purify(z)).argmax(1) == y).float().mean().item() * 100, 2)

    eps = a.eps / 255
    alpha = eps / 4 if a.eval_alpha is None else a.eval_alpha / 255
    res = {"name": a.name, "args": vars(a), "train_s": train_s, "n": len(y), "eps": f"{a.eps:g}/255",
           "pgd_step": f"{alpha * 255:g}/255",
           "last_epoch": {k: round(float(v), 4) for k, v in hist["stage1"][-1].items()
                          if isinstance(v, (int, float))} if hist["stage1"] else {}}
    t1 = time.time()
    with torch.no_grad():
        res["no_defense_clean"] = round((clf(x).argmax(1) == y).float().mean().item() * 100, 2)
    res["clean"] = acc(x)
    torch.manual_seed(1)
    xa = ta.PGD(clf, eps=eps, alpha=alpha, steps=20, random_start=True)(x, y)
    with torch.no_grad():
        res["no_defense_pgd20"] = round((clf(xa).argmax(1) == y).float().mean().item() * 100, 2)
    res["oblivious_pgd20"] = acc(xa)
    torch.manual_seed(2)
    atk = (ta.EOTPGD(defended, eps=eps, alpha=alpha, steps=20, eot_iter=eot, random_start=True) if eot > 1
           else ta.PGD(defended, eps=eps, alpha=alpha, steps=20, random_start=True))
    xa = atk(x, y)
    res[f"adaptive_pgd20_eot{eot}"] = acc(xa)
    if a.autoattack:
        torch.manual_seed(3)
        xa = run_attack(clf, x, y, "autoattack", eps=eps, steps=a.aa_steps, n_queries=250, version="standard")
        with torch.no_grad():
            res[f"no_defense_autoattack_standard_steps{a.aa_steps}"] = round(
                (clf(xa).argmax(1) == y).float().mean().item() * 100, 2)
        res[f"oblivious_autoattack_standard_steps{a.aa_steps}"] = acc(xa)
        torch.manual_seed(3)
        xa = run_attack(defended, x, y, "autoattack", eps=eps, steps=a.aa_steps, n_queries=250,
                        version="rand" if randomized else "standard", eot=eot)
        res[f"adaptive_autoattack_{'rand' if randomized else 'standard'}_steps{a.aa_steps}"] = acc(xa)
    res["eval_s"] = round(time.time() - t1)
    append_record(res, a.out, a.threads)


if __name__ == "__main__":
    main()
