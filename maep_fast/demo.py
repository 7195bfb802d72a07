"""The end-to-end demo on the embedded digits: train a classifier, a MAEP
purifier and a plain MAE (for MAE-Pure) on the CPU, attack, purify, report.

Two sizes:

* ``maep-fast demo`` (default, a few CPU minutes): L-inf eps 16/255, our
  PGD-20 (oblivious + adaptive) on all 360 test images for MAEP; MAEP with
  test-time randomness (purify at a mask ratio > 0, averaged over several
  masks; adaptive attack with EOT) and MAE-Pure (oblivious, adaptive EOT,
  BPDA+EOT) on fixed test subsets. No MIMIR rows: the demo prints the
  ``maep-fast mimir --out runs/mimir`` command that trains the MIMIR ViT (docs/mimir.md).
* ``maep-fast demo --full`` (``FULL``): longer training (MAEP stage 1 on
  PGD-10 pairs with classifier guidance, a longer-pretrained MAE), eps 8/255, 16/255 and 32/255, our
  PGD-20, torchattacks' PGD-20 and AutoAttack (standard for the
  deterministic MAEP, rand with EOT for the randomized defenses), the full
  table, an accuracy-vs-eps plot and an image grid with predicted labels;
  MIMIR ViT rows (the ``maep-fast mimir`` recipe; white-box and transferred PGD-20).

MAE-Pure runs on a *plain* MAE pretrained on the train split with the
standard MAE objective (``train_mae``), not on the MAEP model.

Writes ``<out>/metrics.json`` (every row with threat model, attack, eps,
steps, EOT, n; sanity checks per section), ``<out>/table.md``,
``<out>/acc_vs_eps.png``, ``<out>/grid.png`` (clean | adversarial | MAEP |
MAE-Pure, each image captioned with the classifier's prediction),
``<out>/amv.png`` and the checkpoints ``classifier``, ``maep``, ``mae`` and
(full demo) ``mimir_vit``.
"""
from __future__ import annotations

import json
import platform
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from maep_fast._native import native_available
from maep_fast.checkpoint import save_model
from maep_fast.data import load_digits_dataset
from maep_fast.evaluate import accuracy_vs_eps, format_table, markdown_table, save_accuracy_vs_eps_plot
from maep_fast.models.classifiers import SmallCNN
from maep_fast.models.presets import create_mae
from maep_fast.plots import save_comparison_grid
from maep_fast.purify.maep import Purifier
from maep_fast.purify.randomized import RandomizedMAEP as _RandomizedMAEP
from maep_fast.train.classifier import accuracy, train_classifier
from maep_fast.train.common import set_seed
from maep_fast.train.loop import LoopConfig
from maep_fast.train.mae_pretrain import MAEPretrainConfig, train_mae
from maep_fast.train.maep import AttackConfig, MAEPConfig, train_maep


@dataclass
class DemoConfig:
    image_size: int = 16
    preset: str = "demo"
    full: bool = False
    classifier_epochs: int = 15
    batch_size: int = 64
    seed: int = 0
    progress: bool = True
    # MAEP training (pairs: PGD against the frozen classifier, L-inf, step eps/4)
    stage1_epochs: int = 30
    stage2_epochs: int = 5
    train_eps: float = 16 / 255
    train_eps_min: float | None = None  # set: each batch's training eps uniform in [train_eps_min, train_eps]
    train_steps: int = 5
    w_cls: float = 0.0  # MAEP classifier guidance (MAEPConfig.w_cls; 0 = the paper's loss)
    clean_frac: float = 0.0  # MAEP clean inputs per batch (MAEPConfig.clean_frac)
    # evaluation (L-inf, step eps/4, random start)
    eval_eps: tuple = (16 / 255,)
    eval_steps: int = 20
    attacks: tuple = ("pgd",)  # pgd (ours) | ta-pgd (torchattacks PGD/EOTPGD) | autoattack (torchattacks)
    aa_steps: int = 100  # AutoAttack's APGD/FAB iterations (its default 100)
    aa_queries: int = 5000  # Square queries (AutoAttack's default 5000)
    n_eval: int = 360  # the whole test split
    # MAEP finetuned through itself (AttackConfig(target="defended")), from the MAEP above: pairs by PGD on
    # classifier(MAEP(x)) at mask 0 with the current weights, a share of classifier-only pairs; 0 epochs = off
    defended_epochs: int = 0
    defended_steps: int = 3  # PGD steps of the pairs, step eps/2
    defended_eps: float = 16 / 255
    defended_classifier_frac: float = 0.3
    defended_lr: float = 1e-3
    defended_train_n: int = 0  # 0 = the whole train split
    # MAEP with test-time randomness: mean of n_masks reconstructions at mask ratio r > 0
    maep_rand: bool = True
    rand_mask_ratio: float = 0.25
    rand_masks: int = 4
    rand_eot: int = 4
    rand_n: int = 64  # >= the test split: all test images
    rand_attacks: tuple = ()  # () = the same as ``attacks``
    # plain MAE (standard MAE pretraining on the train split) for MAE-Pure
    mae_pure: bool = True
    mae_epochs: int = 25
    mae_mask_ratio: float = 0.75
    mp_steps: int = 50
    mp_step_size: float = 4 / 255  # halved after S/2
    mp_eta: float = 32 / 255
    mp_mask_ratio: float = 0.5
    mp_masks: int = 1
    mp_n: int = 32  # the subset for MAE-Pure's attacks through the purifier (adaptive, BPDA+EOT)
    mp_oblivious_all: bool = False  # also MAE-Pure's oblivious rows on all n_eval images (cheap: no EOT)
    mp_attack_steps: int = 10  # PGD steps of the adaptive / BPDA attacks through MAE-Pure
    mp_eot: int = 2
    mp_aa_steps: int = 10  # AutoAttack-rand APGD steps through MAE-Pure (full demo)
    mp_attacks: tuple = ()  # () = the same as ``attacks``
    # MIMIR ViT rows (maep_fast.train.mimir.MIMIRRecipe, the `maep-fast mimir` defaults; docs/mimir.md). Off in
    # the default demo (a useful robust ViT needs minutes of training there): `maep-fast mimir` trains it
    mimir: bool = False
    mimir_patch_size: int = 4  # 16 tokens (patch 2: 64 tokens, 4x the cost per step)
    mimir_pretrain_epochs: int = 20
    mimir_finetune_epochs: int = 15
    mimir_train_eps: float = 16 / 255  # finetuning eps, ramped up from 0 over the first 30 % of the steps
    mimir_steps: int = 3
    mimir_trades_beta: float | None = 6.0
    mimir_n: int = 360
    mimir_train_n: int = 0  # 0 = the whole train split
    notes: list = field(default_factory=list)


QUICK = dict(classifier_epochs=1, stage1_epochs=1, stage2_epochs=1, train_steps=1, eval_steps=2, n_eval=32,
             rand_masks=2, rand_eot=1, rand_n=16, mae_epochs=1, mp_steps=2, mp_n=8, mp_attack_steps=1, mp_eot=1,
             mimir_pretrain_epochs=1, mimir_finetune_epochs=1, mimir_steps=1, mimir_n=32, mimir_train_n=128,
             defended_epochs=1, defended_steps=1, defended_train_n=64)

# --full: the quality run: MAEP stage 1 60 epochs on PGD-10 pairs at a per-batch eps in [4, 28]/255
# with classifier guidance (w_cls 1, 20 % clean inputs; the paper's loss alone at 16/255 reached oblivious
# clean - 8.6 at 90 epochs: docs/results.md, recipes), a
# longer-pretrained plain MAE, eps 8/16/32 x {our PGD-20, torchattacks PGD-20, AutoAttack} for MAEP on all test
# images. AutoAttack's budget is cut to fit 45 minutes on 2 cores (10 APGD / FAB iterations, 250 Square queries;
# its defaults, 100 and 5000, would cost hours through a purifier on a CPU: one MAEP forward+backward on the 360
# test images is ~0.75 s there). MAEP-rand (2 masks): our PGD with EOT 4 on all test images. MAE-Pure: oblivious rows on all
# test images; its attacks through the purifier (our PGD-10 with EOT 2, AutoAttack-rand with 5 steps; each step
# differentiates through 50 purification steps) on a fixed 64-image subset. Every row names attack, steps, EOT, n.
FULL = dict(full=True, stage1_epochs=60, stage2_epochs=5, train_steps=10, train_eps=28 / 255, train_eps_min=4 / 255,
            w_cls=1.0, clean_frac=0.2, eval_eps=(8 / 255, 16 / 255, 32 / 255),
            attacks=("pgd", "ta-pgd", "autoattack"), aa_steps=10, aa_queries=250, rand_n=360, rand_masks=2, rand_eot=4,
            rand_attacks=("pgd",), mae_epochs=80, mp_n=64, mp_oblivious_all=True,
            mp_eta=40 / 255, mp_mask_ratio=0.6,  # the best measured MAE-Pure schedule (docs/results.md, recipes)
            mp_attack_steps=10, mp_eot=2, mp_aa_steps=5, mp_attacks=("pgd", "autoattack"), mimir=True,
            defended_epochs=12)


MIMIR_COMMAND = "maep-fast mimir --out runs/mimir"


def __getattr__(name: str):
    # RandomizedMAEP moved to maep_fast.purify.randomized; the old path keeps working for one release.
    if name == "RandomizedMAEP":
        warnings.warn("maep_fast.demo.RandomizedMAEP moved: import it from maep_fast.purify (or maep_fast); "
                      "the maep_fast.demo name goes away in the next release", DeprecationWarning, stacklevel=2)
        return _RandomizedMAEP
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def run_demo(out_dir: str | Path = "runs/demo", cfg: DemoConfig | None = None) -> dict:
    cfg = cfg or DemoConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    set_seed(cfg.seed)
    t0 = time.perf_counter()
    train = load_digits_dataset(cfg.image_size, "train")
    test = load_digits_dataset(cfg.image_size, "test")
    say = print if cfg.progress else (lambda *a, **k: None)
    say(f"data: embedded digits {len(train)} train / {len(test)} test, {cfg.image_size}x{cfg.image_size} grayscale"
        f" ({'full' if cfg.full else 'default'} demo, {torch.get_num_threads()} thread(s))")
    seconds: dict[str, float] = {}

    def lap(name: str, t: float) -> None:
        seconds[name] = round(time.perf_counter() - t, 1)

    t = time.perf_counter()
    classifier = SmallCNN(in_chans=1, num_classes=10)
    train_classifier(classifier, train, LoopConfig(epochs=cfg.classifier_epochs, batch_size=cfg.batch_size, lr=2e-3,
                                                   weight_decay=5e-4, seed=cfg.seed, progress=cfg.progress, desc="classifier"))
    for p in classifier.parameters():
        p.requires_grad_(False)
    classifier.eval()
    lap("classifier", t)
    say(f"classifier: test accuracy {100 * accuracy(classifier, test.images, test.labels):.2f}%")

    t = time.perf_counter()
    set_seed(cfg.seed)
    model = create_mae(cfg.preset, img_size=cfg.image_size)
    step = cfg.train_eps / 4 if cfg.train_steps > 1 else cfg.train_eps
    mcfg = MAEPConfig(
        attack=AttackConfig(norm="linf", eps=cfg.train_eps, step_size=step, steps=cfg.train_steps,
                            eps_min=cfg.train_eps_min),
        stage1=LoopConfig(epochs=cfg.stage1_epochs, batch_size=cfg.batch_size, lr=2e-3, seed=cfg.seed,
                          progress=cfg.progress, desc="MAEP stage 1"),
        stage2=LoopConfig(epochs=cfg.stage2_epochs, batch_size=cfg.batch_size, lr=1e-3, warmup_epochs=0.5,
                          seed=cfg.seed + 1, progress=cfg.progress, desc="MAEP stage 2 (LoRA)"),
        w_cls=cfg.w_cls, clean_frac=cfg.clean_frac,
    )
    history = train_maep(model, train, mcfg, classifier)
    model.eval()
    lap("maep_train", t)

    mae = None
    if cfg.mae_pure:
        t = time.perf_counter()
        set_seed(cfg.seed)
        mae = create_mae(cfg.preset, img_size=cfg.image_size)  # plain MAE, pixel targets (MAE-Pure reconstructs pixels)
        mae_hist = train_mae(mae, train, MAEPretrainConfig(mask_ratio=cfg.mae_mask_ratio, loop=LoopConfig(
            epochs=cfg.mae_epochs, batch_size=cfg.batch_size, lr=2e-3, warmup_epochs=2.0, seed=cfg.seed,
            progress=cfg.progress, desc="MAE pretrain")))
        mae.eval()
        lap("mae_pretrain", t)
        say(f"plain MAE: masked reconstruction loss {mae_hist[-1]['loss']:.4f} after {cfg.mae_epochs} epochs"
            if mae_hist else "plain MAE: not trained")

    sections: dict[str, dict] = {}
    eps_list = sorted(cfg.eval_eps)
    # 1. MAEP, deterministic single pass, all n_eval test images
    t = time.perf_counter()
    ev = test.subset(cfg.n_eval) if cfg.n_eval < len(test) else test
    purifier = Purifier(model)
    sections["maep"] = _sweep(cfg, classifier, purifier, ev, defense="MAEP", randomized=False,
                              threat_models=("oblivious", "adaptive-full-gradient"), eot=1, steps=cfg.eval_steps,
                              note=f"MAEP stage 1 {cfg.stage1_epochs} ep on PGD-{cfg.train_steps} pairs at eps "
                                   f"{_train_eps_words(cfg)} (mask 0.5) + stage 2 {cfg.stage2_epochs} ep decoder "
                                   f"LoRA at mask 0; {_loss_words(cfg)}; one deterministic pass at mask 0")
    lap("eval_maep", t)
    # 1b. MAEP finetuned through itself
    defended = None
    if cfg.defended_epochs > 0:
        t = time.perf_counter()
        defended = _train_defended(cfg, model, classifier, train)
        lap("maep_defended_train", t)
        t = time.perf_counter()
        sections["maep_defended"] = _sweep(
            cfg, classifier, Purifier(defended), ev, defense="MAEP (through itself)", randomized=False,
            threat_models=("oblivious", "adaptive-full-gradient"), eot=1, steps=cfg.eval_steps,
            note=f"the MAEP above, finetuned {cfg.defended_epochs} ep at mask 0 on PGD-{cfg.defended_steps} pairs "
                 f"made through classifier(MAEP(x)) at eps {cfg.defended_eps * 255:.0f}/255 "
                 f"({100 * cfg.defended_classifier_frac:.0f} % of batches against the classifier alone), "
                 f"loss l1 + MSE + {max(cfg.w_cls, 1.0):g} x KL classification loss on the purified output, "
                 f"{max(cfg.clean_frac, 0.2):.0%} clean inputs; one deterministic pass at mask 0")
        lap("eval_maep_defended", t)
    # 2. MAEP with test-time randomness
    if cfg.maep_rand:
        t = time.perf_counter()
        # a subset as large as ev is ev itself: rows with the same n are on the same images (the table dedup relies on it)
        ev_r = ev if cfg.rand_n >= len(ev) else test.subset(cfg.rand_n, seed=cfg.seed)
        rnd = _RandomizedMAEP(model, cfg.rand_mask_ratio, cfg.rand_masks)
        sections["maep_rand"] = _sweep(cfg, classifier, rnd, ev_r, defense=f"MAEP-rand", randomized=True,
                                       attacks=cfg.rand_attacks or cfg.attacks,
                                       threat_models=("oblivious", "adaptive-full-gradient"), eot=cfg.rand_eot,
                                       steps=cfg.eval_steps,
                                       note=f"the same MAEP model, mean of {cfg.rand_masks} reconstructions at mask "
                                            f"ratio {cfg.rand_mask_ratio} (fresh masks every call); fixed subset of "
                                            f"{len(ev_r)} test images")
        lap("eval_maep_rand", t)
    # 3. MAE-Pure on the plain MAE
    mp = None
    if cfg.mae_pure:
        from maep_fast.purify.mae_pure import MAEPure

        t = time.perf_counter()
        ev_m = ev if cfg.mp_n >= len(ev) else test.subset(cfg.mp_n, seed=cfg.seed)
        mp = MAEPure(mae, steps=cfg.mp_steps, step_size=cfg.mp_step_size, halve_step=True, eta=cfg.mp_eta,
                     mask_ratio=cfg.mp_mask_ratio, n_masks=cfg.mp_masks)
        sections["mae_pure"] = _sweep(cfg, classifier, mp, ev_m, defense="MAE-Pure", randomized=True,
                                      attacks=cfg.mp_attacks or cfg.attacks,
                                      threat_models=("oblivious", "adaptive-full-gradient", "bpda-eot"),
                                      eot=cfg.mp_eot, steps=cfg.mp_attack_steps, aa_steps=cfg.mp_aa_steps,
                                      note=f"plain MAE ({cfg.preset} preset, MAE pretraining {cfg.mae_epochs} ep, mask "
                                           f"{cfg.mae_mask_ratio}); MAE-Pure S={cfg.mp_steps}, step "
                                           f"{cfg.mp_step_size * 255:.0f}/255 halved after S/2, eta "
                                           f"{cfg.mp_eta * 255:.0f}/255, mask {cfg.mp_mask_ratio}, {cfg.mp_masks} "
                                           f"mask(s)/step; fixed subset of {len(ev_m)} test images")
        if cfg.mp_oblivious_all and len(ev_m) < len(ev):
            # the oblivious rows need no gradient through the purifier: all n_eval images
            sections["mae_pure_all"] = _sweep(cfg, classifier, mp, ev, defense="MAE-Pure", randomized=True,
                                              attacks=cfg.mp_attacks or cfg.attacks, threat_models=("oblivious",),
                                              eot=1, steps=cfg.mp_attack_steps, aa_steps=cfg.mp_aa_steps,
                                              note=sections["mae_pure"]["note"].replace(
                                                  f"fixed subset of {len(ev_m)} test images",
                                                  f"all {len(ev)} test images, oblivious only"))
        sections["mae_pure"]["amv"] = _amv(cfg, classifier, mae, mp, ev_m, out)
        lap("eval_mae_pure", t)
    vit = None
    if cfg.mimir:
        t = time.perf_counter()
        mimir_section, _, vit = _mimir_rows(cfg, classifier, train, test)
        sections["mimir"] = mimir_section
        lap("mimir", t)
    else:
        say(f"MIMIR ViT: not in this demo; train it with `{MIMIR_COMMAND}` (docs/mimir.md), or run `maep-fast demo "
            "--full`")

    if "mae_pure_all" in sections:  # all-images rows before the subset's
        order = [k for k in sections if k != "mae_pure"]
        order.insert(order.index("mae_pure_all") + 1, "mae_pure")
        sections = {k: sections[k] for k in order}
    rows = []
    for sec in sections.values():  # each clean row once; the undefended baseline once per attack on the same images
        rows += [r for r in sec["rows"] if not ((r["threat_model"] == "none" or r["defense"].startswith("no defense"))
                                                and any(_same_row(q, r) for q in rows))]
    sanity = [c for sec in sections.values() for c in sec.get("sanity", [])]
    table = markdown_table(rows)
    (out / "table.md").write_text(table + "\n")
    pgd_rows = [_plot_label(r, len(ev)) for k, sec in sections.items() if k != "mimir" for r in sec["rows"]
                if r["attack"] in ("none", f"PGD-{cfg.eval_steps}", f"PGD-{cfg.mp_attack_steps}")]
    save_accuracy_vs_eps_plot(pgd_rows, out / "acc_vs_eps.png",
                              title=f"digits, L-inf, our PGD ({'full' if cfg.full else 'default'} demo)")
    _grid(cfg, classifier, purifier, mp, test, out / "grid.png")
    save_model(classifier, out / "classifier", meta={"data": "digits", "image_size": cfg.image_size})
    save_model(model, out / "maep", meta={"data": "digits", "image_size": cfg.image_size, "trained": "MAEP stage 1 + 2"})
    if defended is not None:
        save_model(defended, out / "maep_defended", meta={"data": "digits", "image_size": cfg.image_size,
                                                          "trained": sections["maep_defended"]["note"]})
    if mae is not None:
        save_model(mae, out / "mae", meta={"data": "digits", "image_size": cfg.image_size,
                                            "trained": f"MAE pretraining {cfg.mae_epochs} epochs, mask {cfg.mae_mask_ratio}"})
    if vit is not None:
        save_model(vit, out / "mimir_vit", meta={"data": "digits", "image_size": cfg.image_size,
                                                 "trained": sections["mimir"]["description"]})
    seconds["total"] = round(time.perf_counter() - t0, 1)
    metrics = {
        "rows": rows,
        "sanity": sanity,
        "sections": {k: {kk: vv for kk, vv in v.items() if kk != "rows"} for k, v in sections.items()},
        "config": asdict(cfg),
        "maep_history": history,
        "seconds": seconds,
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "native_extension": native_available()},
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    print(table)
    failed = [c for c in sanity if not c["passed"]]
    print(f"\nsanity checks: {len(sanity) - len(failed)} passed, {len(failed)} failed (all in metrics.json)")
    for c in failed:
        print(f"[sanity FAIL] {c['check']}: {c['message']}")
    print(f"\nseconds: {seconds}")
    print(f"wrote {out / 'metrics.json'}, {out / 'table.md'}, {out / 'acc_vs_eps.png'}, {out / 'grid.png'} and the checkpoints")
    return metrics


def _same_row(a: dict, b: dict) -> bool:
    keys = ("defense", "threat_model", "attack", "eps", "steps", "eot", "n", "seed")
    return all(a.get(k) == b.get(k) for k in keys)


def _plot_label(row: dict, n_all: int) -> dict:
    """A subset's rows get their n in the legend, so they do not join the all-images line."""
    if row["n"] < n_all and "(n=" not in row["defense"]:
        return {**row, "defense": f"{row['defense']} (n={row['n']})"}
    return row


def _train_eps_words(cfg: DemoConfig) -> str:
    if cfg.train_eps_min is None:
        return f"{cfg.train_eps * 255:.0f}/255"
    return f"U[{cfg.train_eps_min * 255:.0f}, {cfg.train_eps * 255:.0f}]/255 per batch"


def _loss_words(cfg: DemoConfig) -> str:
    words = "loss l1 + masked MSE (the paper's)"
    if cfg.w_cls:
        words += f" + {cfg.w_cls:g} x KL classifier guidance"
    if cfg.clean_frac:
        words += f", {cfg.clean_frac:.0%} clean inputs"
    return words


def _train_defended(cfg: DemoConfig, model, classifier, train):
    """A copy of the trained MAEP, finetuned through itself (stage 1 at mask 0, no LoRA stage)."""
    import copy

    defended = copy.deepcopy(model).train()
    for p in defended.parameters():
        p.requires_grad_(True)
    for name in ("pos_embed", "decoder_pos_embed"):
        getattr(defended, name).requires_grad_(False)
    data = train if not cfg.defended_train_n or cfg.defended_train_n >= len(train) else \
        train.subset(cfg.defended_train_n, seed=cfg.seed)
    set_seed(cfg.seed)
    eps = cfg.defended_eps
    dcfg = MAEPConfig(
        mask_ratio=0.0, w_cls=max(cfg.w_cls, 1.0), clean_frac=max(cfg.clean_frac, 0.2),
        attack=AttackConfig(norm="linf", eps=eps, step_size=eps / 2 if cfg.defended_steps > 1 else eps,
                            steps=cfg.defended_steps, target="defended",
                            classifier_frac=cfg.defended_classifier_frac),
        stage1=LoopConfig(epochs=cfg.defended_epochs, batch_size=cfg.batch_size, lr=cfg.defended_lr, seed=cfg.seed,
                          progress=cfg.progress, desc="MAEP through itself"),
        stage2=LoopConfig(epochs=0, progress=False))
    train_maep(defended, data, dcfg, classifier)
    return defended.eval()


def _sweep(cfg: DemoConfig, classifier, purifier, ev, *, defense: str, randomized: bool, threat_models, eot: int,
           steps: int, note: str, aa_steps: int | None = None, attacks: tuple = ()) -> dict:
    """Every attack of ``attacks`` (default ``cfg.attacks``) at every eps of ``cfg.eval_eps`` on ``ev``,
    with the undefended classifier on the same images as the baseline; rows + sanity checks + settings."""
    rows, sanity, settings = [], [], []
    base = "no defense" if len(ev) == cfg.n_eval else f"no defense (n={len(ev)})"
    for a in attacks or cfg.attacks:
        kw = dict(threat_models=list(threat_models), attack=a, norm="linf", steps=steps, eot=eot,
                  version="rand" if randomized else "standard", seed=cfg.seed, defense=defense,
                  n_classes=10, n_queries=cfg.aa_queries, progress=cfg.progress)
        if a == "autoattack":
            kw["steps"] = aa_steps or cfg.aa_steps
            if not randomized:
                kw["eot"] = None
        torch.manual_seed(cfg.seed)
        rep = accuracy_vs_eps(classifier, purifier, ev.images, ev.labels, sorted(cfg.eval_eps), **kw)
        for r in rep["rows"]:
            if r["defense"] == "none":
                r["defense"] = base
            r["note"] = note
        rows += [r for r in rep["rows"] if not (r["threat_model"] == "none" and any(
            q["threat_model"] == "none" and q["defense"] == r["defense"] for q in rows))]
        sanity += rep["sanity"]
        settings.append(rep["settings"])
    return {"rows": rows, "sanity": sanity, "settings": settings, "note": note}


@torch.no_grad()
def _grid(cfg: DemoConfig, classifier, purifier, mp, test, path: Path) -> None:
    """clean | adversarial (oblivious PGD at the middle eps) | MAEP | MAE-Pure, with predicted labels."""
    from maep_fast.attacks.pgd import pgd_attack

    k = 8
    x, y = test.images[:k], test.labels[:k]
    eps = sorted(cfg.eval_eps)[len(cfg.eval_eps) // 2]
    g = torch.Generator().manual_seed(cfg.seed)
    with torch.enable_grad():
        x_adv = pgd_attack(classifier, x, y, eps=eps, step_size=eps / 4, steps=cfg.eval_steps, generator=g)
    cols = {"clean": x, f"adversarial {eps * 255:.0f}/255": x_adv, "MAEP(adv)": purifier.purify(x_adv)}
    if mp is not None:
        cols["MAE-Pure(adv)"] = mp.purify(x_adv)
    labels = {name: classifier(img).argmax(1).tolist() for name, img in cols.items()}
    save_comparison_grid(cols, path, max_rows=k, labels=labels, true_labels=y.tolist())


def _amv(cfg: DemoConfig, classifier, mae, mp, ev, out: Path) -> dict:
    """Decoder attention variation (mask ratio 0) of the plain MAE: clean vs adversarial vs MAE-Pure."""
    from maep_fast.attacks.pgd import pgd_attack
    from maep_fast.purify.amv import attention_matrix_variation, save_amv_heatmap

    k = min(32, len(ev))
    x, y = ev.images[:k], ev.labels[:k]
    eps = sorted(cfg.eval_eps)[len(cfg.eval_eps) // 2]
    x_adv = pgd_attack(classifier, x, y, eps=eps, step_size=eps / 4, steps=cfg.eval_steps)
    x_pur = mp.purify(x_adv)
    amv_adv = save_amv_heatmap(mae, x, x_adv, out / "amv.png", x_purified=x_pur)
    amv_pur = attention_matrix_variation(mae, x, x_pur)
    return {"n": k, "attack": f"PGD-{cfg.eval_steps} oblivious at {eps * 255:.0f}/255",
            "adversarial": amv_adv.tolist(), "purified": amv_pur.tolist(), "mask_ratio": 0.0}


def _mimir_rows(cfg: DemoConfig, classifier, train, test):
    """The MIMIR recipe (``train_mimir_vit``: MIMIR pretraining + TRADES finetuning of a ViT), then the ViT
    attacked at every eval eps: white-box PGD on the ViT itself, and PGD transferred from the SmallCNN."""
    from maep_fast.attacks.pgd import pgd_attack
    from maep_fast.train.mimir import MIMIRRecipe, train_mimir_vit

    t = time.perf_counter()
    if cfg.mimir_train_n and cfg.mimir_train_n < len(train):
        train = train.subset(cfg.mimir_train_n, seed=cfg.seed)
    recipe = MIMIRRecipe(img_size=cfg.image_size, patch_size=cfg.mimir_patch_size,
                         pretrain_epochs=cfg.mimir_pretrain_epochs, finetune_epochs=cfg.mimir_finetune_epochs,
                         eps=cfg.mimir_train_eps, steps=cfg.mimir_steps, trades_beta=cfg.mimir_trades_beta,
                         seed=cfg.seed)
    vit, _, info = train_mimir_vit(train, recipe, progress=cfg.progress)
    for p in vit.parameters():
        p.requires_grad_(False)
    vit.eval()
    ev = test.subset(cfg.mimir_n, seed=cfg.seed) if cfg.mimir_n < len(test) else test
    x, y = ev.images, ev.labels
    n = len(ev)
    name = "MIMIR ViT"
    ft = recipe.describe()

    def row(tm, acc, eps, note):
        attacked = tm != "none"
        return {"defense": name, "threat_model": tm, "attack": f"PGD-{cfg.eval_steps}" if attacked else "none",
                "norm": "linf" if attacked else None, "eps": eps if attacked else 0.0,
                "steps": cfg.eval_steps if attacked else 0, "step_size": eps / 4 if attacked else 0.0,
                "eot": 1 if attacked else 0, "n": n, "seed": cfg.seed, "accuracy": acc, "note": note}

    rows = [row("none", accuracy(vit, x, y), 0.0, ft)]
    for eps in sorted(cfg.eval_eps):
        kw = dict(eps=eps, step_size=eps / 4, steps=cfg.eval_steps, norm="linf")
        x_transfer = pgd_attack(classifier, x, y, generator=torch.Generator().manual_seed(cfg.seed), **kw)
        x_white = pgd_attack(vit, x, y, generator=torch.Generator().manual_seed(cfg.seed), **kw)
        rows.append(row("oblivious", accuracy(vit, x_transfer, y), eps,
                        "transfer: PGD crafted on the undefended SmallCNN; " + ft))
        rows.append(row("adaptive-full-gradient", accuracy(vit, x_white, y), eps,
                        "white-box PGD on the ViT itself (the classifier is the defense); " + ft))
    section = {"rows": rows, "pretrain_history": info["pretrain_history"],
               "finetune_history": info["finetune_history"], "config": {"recipe": info["recipe"]}, "description": ft,
               "train_seconds": info["seconds"], "seconds": round(time.perf_counter() - t, 1)}
    return section, "MIMIR-pretrained ViT classifier (no purifier)\n" + format_table(rows), vit
