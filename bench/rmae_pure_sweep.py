"""RMAE-Pure against MAE-Pure on the digits: finetune a plain MAE through MAE-Pure + classifier
(``train_rmae_pure``), then score MAE-Pure with the plain and with the finetuned MAE, side by side.

Both purifiers run the same test-time schedule (``--steps``, ``--step-size`` halved after S/2, ``--eta``,
``--mask-ratio``; fresh masks per call). Rows, L-inf ``--eps`` (default 16/255):

* clean and oblivious (torchattacks PGD-20 on the classifier alone, then purified) on the first ``--n-all``
  test images;
* adaptive, strict preset (``evaluate_strict``: our PGD with EOT and exact gradients through every
  purification step) at a stated, reduced budget (``--attack-steps``, ``--eot``) on the first ``--n`` test
  images; each row carries the budget string ``evaluate_strict`` writes.

Appends one JSON line to ``--out``; with ``--save`` writes the finetuned MAE.

    OMP_NUM_THREADS=1 python3 bench/rmae_pure_sweep.py --classifier /tmp/clf --mae /tmp/mae80 --name rp3
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
from maep_fast import load_model
from maep_fast.evaluate import evaluate_strict
from maep_fast.purify.mae_pure import MAEPure
from maep_fast.train.loop import LoopConfig
from maep_fast.train.rmae_pure import RMAEPureConfig, train_rmae_pure


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--classifier", required=True)
    ap.add_argument("--mae", required=True, help="the plain MAE (maep-fast pretrain)")
    ap.add_argument("--name", required=True)
    ap.add_argument("--train-n", type=int, default=0, help="finetune on this many training images (0 = all)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--train-eps", type=float, default=16, help="stage-I eps, in 1/255")
    ap.add_argument("--train-attack-steps", type=int, default=3, help="stage-I PGD steps (step eps/2)")
    ap.add_argument("--train-steps", type=int, default=10, help="purification steps during training")
    ap.add_argument("--unroll", type=int, default=2)
    ap.add_argument("--w-cls", type=float, default=1.0)
    ap.add_argument("--w-rec", type=float, default=1.0)
    ap.add_argument("--steps", type=int, default=50, help="test-time purification steps S")
    ap.add_argument("--step-size", type=float, default=4, help="in 1/255, halved after S/2")
    ap.add_argument("--eta", type=float, default=32, help="in 1/255")
    ap.add_argument("--mask-ratio", type=float, default=0.5)
    ap.add_argument("--eps", type=float, default=16, help="evaluation eps, in 1/255")
    ap.add_argument("--attack-steps", type=int, default=10)
    ap.add_argument("--eot", type=int, default=2)
    ap.add_argument("--n", type=int, default=128, help="images for the adaptive attack")
    ap.add_argument("--n-all", type=int, default=360, help="images for clean and oblivious")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--save", default=None)
    ap.add_argument("--out", default="bench/results/rmae_pure_cpu.jsonl")
    a = ap.parse_args()
    clf, train, test = digits_setup(a.classifier, a.threads)
    if 0 < a.train_n < len(train):
        train = train.subset(a.train_n, seed=0)
    plain = load_model(a.mae, expect_kind="mae").eval()
    tuned = load_model(a.mae, expect_kind="mae")
    teps = a.train_eps / 255
    cfg = RMAEPureConfig(eps=teps, attack_step_size=teps / 2, attack_steps=a.train_attack_steps,
                         train_steps=a.train_steps, step_size=a.step_size / 255, eta=a.eta / 255,
                         mask_ratio=a.mask_ratio, unroll=a.unroll, w_cls=a.w_cls, w_rec=a.w_rec,
                         loop=LoopConfig(epochs=a.epochs, batch_size=64, lr=a.lr, warmup_epochs=0.5, seed=0,
                                         progress=False, desc="RMAE-Pure"))
    hist, train_s = train_timed(tuned, lambda: train_rmae_pure(tuned, train, clf, cfg), a.save, vars(a))
    eps = a.eps / 255
    x_all, y_all = test.images[:a.n_all], test.labels[:a.n_all]
    torch.manual_seed(1)
    x_obl = ta.PGD(clf, eps=eps, alpha=eps / 4, steps=20, random_start=True)(x_all, y_all)
    with torch.no_grad():
        res = {"name": a.name, "args": vars(a), "train_s": train_s, "eps": f"{a.eps:g}/255",
               "history": hist["history"], "no_defense_clean": (clf(x_all).argmax(1) == y_all).float().mean().item(),
               "no_defense_pgd20": (clf(x_obl).argmax(1) == y_all).float().mean().item(), "purifiers": {}}
    for label, mae in (("MAE-Pure", plain), ("RMAE-Pure", tuned)):
        pur = MAEPure(mae, steps=a.steps, step_size=a.step_size / 255, eta=a.eta / 255,
                      mask_ratio=a.mask_ratio).eval()
        t1 = time.time()
        torch.manual_seed(3)
        with torch.no_grad():
            clean = (clf(pur.purify(x_all)).argmax(1) == y_all).float().mean().item()
            obl = (clf(pur.purify(x_obl)).argmax(1) == y_all).float().mean().item()
        strict = evaluate_strict(clf, pur, test.images[:a.n], test.labels[:a.n], eps=eps, steps=a.attack_steps,
                                 eot=a.eot, autoattack=False, seed=0, batch_size=32)
        row = strict["rows"][0]
        res["purifiers"][label] = {"clean": clean, "oblivious_ta_pgd20": obl, "adaptive": row["accuracy"],
                                   "adaptive_attack": row["attack"], "adaptive_budget": row["budget"],
                                   "adaptive_n": row["n"], "eval_s": round(time.time() - t1)}
        print(label, res["purifiers"][label], flush=True)
    with torch.no_grad():
        res["no_defense_pgd20_first_n"] = (clf(x_obl[:a.n]).argmax(1) == test.labels[:a.n]).float().mean().item()
    append_record(res, a.out, a.threads)


if __name__ == "__main__":
    main()
