"""The end-to-end demo on the embedded digits: train a classifier and a MAEP
purifier on the CPU, attack, purify, and report.

Also (each optional, ``DemoConfig.mae_pure`` / ``.mimir``):

* MAE-Pure rows: test-time loss descent with the demo's MAEP model used as a
  plain MAE (no extra training), on a fixed subset of ``mp_n`` test images,
  with small demo settings (S = ``mp_steps``; step and eta scaled to the demo
  eps 32/255), under oblivious, adaptive full-gradient (PGD + EOT) and
  BPDA + EOT attacks, with the sanity checks and the decoder AMV.
* MIMIR rows: a ``demo``-sized MAE (patch 4) pretrained MIMIR-style (PGD_MAE + HSIC),
  its encoder turned into a ViTClassifier and briefly adversarially
  finetuned (one clean epoch, then PGD-AT), attacked obliviously (transfer
  from the undefended CNN) and adaptively (white-box PGD on the ViT).

Writes ``<out>/metrics.json`` (MAEP rows under ``rows``; ``mae_pure`` and
``mimir`` sections with their own rows), ``<out>/grid.png`` (clean |
adversarial | purified), ``<out>/amv.png`` and the checkpoints
``<out>/classifier``, ``<out>/maep`` and ``<out>/mimir_vit``.
"""
from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from maep_fast._native import native_available
from maep_fast.checkpoint import save_model
from maep_fast.data import load_digits_dataset
from maep_fast.evaluate import AttackSpec, evaluate, format_table
from maep_fast.models.classifiers import SmallCNN
from maep_fast.models.presets import create_mae
from maep_fast.plots import save_comparison_grid
from maep_fast.purify.maep import Purifier
from maep_fast.train.classifier import accuracy, train_classifier
from maep_fast.train.loop import LoopConfig
from maep_fast.train.maep import AttackConfig, MAEPConfig, train_maep


@dataclass
class DemoConfig:
    image_size: int = 16
    preset: str = "demo"
    classifier_epochs: int = 15
    stage1_epochs: int = 30
    stage2_epochs: int = 5
    batch_size: int = 64
    train_eps: float = 32 / 255  # L-inf radius of the training pairs and of the evaluation attacks
    train_steps: int = 5
    eval_steps: int = 20
    n_eval: int = 360  # the whole test split
    seed: int = 0
    progress: bool = True
    # MAE-Pure rows (demo settings, NOT the published S = 150 / step 1/255 / CIFAR-10 ones)
    mae_pure: bool = True
    mp_steps: int = 20
    mp_step_size: float = 4 / 255  # halved after S/2
    mp_eta: float = 32 / 255  # = the attack eps of the demo
    mp_mask_ratio: float = 0.25
    mp_n: int = 64  # fixed subset (first mp_n of a seeded shuffle of the test split)
    mp_attack_steps: int = 10  # PGD steps of the adaptive / BPDA attacks through MAE-Pure
    mp_eot: int = 2
    # MIMIR rows
    mimir: bool = True
    mimir_patch_size: int = 4  # 16 tokens: at patch 2 a ViT does not learn the digits in a CPU-minute budget
    mimir_epochs: int = 8
    mimir_ft_clean_epochs: int = 6
    mimir_ft_epochs: int = 4
    mimir_ft_steps: int = 3
    mimir_trades_beta: float | None = 6.0  # TRADES: plain PGD-AT at eps 32/255 collapses to chance in this budget
    mimir_n: int = 360
    mimir_train_n: int = 0  # 0 = the whole train split


QUICK = dict(classifier_epochs=1, stage1_epochs=1, stage2_epochs=1, train_steps=1, eval_steps=2, n_eval=32,
             mp_steps=2, mp_n=8, mp_attack_steps=1, mp_eot=1, mimir_epochs=1, mimir_ft_clean_epochs=0,
             mimir_ft_epochs=1, mimir_ft_steps=1, mimir_n=32, mimir_train_n=128)


def run_demo(out_dir: str | Path = "runs/demo", cfg: DemoConfig | None = None) -> dict:
    cfg = cfg or DemoConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    train = load_digits_dataset(cfg.image_size, "train")
    test = load_digits_dataset(cfg.image_size, "test")
    say = print if cfg.progress else (lambda *a, **k: None)
    say(f"data: embedded digits {len(train)} train / {len(test)} test, {cfg.image_size}x{cfg.image_size} grayscale")

    classifier = SmallCNN(in_chans=1, num_classes=10)
    train_classifier(classifier, train, LoopConfig(epochs=cfg.classifier_epochs, batch_size=cfg.batch_size, lr=2e-3,
                                                   weight_decay=5e-4, seed=cfg.seed, progress=cfg.progress, desc="classifier"))
    for p in classifier.parameters():
        p.requires_grad_(False)
    say(f"classifier: test accuracy {100 * accuracy(classifier, test.images, test.labels):.2f}%")

    model = create_mae(cfg.preset, img_size=cfg.image_size)
    step = cfg.train_eps / 4 if cfg.train_steps > 1 else cfg.train_eps
    mcfg = MAEPConfig(
        attack=AttackConfig(norm="linf", eps=cfg.train_eps, step_size=step, steps=cfg.train_steps),
        stage1=LoopConfig(epochs=cfg.stage1_epochs, batch_size=cfg.batch_size, lr=2e-3, seed=cfg.seed,
                          progress=cfg.progress, desc="MAEP stage 1"),
        stage2=LoopConfig(epochs=cfg.stage2_epochs, batch_size=cfg.batch_size, lr=1e-3, warmup_epochs=0.5,
                          seed=cfg.seed + 1, progress=cfg.progress, desc="MAEP stage 2 (LoRA)"),
    )
    history = train_maep(model, train, mcfg, classifier)
    t_train = time.perf_counter() - t0

    purifier = Purifier(model)
    spec = AttackSpec(norm="linf", eps=cfg.train_eps, step_size=cfg.train_eps / 8, steps=cfg.eval_steps)
    ev = test.subset(cfg.n_eval) if cfg.n_eval < len(test) else test
    t1 = time.perf_counter()
    report = evaluate(classifier, purifier, ev.images, ev.labels, spec, seed=cfg.seed, progress=cfg.progress,
                      keep_examples=8)
    t_eval = time.perf_counter() - t1

    names = {"none": "no defense", "purifier": "MAEP"}
    table = format_table(report["rows"], names)
    extra_tables = []
    mp_section = mimir_section = None
    if cfg.mae_pure:
        mp_section, mp_table = _mae_pure_rows(cfg, classifier, model, test, out)
        extra_tables.append(mp_table)
    if cfg.mimir:
        mimir_section, mimir_table, vit = _mimir_rows(cfg, classifier, train, test)
        extra_tables.append(mimir_table)
    metrics = {
        "rows": [{**r, "defense": names[r["defense"]]} for r in report["rows"]],
        "config": asdict(cfg),
        "maep_history": history,
        "seconds": {"train": round(t_train, 1), "evaluate": round(t_eval, 1)},
        **({"mae_pure": mp_section} if mp_section else {}),
        **({"mimir": mimir_section} if mimir_section else {}),
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "native_extension": native_available()},
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    ex = report["examples"]
    save_comparison_grid({"clean": ex["clean"], "adversarial": ex["adversarial"], "purified (MAEP)": ex["purified"]},
                         out / "grid.png")
    save_model(classifier, out / "classifier", meta={"data": "digits", "image_size": cfg.image_size})
    save_model(model, out / "maep", meta={"data": "digits", "image_size": cfg.image_size, "trained": "MAEP stage 1 + 2"})
    if cfg.mimir:
        save_model(vit, out / "mimir_vit", meta={"data": "digits", "image_size": cfg.image_size,
                                                 "trained": "MIMIR pretrain + adversarial finetune (demo)"})
    print(table)
    for t in extra_tables:
        print("\n" + t)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    print(f"\ntrain {t_train:.0f} s, evaluate {t_eval:.0f} s; wrote {out / 'metrics.json'}, {out / 'grid.png'}, "
          f"checkpoints {out / 'classifier'} and {out / 'maep'}")
    return metrics


def _mae_pure_rows(cfg: DemoConfig, classifier, model, test, out: Path) -> tuple[dict, str]:
    """MAE-Pure with the demo's MAEP model as the MAE, on a fixed test subset."""
    from maep_fast.evaluate import evaluate_threat_models
    from maep_fast.purify.amv import save_amv_heatmap
    from maep_fast.purify.mae_pure import MAEPure

    t = time.perf_counter()
    ev = test.subset(cfg.mp_n, seed=cfg.seed) if cfg.mp_n < len(test) else test
    pur = MAEPure(model, steps=cfg.mp_steps, step_size=cfg.mp_step_size, halve_step=True, eta=cfg.mp_eta,
                  mask_ratio=cfg.mp_mask_ratio, n_masks=1)
    torch.manual_seed(cfg.seed)
    rep = evaluate_threat_models(classifier, pur, ev.images, ev.labels, attack="pgd", norm="linf", eps=cfg.train_eps,
                                 step_size=cfg.train_eps / 4, steps=cfg.mp_attack_steps, eot=cfg.mp_eot, seed=cfg.seed,
                                 defense="MAE-Pure", include_undefended=False, progress=cfg.progress)
    # AMV (decoder attention variation, mask ratio 0) of clean vs oblivious-adversarial vs purified
    from maep_fast.attacks.pgd import pgd_attack

    k = min(32, len(ev))
    x, y = ev.images[:k], ev.labels[:k]
    x_adv = pgd_attack(classifier, x, y, eps=cfg.train_eps, step_size=cfg.train_eps / 8, steps=cfg.eval_steps)
    x_pur = pur.purify(x_adv)
    amv_adv = save_amv_heatmap(model, x, x_adv, out / "amv.png", x_purified=x_pur)
    from maep_fast.purify.amv import attention_matrix_variation

    amv_pur = attention_matrix_variation(model, x, x_pur)
    rows = [{**r, "defense": "no defense" if r["defense"] == "none" else r["defense"],
             "note": f"fixed subset of {len(ev)} test images; MAE-Pure S={cfg.mp_steps}, step {cfg.mp_step_size * 255:.0f}/255 "
                     f"(halved after S/2), eta {cfg.mp_eta * 255:.0f}/255, mask {cfg.mp_mask_ratio}, 1 mask/step; "
                     "MAE = the demo's MAEP model"} for r in rep["rows"]]
    section = {
        "rows": rows, "sanity": rep["sanity"], "settings": rep["settings"],
        "mae": "the demo's MAEP model (stage 1 + 2) used as a plain masked autoencoder (norm_pix_loss=False)",
        "amv": {"n": k, "attack": f"PGD-{cfg.eval_steps} oblivious", "adversarial": amv_adv.tolist(),
                "purified": amv_pur.tolist(), "mask_ratio": 0.0},
        "seconds": round(time.perf_counter() - t, 1),
    }
    table = "MAE-Pure (%s)\n%s" % (rows[0]["note"], format_table(rows))
    table += "\n" + "\n".join(f"[sanity {'ok  ' if c['passed'] else 'FAIL'}] {c['check']}: {c['message']}"
                                for c in rep["sanity"])
    table += "\nAMV per decoder layer, clean vs adversarial: %s; clean vs purified: %s" % (
        ", ".join(f"{v:.3f}" for v in amv_adv.tolist()), ", ".join(f"{v:.3f}" for v in amv_pur.tolist()))
    return section, table


def _mimir_rows(cfg: DemoConfig, classifier, train, test):
    """MIMIR pretrain a demo-sized MAE, build a ViT classifier, short adversarial finetune, attack."""
    from maep_fast.attacks.pgd import pgd_attack
    from maep_fast.models.vit_classifier import ViTClassifier
    from maep_fast.train.mimir import MIMIRConfig, adversarial_finetune, train_mimir

    t = time.perf_counter()
    torch.manual_seed(cfg.seed)
    if cfg.mimir_train_n and cfg.mimir_train_n < len(train):
        train = train.subset(cfg.mimir_train_n, seed=cfg.seed)
    mae = create_mae(cfg.preset, img_size=cfg.image_size, patch_size=cfg.mimir_patch_size, norm_pix_loss=True)
    mcfg = MIMIRConfig(eps=cfg.train_eps, alpha=cfg.train_eps * 10 / 8,  # MIMIR's alpha/eps = 10/8, at the demo eps
                       loop=LoopConfig(epochs=cfg.mimir_epochs, batch_size=cfg.batch_size, lr=2e-3, seed=cfg.seed,
                                       progress=cfg.progress, desc="MIMIR pretrain"))
    h_pre = train_mimir(mae, train, mcfg)
    vit = ViTClassifier.from_mae(mae, num_classes=10)
    h_ft = []
    ft_alpha = cfg.train_eps / 2 if cfg.mimir_ft_steps <= 3 else cfg.train_eps / 4
    if cfg.mimir_ft_clean_epochs:
        h_ft += adversarial_finetune(vit, train, steps=0, loop=LoopConfig(
            epochs=cfg.mimir_ft_clean_epochs, batch_size=cfg.batch_size, lr=3e-3, warmup_epochs=0.3, seed=cfg.seed,
            progress=cfg.progress, desc="MIMIR ViT clean warm-up"))
    h_ft += adversarial_finetune(vit, train, eps=cfg.train_eps, alpha=ft_alpha, steps=cfg.mimir_ft_steps,
                                 trades_beta=cfg.mimir_trades_beta, loop=LoopConfig(
        epochs=cfg.mimir_ft_epochs, batch_size=cfg.batch_size, lr=1e-3, warmup_epochs=0.3, seed=cfg.seed + 1,
        progress=cfg.progress, desc="MIMIR ViT adversarial finetune"))
    for p in vit.parameters():
        p.requires_grad_(False)
    vit.eval()
    ev = test.subset(cfg.mimir_n, seed=cfg.seed) if cfg.mimir_n < len(test) else test
    g = torch.Generator().manual_seed(cfg.seed)
    kw = dict(eps=cfg.train_eps, step_size=cfg.train_eps / 8, steps=cfg.eval_steps, norm="linf", generator=g)
    x, y = ev.images, ev.labels
    x_transfer = pgd_attack(classifier, x, y, **kw)
    x_white = pgd_attack(vit, x, y, **kw)
    n = len(ev)
    name = "MIMIR ViT"

    def row(tm, acc, note):
        attacked = tm != "none"
        return {"defense": name, "threat_model": tm, "attack": f"PGD-{cfg.eval_steps}" if attacked else "none",
                "norm": "linf" if attacked else None, "eps": cfg.train_eps if attacked else 0.0,
                "steps": cfg.eval_steps if attacked else 0, "step_size": cfg.train_eps / 8 if attacked else 0.0,
                "eot": 1 if attacked else 0, "n": n, "seed": cfg.seed, "accuracy": acc, "note": note}

    ft = (f"demo MAE at patch {cfg.mimir_patch_size}, MIMIR pretrain {cfg.mimir_epochs} ep (PGD_MAE 1 step, eps {cfg.train_eps * 255:.0f}/255, HSIC 1e-5) + "
          f"{cfg.mimir_ft_clean_epochs} clean + {cfg.mimir_ft_epochs} "
          f"{'TRADES(beta %g)' % cfg.mimir_trades_beta if cfg.mimir_trades_beta else 'PGD-AT'} PGD-{cfg.mimir_ft_steps} epochs")
    rows = [
        row("none", accuracy(vit, x, y), ft),
        row("oblivious", accuracy(vit, x_transfer, y), "transfer: PGD crafted on the undefended SmallCNN; " + ft),
        row("adaptive-full-gradient", accuracy(vit, x_white, y), "white-box PGD on the ViT itself; " + ft),
    ]
    section = {"rows": rows, "pretrain_history": h_pre, "finetune_history": h_ft,
               "config": {"pretrain": {k: v for k, v in asdict(mcfg).items() if k != "loop"},
                          "finetune": {"eps": cfg.train_eps, "alpha": ft_alpha, "steps": cfg.mimir_ft_steps,
                                       "clean_epochs": cfg.mimir_ft_clean_epochs, "adv_epochs": cfg.mimir_ft_epochs,
                                       "trades_beta": cfg.mimir_trades_beta}},
               "seconds": round(time.perf_counter() - t, 1)}
    return section, "MIMIR-pretrained ViT classifier (no purifier)\n" + format_table(rows), vit
