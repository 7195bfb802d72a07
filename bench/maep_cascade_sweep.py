"""A two-MAEP cascade trained through itself, scored on the digits: classifier(P_t(P_g(x))).

P_g is a guided MAEP (it undoes the classifier's own perturbations: oblivious near clean, adaptive far
below no defense); P_t starts from a MAEP trained through itself. P_t, and with ``--joint`` also P_g,
is finetuned as ``AttackConfig(target="defended")`` does, with the whole cascade as the purifier the
attack sees (PGD-3, step eps/2, at 16/255; ``--classifier-frac`` of the batches against the
classifier alone; ``w_cls`` 1, 20 % clean inputs, mask 0). Then, on the first 360 test images at
16/255: clean, oblivious (torchattacks PGD-20 on the classifier alone, then the cascade) and adaptive
(torchattacks PGD-20 through cascade + classifier). Appends one JSON line to ``--out``.

    OMP_NUM_THREADS=1 python3 bench/maep_cascade_sweep.py --classifier /tmp/clf --first /tmp/exp/guided60 \\
        --init /tmp/exp/g60_def12_cf05 --name cascade_frozen_cf05
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torchattacks as ta

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_record, digits_setup, train_timed  # noqa: E402
from maep_fast import Purifier, load_model
from maep_fast.train.loop import LoopConfig
from maep_fast.train.maep import AttackConfig, MAEPConfig, train_maep


def cascade(second, first, trainable_first: bool):
    """``second`` with ``first`` run on its input: second.forward_encoder(x) sees clamp(first(x)), so
    training and the defended attack (which call forward_encoder / reconstruct) use the whole cascade."""
    for p in first.parameters():
        p.requires_grad_(trainable_first)
    for name in ("pos_embed", "decoder_pos_embed"):
        getattr(first, name).requires_grad_(False)
    encode = second.forward_encoder

    def forward_encoder(x, mask_ratio, noise=None):
        return encode(first.reconstruct(x, 0.0).clamp(0, 1), mask_ratio, noise)

    second.forward_encoder = forward_encoder
    second.first = first  # a submodule: its parameters train with --joint
    return second


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--classifier", required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--first", required=True, help="P_g: the MAEP run first (a guided MAEP)")
    ap.add_argument("--init", required=True, help="P_t: the MAEP run second (a MAEP trained through itself)")
    ap.add_argument("--joint", action="store_true", help="train P_g too (default: frozen)")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--classifier-frac", type=float, default=0.5)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--n", type=int, default=360)
    ap.add_argument("--out", default="bench/results/maep_defended_cpu.jsonl")
    a = ap.parse_args()
    clf, train, test = digits_setup(a.classifier, 1)
    model = cascade(load_model(a.init, expect_kind="mae"), load_model(a.first, expect_kind="mae"), a.joint)
    eps = 16 / 255
    cfg = MAEPConfig(mask_ratio=0.0, w_cls=1.0, clean_frac=0.2,
                     attack=AttackConfig(norm="linf", eps=eps, step_size=eps / 2, steps=3, target="defended",
                                         classifier_frac=a.classifier_frac),
                     stage1=LoopConfig(epochs=a.epochs, batch_size=64, lr=a.lr, seed=0, progress=False, desc="cascade"),
                     stage2=LoopConfig(epochs=0, progress=False))
    hist, train_s = train_timed(model, lambda: train_maep(model, train, cfg, clf))
    x, y = test.images[:a.n], test.labels[:a.n]
    pipe = torch.nn.Sequential(Purifier(model), clf).eval()

    def acc(z):
        with torch.no_grad():
            return round((pipe(z).argmax(1) == y).float().mean().item() * 100, 2)

    torch.manual_seed(1)
    x_obl = ta.PGD(clf, eps=eps, alpha=eps / 4, steps=20, random_start=True)(x, y)
    torch.manual_seed(2)
    x_ada = ta.PGD(pipe, eps=eps, alpha=eps / 4, steps=20, random_start=True)(x, y)
    res = {"name": a.name, "args": vars(a), "train_s": train_s, "n": len(y), "eps": "16/255",
           "last_epoch": {k: round(float(v), 4) for k, v in hist["stage1"][-1].items() if isinstance(v, (int, float))},
           "clean": acc(x), "oblivious_pgd20": acc(x_obl), "adaptive_pgd20_eot1": acc(x_ada)}
    append_record(res, a.out, 1)


if __name__ == "__main__":
    main()
