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
  MAEP finetuned through itself; RMAE-Pure; MAE-Pure's and RMAE-Pure's adaptive rows from the strict
  preset (``evaluate_strict``) at a stated reduced budget on a test subset at 16/255;
  MIMIR ViT rows (the ``maep-fast mimir`` recipe; white-box and transferred PGD-20).

MAE-Pure runs on a *plain* MAE pretrained on the train split with the
standard MAE objective (``train_mae``), not on the MAEP model.

Writes ``<out>/metrics.json`` (every row with threat model, attack, eps,
steps, EOT, n; sanity checks per section), ``<out>/table.md``,
``<out>/acc_vs_eps.png``, ``<out>/grid.png`` (clean | adversarial | MAEP |
MAE-Pure, each image captioned with the classifier's prediction),
``<out>/amv.png`` and the checkpoints ``classifier``, ``maep``, ``mae`` and
(full demo) ``maep_defended``, ``rmae_pure`` and ``mimir_vit``.

``DemoConfig`` holds one small config per part of the demo (``maep``, ``autoattack``, ``defended``,
``randomized``, ``mae_pure``, ``rmae_pure``, ``mimir``); ``run_demo`` runs the ``STAGES`` in order, each a function of
the config and the shared ``DemoState`` that returns its report sections, then ``write_report``.
The presets ``QUICK`` and ``FULL`` are overrides in the flat names (those of metrics.json's "config"):
``DemoConfig.from_flat`` applies them, ``DemoConfig.to_flat`` gives a config's flat names back.
"""
from __future__ import annotations

import functools
import json
import platform
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch

from maep_fast._native import native_available
from maep_fast.checkpoint import save_model
from maep_fast.data import ImageDataset, load_digits_dataset
from maep_fast.evaluate import (ADAPTIVE, BPDA_EOT, NO_ATTACK, OBLIVIOUS, EvalConfig, accuracy_vs_eps, attack_name,
                                evaluate_strict, format_table, markdown_table, result_row, sanity_checks,
                                save_accuracy_vs_eps_plot, strict_attack_names)
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


@dataclass(frozen=True)
class MAEPDemo:
    """MAEP training: stage 1 on pairs made by PGD against the frozen classifier (L-inf, step eps/4),
    stage 2 decoder LoRA."""

    stage1_epochs: int = 30
    stage2_epochs: int = 5
    train_eps: float = 16 / 255
    train_eps_min: float | None = None  # set: each batch's training eps uniform in [train_eps_min, train_eps]
    train_steps: int = 5
    w_cls: float = 0.0  # MAEP classifier guidance (MAEPConfig.w_cls; 0 = the paper's loss)
    clean_frac: float = 0.0  # MAEP clean inputs per batch (MAEPConfig.clean_frac)


@dataclass(frozen=True)
class AutoAttackDemo:
    """torchattacks' AutoAttack budget (its defaults: 100 APGD/FAB iterations, 5000 Square queries)."""

    steps: int = 100
    queries: int = 5000


@dataclass(frozen=True)
class DefendedDemo:
    """MAEP finetuned through itself (AttackConfig(target="defended")), from the MAEP above: pairs by PGD on
    classifier(MAEP(x)) at mask 0 with the current weights, a share of classifier-only pairs; 0 epochs = off."""

    epochs: int = 0
    steps: int = 3  # PGD steps of the pairs, step eps/2
    eps: float = 16 / 255
    classifier_frac: float = 0.5
    lr: float = 1e-3
    train_n: int = 0  # 0 = the whole train split


@dataclass(frozen=True)
class RandomizedDemo:
    """MAEP with test-time randomness: the mean of ``masks`` reconstructions at ``mask_ratio`` > 0 (fresh masks
    every call), attacked with ``eot`` gradient samples on ``n`` test images."""

    enabled: bool = True
    mask_ratio: float = 0.25
    masks: int = 4
    eot: int = 4
    n: int = 64  # >= the test split: all test images
    attacks: tuple = ()  # () = the same as DemoConfig.attacks
    eps: tuple = ()  # () = the same as DemoConfig.eval_eps


@dataclass(frozen=True)
class MAEPureDemo:
    """MAE-Pure on a plain MAE (standard MAE pretraining on the train split) and the attacks through it."""

    enabled: bool = True
    mae_epochs: int = 25
    mae_mask_ratio: float = 0.75
    steps: int = 50
    step_size: float = 4 / 255  # halved after S/2
    eta: float = 32 / 255
    mask_ratio: float = 0.5
    masks: int = 1
    n: int = 32  # the subset for MAE-Pure's attacks through the purifier (adaptive, BPDA+EOT)
    oblivious_all: bool = False  # also MAE-Pure's oblivious rows on all n_eval images (cheap: no EOT)
    attack_steps: int = 10  # PGD steps of the adaptive / BPDA attacks through MAE-Pure
    eot: int = 2
    aa_steps: int = 10  # AutoAttack-rand APGD steps through MAE-Pure (full demo)
    attacks: tuple = ()  # () = the same as DemoConfig.attacks
    eps: tuple = ()  # eps of the attacks on the subset (also RMAE-Pure's); () = the same as DemoConfig.eval_eps
    # the adaptive rows on the subset (also RMAE-Pure's) from the strict preset (evaluate_strict) at this section's
    # reduced budget: attack_steps, eot and, with "autoattack" in the attacks, aa_steps
    strict: bool = False


@dataclass(frozen=True)
class RMAEPureDemo:
    """RMAE-Pure (``maep_fast.train.rmae_pure``): the plain MAE finetuned through MAE-Pure + classifier, then
    MAE-Pure with it at the ``mae_pure`` section's schedule, on the same subset and attacks. Off by default."""

    enabled: bool = False
    epochs: int = 2
    train_n: int = 512  # 0 = the whole train split
    lr: float = 1e-4
    eps: float = 16 / 255  # stage-I PGD eps (step eps/2)
    attack_steps: int = 3
    train_steps: int = 10  # purification steps during training (the last `unroll` differentiated)
    unroll: int = 2


@dataclass(frozen=True)
class MIMIRDemo:
    """MIMIR ViT rows (maep_fast.train.mimir.MIMIRRecipe, the `maep-fast mimir` defaults; docs/mimir.md). Off in
    the default demo (a useful robust ViT needs minutes of training there): `maep-fast mimir` trains it."""

    enabled: bool = False
    patch_size: int = 4  # 16 tokens (patch 2: 64 tokens, 4x the cost per step)
    pretrain_epochs: int = 20
    finetune_epochs: int = 15
    train_eps: float = 16 / 255  # finetuning eps, ramped up from 0 over the first 30 % of the steps
    steps: int = 3
    trades_beta: float | None = 6.0
    n: int = 360
    train_n: int = 0  # 0 = the whole train split


@dataclass
class DemoConfig:
    """The demo's settings: the shared ones here, one config per part of the demo.

    The former flat names (``mp_n``, ``rand_eot``, ``aa_steps``, ``defended_epochs``, ``mimir_n``,
    ``stage1_epochs``, the switches ``maep_rand``, ``mae_pure=True/False``, ``mimir=True/False``, ...)
    still work as keyword arguments and attributes, with a DeprecationWarning; ``from_flat`` takes them
    without one (for presets and a metrics.json "config"), ``to_flat`` gives them back.
    """

    image_size: int = 16
    preset: str = "demo"
    full: bool = False
    classifier_epochs: int = 15
    batch_size: int = 64
    seed: int = 0
    progress: bool = True
    maep: MAEPDemo = field(default_factory=MAEPDemo)
    # evaluation (L-inf, step eps/4, random start)
    eval_eps: tuple = (16 / 255,)
    eval_steps: int = 20
    attacks: tuple = ("pgd",)  # pgd (ours) | ta-pgd (torchattacks PGD/EOTPGD) | autoattack (torchattacks)
    autoattack: AutoAttackDemo = field(default_factory=AutoAttackDemo)
    n_eval: int = 360  # the whole test split
    defended: DefendedDemo = field(default_factory=DefendedDemo)
    randomized: RandomizedDemo = field(default_factory=RandomizedDemo)
    mae_pure: MAEPureDemo = field(default_factory=MAEPureDemo)
    rmae_pure: RMAEPureDemo = field(default_factory=RMAEPureDemo)
    mimir: MIMIRDemo = field(default_factory=MIMIRDemo)
    notes: list = field(default_factory=list)

    @classmethod
    def from_flat(cls, *overrides: Mapping, **names) -> DemoConfig:
        """The config from flat names (the former field names, as in ``QUICK``, ``FULL`` and metrics.json's
        "config"): ``overrides`` merged left to right, then ``names``."""
        flat = {k: v for o in (*overrides, names) for k, v in o.items()}
        cfg = cls(**{k: v for k, v in flat.items() if not _is_flat_name(k, v)})
        cfg._set_flat({k: v for k, v in flat.items() if _is_flat_name(k, v)})
        return cfg

    def to_flat(self) -> dict:
        """Every setting under its flat name, in the former field order (metrics.json's "config")."""
        out = {}
        for name, value in asdict(self).items():
            if name in _SECTIONS:
                out.update({_flat_name(name, k): v for k, v in value.items()})
            else:
                out[name] = value
        return out

    def _set_flat(self, flat: Mapping) -> None:
        changes: dict[str, dict] = {}
        for name, value in flat.items():
            section, key = _FLAT_NAMES[name]
            changes.setdefault(section, {})[key] = value
        for section, kw in changes.items():
            object.__setattr__(self, section, replace(getattr(self, section), **kw))

    def __getattr__(self, name: str):
        if name in _FLAT_NAMES and name not in _SECTIONS:
            _warn_flat(f"DemoConfig.{name}")
            section, key = _FLAT_NAMES[name]
            return getattr(getattr(self, section), key)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value) -> None:
        if _is_flat_name(name, value):
            _warn_flat(f"DemoConfig.{name} = ...")
            self._set_flat({name: value})
        else:
            object.__setattr__(self, name, value)


_SECTIONS = {"maep": MAEPDemo, "autoattack": AutoAttackDemo, "defended": DefendedDemo, "randomized": RandomizedDemo,
             "mae_pure": MAEPureDemo, "rmae_pure": RMAEPureDemo, "mimir": MIMIRDemo}
# each section's former flat names: its prefix, and the name of its on/off switch (``enabled``)
_FLAT_PREFIX = {"maep": ("", None), "autoattack": ("aa_", None), "defended": ("defended_", None),
                "randomized": ("rand_", "maep_rand"), "mae_pure": ("mp_", "mae_pure"),
                "rmae_pure": ("rmae_", "rmae_pure"), "mimir": ("mimir_", "mimir")}


def _flat_name(section: str, key: str) -> str:
    prefix, switch = _FLAT_PREFIX[section]
    if key == "enabled":
        return switch
    return key if key.startswith("mae_") else prefix + key  # the plain MAE's mae_epochs, mae_mask_ratio


_FLAT_NAMES = {_flat_name(s, f.name): (s, f.name) for s, typ in _SECTIONS.items() for f in fields(typ)}


def _is_flat_name(name: str, value) -> bool:
    """A former flat name; ``mae_pure``, ``rmae_pure`` and ``mimir`` are one only with a bool (else the section
    itself)."""
    return name in _FLAT_NAMES and not (name in _SECTIONS and isinstance(value, _SECTIONS[name]))


def _warn_flat(what: str) -> None:
    warnings.warn(f"{what}: the flat DemoConfig names are deprecated; use the sections (DemoConfig(maep=MAEPDemo("
                  "...), mae_pure=MAEPureDemo(n=...), ...)) or DemoConfig.from_flat", DeprecationWarning, stacklevel=3)


def _accept_flat_names(init):
    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        flat = {k: kwargs.pop(k) for k in list(kwargs) if _is_flat_name(k, kwargs[k])}
        init(self, *args, **kwargs)
        if flat:
            _warn_flat(f"DemoConfig({', '.join(f'{k}=...' for k in flat)})")
            self._set_flat(flat)

    return __init__


DemoConfig.__init__ = _accept_flat_names(DemoConfig.__init__)


# the presets: overrides under the flat names, for DemoConfig.from_flat
QUICK = dict(classifier_epochs=1, stage1_epochs=1, stage2_epochs=1, train_steps=1, eval_steps=2, n_eval=32,
             rand_masks=2, rand_eot=1, rand_n=16, mae_epochs=1, mp_steps=2, mp_n=8, mp_attack_steps=1, mp_eot=1,
             mimir_pretrain_epochs=1, mimir_finetune_epochs=1, mimir_steps=1, mimir_n=32, mimir_train_n=128,
             defended_epochs=1, defended_steps=1, defended_train_n=64, rmae_epochs=1, rmae_train_n=16,
             rmae_attack_steps=1, rmae_train_steps=2, rmae_unroll=1)

# --full: the quality run: MAEP stage 1 60 epochs on PGD-10 pairs at a per-batch eps in [4, 28]/255
# with classifier guidance (w_cls 1, 20 % clean inputs; the paper's loss alone at 16/255 reached oblivious
# clean - 8.6 at 90 epochs: docs/results.md, recipes), a
# longer-pretrained plain MAE, eps 8/16/32 x {our PGD-20, torchattacks PGD-20, AutoAttack} for MAEP on all test
# images. AutoAttack's budget is cut to fit 45 minutes on 2 cores (10 APGD / FAB iterations, 250 Square queries;
# its defaults, 100 and 5000, would cost hours through a purifier on a CPU: one MAEP forward+backward on the 360
# test images is ~0.75 s there). MAEP through itself: 8 epochs from that MAEP. MAEP-rand (2 masks): our PGD with
# EOT 4 on all test images at 16/255. MAE-Pure and RMAE-Pure: oblivious rows on all test images; on a fixed
# 64-image subset at 16/255, the strict preset at a reduced budget (PGD-10 with EOT 2, AutoAttack-rand with 5 steps;
# each step differentiates through 50 purification steps) and, for MAE-Pure, BPDA+EOT. Every row names attack,
# steps, EOT, n.
FULL = dict(full=True, stage1_epochs=60, stage2_epochs=5, train_steps=10, train_eps=28 / 255, train_eps_min=4 / 255,
            w_cls=1.0, clean_frac=0.2, eval_eps=(8 / 255, 16 / 255, 32 / 255),
            attacks=("pgd", "ta-pgd", "autoattack"), aa_steps=10, aa_queries=250, rand_n=360, rand_masks=2, rand_eot=4,
            rand_attacks=("pgd",), rand_eps=(16 / 255,), mae_epochs=80, mp_n=64, mp_oblivious_all=True,
            mp_eta=40 / 255, mp_mask_ratio=0.6,  # the best measured MAE-Pure schedule (docs/results.md, recipes)
            mp_attack_steps=10, mp_eot=2, mp_aa_steps=5, mp_attacks=("pgd", "autoattack"), mp_eps=(16 / 255,),
            mp_strict=True, mimir=True, defended_epochs=8, rmae_pure=True)


MIMIR_COMMAND = "maep-fast mimir --out runs/mimir"


def __getattr__(name: str):
    # RandomizedMAEP moved to maep_fast.purify.randomized; the old path keeps working for one release.
    if name == "RandomizedMAEP":
        warnings.warn("maep_fast.demo.RandomizedMAEP moved: import it from maep_fast.purify (or maep_fast); "
                      "the maep_fast.demo name goes away in the next release", DeprecationWarning, stacklevel=2)
        return _RandomizedMAEP
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


Sections = dict[str, dict]


@dataclass
class DemoState:
    """What the stages share: the output folder, the data, what the stages trained and built, the report
    sections so far (in report order) and the seconds each step took."""

    out: Path
    train: ImageDataset
    test: ImageDataset
    say: Callable[..., None]
    started: float
    seconds: dict[str, float] = field(default_factory=dict)
    sections: Sections = field(default_factory=dict)
    classifier: torch.nn.Module | None = None
    maep: torch.nn.Module | None = None
    maep_history: list = field(default_factory=list)
    mae: torch.nn.Module | None = None
    defended: torch.nn.Module | None = None
    vit: torch.nn.Module | None = None
    ev: ImageDataset | None = None  # the MAEP section's test images (all n_eval)
    purifier: Purifier | None = None
    mae_purifier: torch.nn.Module | None = None  # MAE-Pure on the plain MAE
    mae_pure_ev: ImageDataset | None = None  # MAE-Pure's attack subset
    rmae: torch.nn.Module | None = None  # the RMAE-Pure finetuned MAE

    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        """Records the seconds the block took as ``seconds[name]``."""
        t = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - t, 1)


def start(out_dir: str | Path, cfg: DemoConfig) -> DemoState:
    """Makes the output folder, seeds every RNG, loads the embedded digits and says what runs."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    set_seed(cfg.seed)
    t0 = time.perf_counter()
    train = load_digits_dataset(cfg.image_size, "train")
    test = load_digits_dataset(cfg.image_size, "test")
    say = print if cfg.progress else (lambda *a, **k: None)
    say(f"data: embedded digits {len(train)} train / {len(test)} test, {cfg.image_size}x{cfg.image_size} grayscale"
        f" ({'full' if cfg.full else 'default'} demo, {torch.get_num_threads()} thread(s))")
    return DemoState(out=out, train=train, test=test, say=say, started=t0)


def stage_classifier(cfg: DemoConfig, state: DemoState) -> Sections:
    """Trains the SmallCNN classifier on the train split and freezes it; no section."""
    with state.timed("classifier"):
        classifier = SmallCNN(in_chans=1, num_classes=10)
        train_classifier(classifier, state.train, LoopConfig(
            epochs=cfg.classifier_epochs, batch_size=cfg.batch_size, lr=2e-3, weight_decay=5e-4, seed=cfg.seed,
            progress=cfg.progress, desc="classifier"))
        for p in classifier.parameters():
            p.requires_grad_(False)
        state.classifier = classifier.eval()
    state.say(f"classifier: test accuracy {100 * accuracy(classifier, state.test.images, state.test.labels):.2f}%")
    return {}


def stage_maep(cfg: DemoConfig, state: DemoState) -> Sections:
    """Trains the MAEP purifier (stage 1 on PGD pairs against the classifier, stage 2 decoder LoRA); no section."""
    m = cfg.maep
    with state.timed("maep_train"):
        set_seed(cfg.seed)
        model = create_mae(cfg.preset, img_size=cfg.image_size)
        step = m.train_eps / 4 if m.train_steps > 1 else m.train_eps
        mcfg = MAEPConfig(
            attack=AttackConfig(norm="linf", eps=m.train_eps, step_size=step, steps=m.train_steps,
                                eps_min=m.train_eps_min),
            stage1=LoopConfig(epochs=m.stage1_epochs, batch_size=cfg.batch_size, lr=2e-3, seed=cfg.seed,
                              progress=cfg.progress, desc="MAEP stage 1"),
            stage2=LoopConfig(epochs=m.stage2_epochs, batch_size=cfg.batch_size, lr=1e-3, warmup_epochs=0.5,
                              seed=cfg.seed + 1, progress=cfg.progress, desc="MAEP stage 2 (LoRA)"),
            w_cls=m.w_cls, clean_frac=m.clean_frac,
        )
        state.maep_history = train_maep(model, state.train, mcfg, state.classifier)
        state.maep = model.eval()
    return {}


def stage_plain_mae(cfg: DemoConfig, state: DemoState) -> Sections:
    """Pretrains the plain MAE MAE-Pure runs on (standard MAE objective, pixel targets); no section."""
    mp = cfg.mae_pure
    if not mp.enabled:
        return {}
    with state.timed("mae_pretrain"):
        set_seed(cfg.seed)
        mae = create_mae(cfg.preset, img_size=cfg.image_size)  # plain MAE, pixel targets (MAE-Pure reconstructs pixels)
        mae_hist = train_mae(mae, state.train, MAEPretrainConfig(mask_ratio=mp.mae_mask_ratio, loop=LoopConfig(
            epochs=mp.mae_epochs, batch_size=cfg.batch_size, lr=2e-3, warmup_epochs=2.0, seed=cfg.seed,
            progress=cfg.progress, desc="MAE pretrain")))
        state.mae = mae.eval()
    state.say(f"plain MAE: masked reconstruction loss {mae_hist[-1]['loss']:.4f} after {mp.mae_epochs} epochs"
              if mae_hist else "plain MAE: not trained")
    return {}


def stage_eval_maep(cfg: DemoConfig, state: DemoState) -> Sections:
    """Section ``maep``: the deterministic MAEP (one pass at mask 0), oblivious and adaptive, on all n_eval
    test images."""
    m = cfg.maep
    with state.timed("eval_maep"):
        state.ev = state.test.subset(cfg.n_eval) if cfg.n_eval < len(state.test) else state.test
        state.purifier = Purifier(state.maep)
        section = _sweep(cfg, state.classifier, state.purifier, state.ev, defense="MAEP", randomized=False,
                         threat_models=(OBLIVIOUS, ADAPTIVE), eot=1, steps=cfg.eval_steps,
                         note=f"MAEP stage 1 {m.stage1_epochs} ep on PGD-{m.train_steps} pairs at eps "
                              f"{_train_eps_words(m)} (mask 0.5) + stage 2 {m.stage2_epochs} ep decoder "
                              f"LoRA at mask 0; {_loss_words(m)}; one deterministic pass at mask 0")
    return {"maep": section}


def stage_maep_defended(cfg: DemoConfig, state: DemoState) -> Sections:
    """Section ``maep_defended`` (when ``cfg.defended.epochs`` > 0): a copy of the MAEP finetuned through
    itself, then evaluated as ``stage_eval_maep`` does."""
    d = cfg.defended
    if d.epochs <= 0:
        return {}
    with state.timed("maep_defended_train"):
        state.defended = _train_defended(cfg, state.maep, state.classifier, state.train)
    with state.timed("eval_maep_defended"):
        section = _sweep(
            cfg, state.classifier, Purifier(state.defended), state.ev, defense="MAEP (through itself)",
            randomized=False, threat_models=(OBLIVIOUS, ADAPTIVE), eot=1, steps=cfg.eval_steps,
            note=f"the MAEP above, finetuned {d.epochs} ep at mask 0 on PGD-{d.steps} pairs "
                 f"made through classifier(MAEP(x)) at eps {d.eps * 255:.0f}/255 "
                 f"({100 * d.classifier_frac:.0f} % of batches against the classifier alone), "
                 f"loss l1 + MSE + {max(cfg.maep.w_cls, 1.0):g} x KL classification loss on the purified output, "
                 f"{max(cfg.maep.clean_frac, 0.2):.0%} clean inputs; one deterministic pass at mask 0")
    return {"maep_defended": section}


def stage_maep_rand(cfg: DemoConfig, state: DemoState) -> Sections:
    """Section ``maep_rand``: the same MAEP with test-time randomness (mean of several reconstructions at a
    mask ratio > 0), oblivious and adaptive with EOT, on a fixed test subset."""
    r = cfg.randomized
    if not r.enabled:
        return {}
    with state.timed("eval_maep_rand"):
        # a subset as large as ev is ev itself: rows with the same n are on the same images (the table dedup relies on it)
        ev_r = state.ev if r.n >= len(state.ev) else state.test.subset(r.n, seed=cfg.seed)
        rnd = _RandomizedMAEP(state.maep, r.mask_ratio, r.masks)
        section = _sweep(cfg, state.classifier, rnd, ev_r, defense="MAEP-rand", randomized=True,
                         attacks=r.attacks or cfg.attacks, eps=r.eps, threat_models=(OBLIVIOUS, ADAPTIVE),
                         eot=r.eot, steps=cfg.eval_steps,
                         note=f"the same MAEP model, mean of {r.masks} reconstructions at mask ratio {r.mask_ratio} "
                              f"(fresh masks every call); fixed subset of {len(ev_r)} test images")
    return {"maep_rand": section}


def stage_mae_pure(cfg: DemoConfig, state: DemoState) -> Sections:
    """Section ``mae_pure``: MAE-Pure on the plain MAE, oblivious, adaptive with EOT and BPDA+EOT on a fixed
    test subset, with the decoder's attention variation; before it (``oblivious_all``) section
    ``mae_pure_all``: the oblivious rows on all n_eval images."""
    mp = cfg.mae_pure
    if not mp.enabled:
        return {}
    from maep_fast.purify.mae_pure import MAEPure

    ev, test = state.ev, state.test
    with state.timed("eval_mae_pure"):
        ev_m = ev if mp.n >= len(ev) else test.subset(mp.n, seed=cfg.seed)
        state.mae_purifier = MAEPure(state.mae, steps=mp.steps, step_size=mp.step_size, halve_step=True, eta=mp.eta,
                                     mask_ratio=mp.mask_ratio, n_masks=mp.masks)
        sweep = functools.partial(_sweep, cfg, state.classifier, state.mae_purifier, defense="MAE-Pure",
                                  randomized=True, attacks=mp.attacks or cfg.attacks, steps=mp.attack_steps,
                                  aa_steps=mp.aa_steps)
        through = (BPDA_EOT,) if mp.strict else (ADAPTIVE, BPDA_EOT)
        subset = sweep(ev_m, eps=mp.eps, threat_models=(OBLIVIOUS, *through), eot=mp.eot,
                       note=f"plain MAE ({cfg.preset} preset, MAE pretraining {mp.mae_epochs} ep, mask "
                            f"{mp.mae_mask_ratio}); MAE-Pure S={mp.steps}, step {mp.step_size * 255:.0f}/255 halved "
                            f"after S/2, eta {mp.eta * 255:.0f}/255, mask {mp.mask_ratio}, {mp.masks} mask(s)/step; "
                            f"fixed subset of {len(ev_m)} test images")
        if mp.strict:
            subset = _add_strict(cfg, subset, state.classifier, state.mae_purifier, ev_m, defense="MAE-Pure")
        sections = {}
        if mp.oblivious_all and len(ev_m) < len(ev):
            # the oblivious rows need no gradient through the purifier: all n_eval images, listed first
            sections["mae_pure_all"] = sweep(ev, threat_models=(OBLIVIOUS,), eot=1, note=subset["note"].replace(
                f"fixed subset of {len(ev_m)} test images", f"all {len(ev)} test images, oblivious only"))
        subset["amv"] = _amv(cfg, state.classifier, state.mae, state.mae_purifier, ev_m, state.out)
        sections["mae_pure"] = subset
        state.mae_pure_ev = ev_m
    return sections


def stage_rmae_pure(cfg: DemoConfig, state: DemoState) -> Sections:
    """Section ``rmae_pure`` (when ``cfg.rmae_pure.enabled`` and MAE-Pure ran): a copy of the plain MAE finetuned
    through MAE-Pure + classifier (RMAE-Pure), then MAE-Pure on it at the same schedule, oblivious and adaptive
    with EOT on MAE-Pure's subset."""
    r, mp = cfg.rmae_pure, cfg.mae_pure
    if not (r.enabled and mp.enabled and state.mae is not None):
        return {}
    import copy

    from maep_fast.purify.mae_pure import MAEPure
    from maep_fast.train.rmae_pure import RMAEPureConfig, train_rmae_pure

    with state.timed("rmae_pure_train"):
        data = state.train if not r.train_n or r.train_n >= len(state.train) else state.train.subset(r.train_n,
                                                                                                    seed=cfg.seed)
        set_seed(cfg.seed)
        state.rmae = copy.deepcopy(state.mae).train()
        rcfg = RMAEPureConfig(eps=r.eps, attack_step_size=r.eps / 2, attack_steps=r.attack_steps,
                              train_steps=r.train_steps, step_size=mp.step_size, eta=mp.eta, mask_ratio=mp.mask_ratio,
                              n_masks=mp.masks, unroll=r.unroll,
                              loop=LoopConfig(epochs=r.epochs, batch_size=cfg.batch_size, lr=r.lr, warmup_epochs=0.5,
                                              seed=cfg.seed, progress=cfg.progress, desc="RMAE-Pure"))
        train_rmae_pure(state.rmae, data, state.classifier, rcfg)
        state.rmae.eval()
    with state.timed("eval_rmae_pure"):
        pur = MAEPure(state.rmae, steps=mp.steps, step_size=mp.step_size, halve_step=True, eta=mp.eta,
                      mask_ratio=mp.mask_ratio, n_masks=mp.masks)
        section = _sweep(cfg, state.classifier, pur, state.mae_pure_ev, defense="RMAE-Pure", randomized=True,
                         attacks=mp.attacks or cfg.attacks, steps=mp.attack_steps, aa_steps=mp.aa_steps,
                         eps=mp.eps, threat_models=(OBLIVIOUS,) if mp.strict else (OBLIVIOUS, ADAPTIVE), eot=mp.eot,
                         note=f"the plain MAE finetuned {r.epochs} ep on {len(data)} train images (RMAE-Pure: "
                              f"stage I PGD-{r.attack_steps} at {r.eps * 255:.0f}/255 through MAE-Pure S="
                              f"{r.train_steps} + classifier, stage II CE on the purified output through the last "
                              f"{r.unroll} steps, straight-through sign, + MAE loss); MAE-Pure as above, on the same "
                              f"{len(state.mae_pure_ev)} test images")
        if mp.strict:
            section = _add_strict(cfg, section, state.classifier, pur, state.mae_pure_ev, defense="RMAE-Pure")
    return {"rmae_pure": section}


def stage_mimir(cfg: DemoConfig, state: DemoState) -> Sections:
    """Section ``mimir`` (when ``cfg.mimir.enabled``): the MIMIR ViT trained and attacked (``_mimir_rows``);
    otherwise says how to train it."""
    if not cfg.mimir.enabled:
        state.say(f"MIMIR ViT: not in this demo; train it with `{MIMIR_COMMAND}` (docs/mimir.md), or run "
                  "`maep-fast demo --full`")
        return {}
    with state.timed("mimir"):
        section, _, state.vit = _mimir_rows(cfg, state.classifier, state.train, state.test)
    return {"mimir": section}


STAGES: tuple[Callable[[DemoConfig, DemoState], Sections], ...] = (
    stage_classifier, stage_maep, stage_plain_mae, stage_eval_maep, stage_maep_defended, stage_maep_rand,
    stage_mae_pure, stage_rmae_pure, stage_mimir)


def run_demo(out_dir: str | Path = "runs/demo", cfg: DemoConfig | None = None) -> dict:
    """Runs every stage of ``STAGES`` in order on one shared state, then writes the report (``write_report``);
    returns the metrics written to ``<out_dir>/metrics.json``."""
    cfg = cfg or DemoConfig()
    state = start(out_dir, cfg)
    for stage in STAGES:
        state.sections.update(stage(cfg, state))
    return write_report(cfg, state)


def write_report(cfg: DemoConfig, state: DemoState) -> dict:
    """Merges the sections' rows, writes table.md, acc_vs_eps.png, grid.png, the checkpoints and metrics.json,
    prints the table and the sanity checks; returns the metrics."""
    out, sections = state.out, state.sections
    rows = _merge_rows(sections)
    sanity = [c for sec in sections.values() for c in sec.get("sanity", [])]
    table = markdown_table(rows)
    (out / "table.md").write_text(table + "\n")
    pgd_names = (NO_ATTACK, attack_name("pgd", cfg.eval_steps), attack_name("pgd", cfg.mae_pure.attack_steps),
                 strict_attack_names(cfg.mae_pure.attack_steps, cfg.mae_pure.eot)["pgd"])
    pgd_rows = [_plot_label(r, len(state.ev)) for k, sec in sections.items() if k != "mimir" for r in sec["rows"]
                if r["attack"] in pgd_names]
    save_accuracy_vs_eps_plot(pgd_rows, out / "acc_vs_eps.png",
                              title=f"digits, L-inf, our PGD ({'full' if cfg.full else 'default'} demo)")
    _grid(cfg, state.classifier, state.purifier, state.mae_purifier, state.test, out / "grid.png")
    _save_checkpoints(cfg, state)
    state.seconds["total"] = round(time.perf_counter() - state.started, 1)
    metrics = {
        "rows": rows,
        "sanity": sanity,
        "sections": {k: {kk: vv for kk, vv in v.items() if kk != "rows"} for k, v in sections.items()},
        "config": cfg.to_flat(),
        "maep_history": state.maep_history,
        "seconds": state.seconds,
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "native_extension": native_available()},
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    print(table)
    failed = [c for c in sanity if not c["passed"]]
    print(f"\nsanity checks: {len(sanity) - len(failed)} passed, {len(failed)} failed (all in metrics.json)")
    for c in failed:
        print(f"[sanity FAIL] {c['check']}: {c['message']}")
    print(f"\nseconds: {state.seconds}")
    print(f"wrote {out / 'metrics.json'}, {out / 'table.md'}, {out / 'acc_vs_eps.png'}, {out / 'grid.png'} and the checkpoints")
    return metrics


def _merge_rows(sections: Sections) -> list[dict]:
    """The sections' rows in order; each clean row once, the undefended baseline once per attack on the same images."""
    rows: list[dict] = []
    for sec in sections.values():
        rows += [r for r in sec["rows"] if not ((r["threat_model"] == NO_ATTACK or r["defense"].startswith("no defense"))
                                                and any(_same_row(q, r) for q in rows))]
    return rows


def _save_checkpoints(cfg: DemoConfig, state: DemoState) -> None:
    """classifier, maep and, when trained, maep_defended, mae, rmae_pure and mimir_vit under the output folder."""
    out, sections = state.out, state.sections
    meta = {"data": "digits", "image_size": cfg.image_size}
    save_model(state.classifier, out / "classifier", meta=dict(meta))
    save_model(state.maep, out / "maep", meta={**meta, "trained": "MAEP stage 1 + 2"})
    if state.defended is not None:
        save_model(state.defended, out / "maep_defended", meta={**meta, "trained": sections["maep_defended"]["note"]})
    if state.mae is not None:
        mp = cfg.mae_pure
        save_model(state.mae, out / "mae",
                   meta={**meta, "trained": f"MAE pretraining {mp.mae_epochs} epochs, mask {mp.mae_mask_ratio}"})
    if state.rmae is not None:
        save_model(state.rmae, out / "rmae_pure", meta={**meta, "trained": sections["rmae_pure"]["note"]})
    if state.vit is not None:
        save_model(state.vit, out / "mimir_vit", meta={**meta, "trained": sections["mimir"]["description"]})


def _same_row(a: dict, b: dict) -> bool:
    keys = ("defense", "threat_model", "attack", "eps", "steps", "eot", "n", "seed")
    return all(a.get(k) == b.get(k) for k in keys)


def _plot_label(row: dict, n_all: int) -> dict:
    """A subset's rows get their n in the legend, so they do not join the all-images line."""
    if row["n"] < n_all and "(n=" not in row["defense"]:
        return {**row, "defense": f"{row['defense']} (n={row['n']})"}
    return row


def _train_eps_words(m: MAEPDemo) -> str:
    if m.train_eps_min is None:
        return f"{m.train_eps * 255:.0f}/255"
    return f"U[{m.train_eps_min * 255:.0f}, {m.train_eps * 255:.0f}]/255 per batch"


def _loss_words(m: MAEPDemo) -> str:
    words = "loss l1 + masked MSE (the paper's)"
    if m.w_cls:
        words += f" + {m.w_cls:g} x KL classifier guidance"
    if m.clean_frac:
        words += f", {m.clean_frac:.0%} clean inputs"
    return words


def _train_defended(cfg: DemoConfig, model, classifier, train):
    """A copy of the trained MAEP, finetuned through itself (stage 1 at mask 0, no LoRA stage)."""
    import copy

    defended = copy.deepcopy(model).train()
    for p in defended.parameters():
        p.requires_grad_(True)
    for name in ("pos_embed", "decoder_pos_embed"):
        getattr(defended, name).requires_grad_(False)
    d = cfg.defended
    data = train if not d.train_n or d.train_n >= len(train) else train.subset(d.train_n, seed=cfg.seed)
    set_seed(cfg.seed)
    eps = d.eps
    dcfg = MAEPConfig(
        mask_ratio=0.0, w_cls=max(cfg.maep.w_cls, 1.0), clean_frac=max(cfg.maep.clean_frac, 0.2),
        attack=AttackConfig(norm="linf", eps=eps, step_size=eps / 2 if d.steps > 1 else eps,
                            steps=d.steps, target="defended", classifier_frac=d.classifier_frac),
        stage1=LoopConfig(epochs=d.epochs, batch_size=cfg.batch_size, lr=d.lr, seed=cfg.seed,
                          progress=cfg.progress, desc="MAEP through itself"),
        stage2=LoopConfig(epochs=0, progress=False))
    train_maep(defended, data, dcfg, classifier)
    return defended.eval()


def _sweep(cfg: DemoConfig, classifier, purifier, ev, *, defense: str, randomized: bool, threat_models, eot: int,
           steps: int, note: str, aa_steps: int | None = None, attacks: tuple = (), eps: tuple = ()) -> dict:
    """Every attack of ``attacks`` (default ``cfg.attacks``) at every eps of ``eps`` (default ``cfg.eval_eps``)
    on ``ev``, with the undefended classifier on the same images as the baseline; rows + sanity checks + settings."""
    rows, sanity, settings = [], [], []
    base = "no defense" if len(ev) == cfg.n_eval else f"no defense (n={len(ev)})"
    for a in attacks or cfg.attacks:
        aa = a == "autoattack"
        config = EvalConfig(threat_models=tuple(threat_models), attack=a, norm="linf",
                            steps=(aa_steps or cfg.autoattack.steps) if aa else steps,
                            eot=None if aa and not randomized else eot, version="rand" if randomized else "standard",
                            seed=cfg.seed, defense=defense, n_classes=10, n_queries=cfg.autoattack.queries,
                            progress=cfg.progress)
        torch.manual_seed(cfg.seed)
        rep = accuracy_vs_eps(classifier, purifier, ev.images, ev.labels, sorted(eps or cfg.eval_eps), config)
        for r in rep["rows"]:
            if r["defense"] == "none":
                r["defense"] = base
            r["note"] = note
        rows += [r for r in rep["rows"] if not (r["threat_model"] == NO_ATTACK and any(
            q["threat_model"] == NO_ATTACK and q["defense"] == r["defense"] for q in rows))]
        sanity += rep["sanity"]
        settings.append(rep["settings"])
    return {"rows": rows, "sanity": sanity, "settings": settings, "note": note}


def _add_strict(cfg: DemoConfig, section: dict, classifier, purifier, ev, *, defense: str) -> dict:
    """``section`` (the sweep's rows on ``ev``, without adaptive rows) with the strict preset's adaptive rows
    (``evaluate_strict`` at the ``mae_pure`` section's budget, at each of its eps) and their sanity checks."""
    mp = cfg.mae_pure
    aa = "autoattack" in (mp.attacks or cfg.attacks)
    strict, settings = [], []
    for e in sorted(mp.eps or cfg.eval_eps):
        rep = evaluate_strict(classifier, purifier, ev.images, ev.labels, eps=e, norm="linf", steps=mp.attack_steps,
                              eot=mp.eot, autoattack=aa, aa_steps=mp.aa_steps, seed=cfg.seed, progress=cfg.progress)
        strict += [{**r, "defense": defense, "note": section["note"]} for r in rep["rows"]]
        settings.append({"attack": "strict", **rep["settings"], "purifier": None})
    checks = [c for c in sanity_checks(section["rows"] + strict) if c.get("threat_model") == ADAPTIVE]
    return {**section, "rows": section["rows"] + strict, "sanity": section["sanity"] + checks,
            "settings": section["settings"] + settings}


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
    return {"n": k, "attack": f"{attack_name('pgd', cfg.eval_steps)} {OBLIVIOUS} at {eps * 255:.0f}/255",
            "adversarial": amv_adv.tolist(), "purified": amv_pur.tolist(), "mask_ratio": 0.0}


def _mimir_rows(cfg: DemoConfig, classifier, train, test):
    """The MIMIR recipe (``train_mimir_vit``: MIMIR pretraining + TRADES finetuning of a ViT), then the ViT
    attacked at every eval eps: white-box PGD on the ViT itself, and PGD transferred from the SmallCNN."""
    from maep_fast.attacks.pgd import pgd_attack
    from maep_fast.train.mimir import MIMIRRecipe, train_mimir_vit

    t = time.perf_counter()
    mc = cfg.mimir
    if mc.train_n and mc.train_n < len(train):
        train = train.subset(mc.train_n, seed=cfg.seed)
    recipe = MIMIRRecipe(img_size=cfg.image_size, patch_size=mc.patch_size, pretrain_epochs=mc.pretrain_epochs,
                         finetune_epochs=mc.finetune_epochs, eps=mc.train_eps, steps=mc.steps,
                         trades_beta=mc.trades_beta, seed=cfg.seed)
    vit, _, info = train_mimir_vit(train, recipe, progress=cfg.progress)
    for p in vit.parameters():
        p.requires_grad_(False)
    vit.eval()
    ev = test.subset(mc.n, seed=cfg.seed) if mc.n < len(test) else test
    x, y = ev.images, ev.labels
    n = len(ev)
    name = "MIMIR ViT"
    ft = recipe.describe()

    def row(tm, acc, eps, note):
        return result_row(name, tm, acc, n=n, seed=cfg.seed, attack=attack_name("pgd", cfg.eval_steps), norm="linf",
                          eps=eps, steps=cfg.eval_steps, step_size=eps / 4, eot=1, note=note)

    rows = [row(NO_ATTACK, accuracy(vit, x, y), 0.0, ft)]
    for eps in sorted(cfg.eval_eps):
        kw = dict(eps=eps, step_size=eps / 4, steps=cfg.eval_steps, norm="linf")
        x_transfer = pgd_attack(classifier, x, y, generator=torch.Generator().manual_seed(cfg.seed), **kw)
        x_white = pgd_attack(vit, x, y, generator=torch.Generator().manual_seed(cfg.seed), **kw)
        rows.append(row(OBLIVIOUS, accuracy(vit, x_transfer, y), eps,
                        "transfer: PGD crafted on the undefended SmallCNN; " + ft))
        rows.append(row(ADAPTIVE, accuracy(vit, x_white, y), eps,
                        "white-box PGD on the ViT itself (the classifier is the defense); " + ft))
    section = {"rows": rows, "pretrain_history": info["pretrain_history"],
               "finetune_history": info["finetune_history"], "config": {"recipe": info["recipe"]}, "description": ft,
               "train_seconds": info["seconds"], "seconds": round(time.perf_counter() - t, 1)}
    return section, "MIMIR-pretrained ViT classifier (no purifier)\n" + format_table(rows), vit
