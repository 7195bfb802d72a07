"""The end-to-end demo on the embedded digits: train a classifier and a MAEP
purifier on the CPU, attack, purify, and report.

Writes ``<out>/metrics.json``, ``<out>/grid.png`` (clean | adversarial |
purified) and the checkpoints ``<out>/classifier`` and ``<out>/maep``.
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


QUICK = dict(classifier_epochs=1, stage1_epochs=1, stage2_epochs=1, train_steps=1, eval_steps=2, n_eval=32)


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
    metrics = {
        "rows": [{**r, "defense": names[r["defense"]]} for r in report["rows"]],
        "config": asdict(cfg),
        "maep_history": history,
        "seconds": {"train": round(t_train, 1), "evaluate": round(t_eval, 1)},
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "native_extension": native_available()},
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    ex = report["examples"]
    save_comparison_grid({"clean": ex["clean"], "adversarial": ex["adversarial"], "purified (MAEP)": ex["purified"]},
                         out / "grid.png")
    save_model(classifier, out / "classifier", meta={"data": "digits", "image_size": cfg.image_size})
    save_model(model, out / "maep", meta={"data": "digits", "image_size": cfg.image_size, "trained": "MAEP stage 1 + 2"})
    print(table)
    print(f"\ntrain {t_train:.0f} s, evaluate {t_eval:.0f} s; wrote {out / 'metrics.json'}, {out / 'grid.png'}, "
          f"checkpoints {out / 'classifier'} and {out / 'maep'}")
    return metrics
