"""Robust-accuracy evaluation under named threat models.

Every row of a report records: defense, threat_model, attack, norm, eps,
steps, step_size, eot, n (samples), seed, accuracy. Threat models:

- ``none``:                 clean images, no attack.
- ``oblivious``:            the attack sees the bare classifier; the purifier is applied after.
- ``adaptive-full-gradient``: the attack differentiates through purifier + classifier
                            end to end (with EOT for randomized purifiers such as MAE-Pure).
- ``bpda-eot``:             straight-through (identity) gradient for the purifier, EOT-averaged.

``evaluate`` (MAEP demo / CLI default) runs PGD under the first two adaptive
settings; ``evaluate_threat_models`` adds the attack choice (our PGD,
AutoAttack standard/rand, APGD-CE/T from torchattacks), ``bpda-eot`` and
sanity checks, set by one ``EvalConfig``; ``accuracy_vs_eps`` sweeps eps and plots.

Every row is made by ``result_row`` and every attack is named by ``attack_name``
(the strict preset's names by ``strict_attack_names``).

Sanity checks (from the adaptive-attack literature: Carlini et al. 2019,
"On evaluating adversarial robustness"; Tramer et al. 2020), each reported as
``{"check", "passed", "message"}`` in ``report["sanity"]``:

- ``attack-lowers-accuracy``: no attacked row above the defense's clean row;
- ``adaptive-le-oblivious``: adaptive (full gradient, BPDA) accuracy <= oblivious;
- ``monotone-in-eps``: accuracy does not rise with eps;
- ``undefended-reaches-zero``: the undefended classifier goes to ~0 at the largest eps of a sweep.
"""
from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from maep_fast.attacks.pgd import pgd_attack
from maep_fast.purify.maep import PurifiedClassifier

# threat models (the ``threat_model`` of a row); NO_ATTACK marks the clean rows
NO_ATTACK = "none"
OBLIVIOUS = "oblivious"
ADAPTIVE = "adaptive-full-gradient"
BPDA_EOT = "bpda-eot"
THREAT_MODELS = (OBLIVIOUS, ADAPTIVE, BPDA_EOT)
ATTACKS = ("pgd", "ta-pgd", "autoattack", "apgd", "apgd-t")


def attack_name(attack: str, steps: int, version: str = "standard") -> str:
    """The name a row gives ``attack`` (one of ``ATTACKS``) run for ``steps`` iterations: ``PGD-20``,
    ``torchattacks-PGD-20``, ``AutoAttack-rand``, ``APGD-CE-100``, ``APGD-T-100``."""
    if attack == "pgd":
        return f"PGD-{steps}"
    if attack == "ta-pgd":
        return f"torchattacks-PGD-{steps}"
    from maep_fast.attacks.torchattacks_adapter import attack_name as torchattacks_name

    return torchattacks_name(attack, version, steps)


def result_row(defense: str, threat_model: str, accuracy: float, *, n: int, seed: int, attack: str = NO_ATTACK,
               norm: str | None = None, eps: float = 0.0, steps: int = 0, step_size: float | None = 0.0,
               eot: int = 0, **extra) -> dict:
    """One report row: defense, threat_model, attack, norm, eps, steps, step_size, eot, n, seed, accuracy,
    then ``extra`` in order. A clean row (threat model ``none``) has no attack: attack ``none``, norm None
    and eps, steps, step_size and EOT 0, whatever was passed."""
    attacked = threat_model != NO_ATTACK
    return {"defense": defense, "threat_model": threat_model, "attack": attack if attacked else NO_ATTACK,
            "norm": norm if attacked else None, "eps": eps if attacked else 0.0, "steps": steps if attacked else 0,
            "step_size": step_size if attacked else 0.0, "eot": eot if attacked else 0, "n": n, "seed": seed,
            "accuracy": accuracy, **extra}


@dataclass
class AttackSpec:
    norm: str = "linf"
    eps: float = 8 / 255
    step_size: float = 2 / 255
    steps: int = 20
    eot: int = 1

    @property
    def name(self) -> str:
        return attack_name("pgd", self.steps)


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
    correct: dict[tuple[str, str], int] = {}
    examples: dict[str, list] = {"clean": [], "adversarial": [], "purified": []}

    def add(key: tuple[str, str], pred: torch.Tensor, y: torch.Tensor):
        correct[key] = correct.get(key, 0) + int((pred == y).sum())

    n = images.shape[0]
    batches = range(0, n, batch_size)
    for k in tqdm(batches, desc="evaluate", leave=False, disable=not progress):
        x, y = images[k:k + batch_size].to(device), labels[k:k + batch_size].to(device)
        kw = dict(eps=attack.eps, step_size=attack.step_size, steps=attack.steps, norm=attack.norm, generator=gen)
        add(("none", NO_ATTACK), _predict(classifier, x), y)
        x_obl = pgd_attack(classifier, x, y, **kw)
        add(("none", OBLIVIOUS), _predict(classifier, x_obl), y)
        if defended is not None:
            add(("purifier", NO_ATTACK), _predict(defended, x), y)
            add(("purifier", OBLIVIOUS), _predict(defended, x_obl), y)
            x_ada = pgd_attack(defended, x, y, eot=attack.eot, **kw)
            add(("purifier", ADAPTIVE), _predict(defended, x_ada), y)
            if keep_examples and sum(t.shape[0] for t in examples["clean"]) < keep_examples:
                with torch.no_grad():
                    examples["clean"].append(x.cpu())
                    examples["adversarial"].append(x_obl.cpu())
                    examples["purified"].append(purifier(x_obl).cpu())
    rows = []
    for (defense, threat), c in correct.items():
        rows.append(result_row(defense, threat, c / n, n=n, seed=seed, attack=attack.name, norm=attack.norm,
                               eps=attack.eps, steps=attack.steps, step_size=attack.step_size,
                               eot=attack.eot if threat == ADAPTIVE else 1))
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


# --------------------------------------------------------------------------
# Threat models x attacks, sanity checks, eps sweeps
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class EvalConfig:
    """What ``evaluate_threat_models`` runs: the threat models, the attack and its budget, and the report.

    ``attack``: ``pgd`` (ours; ``step_size`` None = eps/4, random start), ``ta-pgd`` (torchattacks'
    PGD / EOTPGD with the same steps, step size and EOT), ``autoattack`` (``version`` standard or rand;
    ``n_queries`` for Square), ``apgd`` (APGD-CE), ``apgd-t``. ``eot``: gradient samples for the
    adaptive / BPDA threat models; None = 20 for randomized purifiers (``purifier.randomized`` and
    unseeded, e.g. MAE-Pure), 1 otherwise. ``n_classes`` None = read off the classifier. ``defense``
    names the purified rows; ``include_clean`` adds the clean rows, ``include_undefended`` the bare
    classifier's rows, ``sanity`` the sanity checks.
    """

    threat_models: tuple[str, ...] = THREAT_MODELS
    attack: str = "pgd"
    norm: str = "linf"
    eps: float = 8 / 255
    steps: int = 20
    step_size: float | None = None
    eot: int | None = None
    version: str = "standard"
    n_queries: int = 5000
    n_classes: int | None = None
    seed: int = 0
    batch_size: int = 256
    defense: str = "purifier"
    include_clean: bool = True
    include_undefended: bool = True
    sanity: bool = True
    progress: bool = False

    def __post_init__(self):
        object.__setattr__(self, "threat_models", tuple(self.threat_models))
        bad = [t for t in self.threat_models if t not in THREAT_MODELS]
        if bad:
            raise ValueError(f"unknown threat model(s) {bad}; choose from {THREAT_MODELS}")
        if self.attack not in ATTACKS:
            raise ValueError(f"attack must be one of {ATTACKS}, got {self.attack!r}")
        if self.norm not in ("linf", "l2"):
            raise ValueError(f"norm must be 'linf' or 'l2', got {self.norm!r}")

    @property
    def name(self) -> str:
        """The attack's row name."""
        return attack_name(self.attack, self.steps, self.version)


_EVAL_FIELDS = frozenset(f.name for f in fields(EvalConfig))


def _legacy_eval_config(config: EvalConfig | None, legacy: dict, caller: str) -> EvalConfig:
    """``config``, or the ``EvalConfig`` the deprecated keyword arguments of ``caller`` spell."""
    if not legacy:
        return config or EvalConfig()
    unknown = sorted(set(legacy) - _EVAL_FIELDS)
    if unknown:
        raise TypeError(f"{caller}() got unexpected keyword argument(s) {unknown}")
    warnings.warn(f"{caller}(..., {', '.join(legacy)}=...) is deprecated: pass config=EvalConfig(...) "
                  "(maep_fast.evaluate.EvalConfig)", DeprecationWarning, stacklevel=3)
    return replace(config or EvalConfig(), **legacy)


def markdown_table(rows: list[dict]) -> str:
    """Rows as a Markdown table: defense, threat model, attack, eps, steps, EOT, n, accuracy on every row."""
    lines = ["| defense | threat model | attack | eps | steps | EOT | n | accuracy |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        attacked = r["threat_model"] != NO_ATTACK
        eps = (f"{r['eps'] * 255:.0f}/255" if r["norm"] == "linf" else f"{r['eps']:.3g}") if attacked else "-"
        lines.append(f"| {r['defense']} | {r['threat_model']} | {r['attack'] if attacked else '-'} | {eps} | "
                     f"{r['steps'] if attacked else '-'} | {r['eot'] if attacked else '-'} | {r['n']} | "
                     f"{100 * r['accuracy']:.2f} % |")
    return "\n".join(lines)


def _is_randomized(purifier: nn.Module | None) -> bool:
    return bool(getattr(purifier, "randomized", False)) and getattr(purifier, "seed", None) is None


@torch.no_grad()
def _predict_purified(purifier: nn.Module, classifier: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One (stochastic, for randomized purifiers) pass of the deployed defense."""
    fn = getattr(purifier, "purify", None)
    return classifier(fn(x) if callable(fn) else purifier(x)).argmax(1)


def _run(model, x, y, *, attack, norm, eps, step_size, steps, eot, version, n_queries, n_classes, seed, gen):
    if attack == "pgd":
        return pgd_attack(model, x, y, eps=eps, step_size=step_size, steps=steps, norm=norm, eot=eot, generator=gen)
    if attack == "ta-pgd":
        return _torchattacks_pgd(model, x, y, norm=norm, eps=eps, step_size=step_size, steps=steps, eot=eot, seed=seed)
    from maep_fast.attacks.torchattacks_adapter import run_attack

    return run_attack(model, x, y, attack, norm=norm, eps=eps, version=version, steps=steps, eot=eot,
                      n_classes=n_classes, n_queries=n_queries, seed=seed)


def _torchattacks_pgd(model, x, y, *, norm, eps, step_size, steps, eot, seed):
    """torchattacks' own PGD (random start; EOTPGD when eot > 1; PGDL2 for L2): an attack
    implementation independent of maep_fast's, for cross-checking."""
    try:
        import torchattacks as ta
    except ImportError as exc:  # pragma: no cover - exercised only without the package
        raise ImportError("attack 'ta-pgd' needs the optional package 'torchattacks' "
                          "(pip install torchattacks==3.5.1 --no-deps)") from exc
    if norm == "l2":
        if eot > 1:
            raise ValueError("attack 'ta-pgd' with norm 'l2' has no EOT variant in torchattacks; use eot=1 or attack 'pgd'")
        atk = ta.PGDL2(model, eps=eps, alpha=step_size, steps=steps, random_start=True)
    elif eot > 1:
        atk = ta.EOTPGD(model, eps=eps, alpha=step_size, steps=steps, eot_iter=eot, random_start=True)
    else:
        atk = ta.PGD(model, eps=eps, alpha=step_size, steps=steps, random_start=True)
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        torch.manual_seed(seed)  # torchattacks draws its random start from the global RNG
        return atk(x.detach(), y.detach()).detach()


def evaluate_threat_models(
    classifier: nn.Module,
    purifier: nn.Module | None,
    images: torch.Tensor,
    labels: torch.Tensor,
    config: EvalConfig | None = None,
    **legacy,
) -> dict:
    """Accuracy of ``classifier`` and ``classifier(purifier(.))`` under each threat model of ``config``
    (an ``EvalConfig``; default ``EvalConfig()``).

    The oblivious attack targets the bare classifier (EOT 1); the adaptive and BPDA attacks go through
    the purifier with ``config.eot`` gradient samples; every prediction of a randomized defense is one
    stochastic pass. Returns ``{"rows", "sanity", "settings"}``. The former keyword arguments
    (``eps=..., steps=...``: the ``EvalConfig`` fields) still work, with a DeprecationWarning.
    """
    cfg = _legacy_eval_config(config, legacy, "evaluate_threat_models")
    threat_models = list(cfg.threat_models)
    if purifier is None and any(t != OBLIVIOUS for t in threat_models):
        threat_models = [t for t in threat_models if t == OBLIVIOUS] or [OBLIVIOUS]
    attack, norm, eps, steps, version, seed, eot = cfg.attack, cfg.norm, cfg.eps, cfg.steps, cfg.version, cfg.seed, cfg.eot
    step_size = eps / 4 if cfg.step_size is None else cfg.step_size
    defense, include_clean, include_undefended = cfg.defense, cfg.include_clean, cfg.include_undefended
    device = next(classifier.parameters()).device
    classifier.eval()
    if purifier is not None:
        purifier.eval()
    randomized = _is_randomized(purifier)
    eot_adaptive = eot if eot is not None else (20 if randomized else 1)
    n_classes = cfg.n_classes
    if n_classes is None:
        with torch.no_grad():
            n_classes = int(classifier(images[:1].to(device)).shape[1])
    from maep_fast.attacks.bpda import bpda_model

    models = {}
    if purifier is not None:
        models[ADAPTIVE] = PurifiedClassifier(purifier, classifier).eval()
        models[BPDA_EOT] = bpda_model(purifier, classifier).eval()
    gen = torch.Generator(device=device).manual_seed(seed)
    kw = dict(attack=attack, norm=norm, eps=eps, step_size=step_size, steps=steps, version=version,
              n_queries=cfg.n_queries, n_classes=n_classes, seed=seed, gen=gen)
    correct: dict[tuple[str, str], int] = {}
    eots: dict[tuple[str, str], int] = {}

    def add(key, pred, y, e):
        correct[key] = correct.get(key, 0) + int((pred == y).sum())
        eots[key] = e

    n = images.shape[0]
    batch_size = cfg.batch_size
    for k in tqdm(range(0, n, batch_size), desc="threat models", leave=False, disable=not cfg.progress):
        x, y = images[k:k + batch_size].to(device), labels[k:k + batch_size].to(device)
        if include_clean and include_undefended:
            add(("none", NO_ATTACK), _predict(classifier, x), y, 0)
        if include_clean and purifier is not None:
            add((defense, NO_ATTACK), _predict_purified(purifier, classifier, x), y, 0)
        need_obl = OBLIVIOUS in threat_models or include_undefended
        if need_obl:
            x_obl = _run(classifier, x, y, eot=1, **kw)
            if include_undefended:
                add(("none", OBLIVIOUS), _predict(classifier, x_obl), y, 1)
            if purifier is not None and OBLIVIOUS in threat_models:
                add((defense, OBLIVIOUS), _predict_purified(purifier, classifier, x_obl), y, 1)
        for tm in threat_models:
            if tm == OBLIVIOUS or purifier is None:
                continue
            from maep_fast.attacks.torchattacks_adapter import effective_eot

            e = eot_adaptive if attack in ("pgd", "ta-pgd") else effective_eot(attack, version, eot if eot is not None else (eot_adaptive if randomized else None))
            x_adv = _run(models[tm], x, y, eot=e, **kw)
            add((defense, tm), _predict_purified(purifier, classifier, x_adv), y, e)
    rows = [result_row(dname, tm, c / n, n=n, seed=seed, attack=cfg.name, norm=norm, eps=eps, steps=steps,
                       step_size=step_size if attack in ("pgd", "ta-pgd") else None, eot=eots[(dname, tm)],
                       **({"version": version} if attack == "autoattack" and tm != NO_ATTACK else {}),
                       **({"randomized_defense": randomized} if dname == defense else {}))
            for (dname, tm), c in correct.items()]
    settings = dict(threat_models=list(threat_models), attack=attack, norm=norm, eps=eps, steps=steps,
                    step_size=step_size, eot_adaptive=eot_adaptive, version=version, seed=seed, n=n,
                    randomized_defense=randomized,
                    purifier=getattr(purifier, "config", None) if purifier is not None else None)
    return {"rows": rows, "sanity": sanity_checks(rows) if cfg.sanity else [], "settings": settings}


def sanity_checks(rows: list[dict], tol: float = 0.02, zero_threshold: float = 0.1) -> list[dict]:
    """Literature sanity checks on report rows; each -> {"check", "passed", "message", ...}.

    ``tol`` absorbs sampling noise (randomized defenses, small n).
    """
    out: list[dict] = []

    def key(r):
        return (r["defense"], r["norm"], round(float(r["eps"]), 8))

    clean = {r["defense"]: r["accuracy"] for r in rows if r["threat_model"] == NO_ATTACK}
    # 1. attacks never raise accuracy above the clean accuracy
    for r in rows:
        if r["threat_model"] == NO_ATTACK or r["defense"] not in clean:
            continue
        ok = r["accuracy"] <= clean[r["defense"]] + tol
        out.append({"check": "attack-lowers-accuracy", "passed": ok, "defense": r["defense"],
                    "threat_model": r["threat_model"], "eps": r["eps"],
                    "message": f"{r['defense']} / {r['threat_model']} at eps {r['eps']:.4g}: attacked "
                               f"{100 * r['accuracy']:.1f}% vs clean {100 * clean[r['defense']]:.1f}%"
                               + ("" if ok else " -- the attack RAISES accuracy: broken attack or evaluation")})
    # 2. adaptive <= oblivious (same defense, norm, eps)
    obl = {key(r): r for r in rows if r["threat_model"] == OBLIVIOUS and r["defense"] != "none"}
    for r in rows:
        if r["threat_model"] not in (ADAPTIVE, BPDA_EOT) or key(r) not in obl:
            continue
        o = obl[key(r)]
        ok = r["accuracy"] <= o["accuracy"] + tol
        out.append({"check": "adaptive-le-oblivious", "passed": ok, "defense": r["defense"],
                    "threat_model": r["threat_model"], "eps": r["eps"],
                    "message": f"{r['defense']}: {r['threat_model']} {100 * r['accuracy']:.1f}% vs oblivious "
                               f"{100 * o['accuracy']:.1f}% at eps {r['eps']:.4g}"
                               + ("" if ok else " -- an adaptive attacker knows strictly more; a higher accuracy "
                                                "means the adaptive attack is too weak (gradient masking, too few "
                                                "steps or EOT samples)")})
    # 3. monotone in eps, 4. undefended reaches ~0 at the largest eps (sweeps only)
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["threat_model"] != NO_ATTACK:
            groups.setdefault((r["defense"], r["threat_model"], r["attack"], r["norm"]), []).append(r)
    for (dname, tm, atk, nm), rs in groups.items():
        rs = sorted(rs, key=lambda r: r["eps"])
        if len({round(float(r["eps"]), 8) for r in rs}) < 2:
            continue
        bad = [(a, b) for a, b in zip(rs, rs[1:]) if b["eps"] > a["eps"] and b["accuracy"] > a["accuracy"] + tol]
        msg = f"{dname} / {tm} / {atk}: accuracy over eps " + ", ".join(
            f"{r['eps']:.4g}->{100 * r['accuracy']:.1f}%" for r in rs)
        if bad:
            msg += " -- accuracy RISES with eps (broken attack, too few steps or gradient masking)"
        out.append({"check": "monotone-in-eps", "passed": not bad, "defense": dname, "threat_model": tm, "message": msg})
        if dname == "none":
            last = rs[-1]
            ok = last["accuracy"] <= zero_threshold
            out.append({"check": "undefended-reaches-zero", "passed": ok, "defense": dname, "threat_model": tm,
                        "eps": last["eps"],
                        "message": f"undefended classifier at the largest eps {last['eps']:.4g}: "
                                   f"{100 * last['accuracy']:.1f}% (threshold {100 * zero_threshold:.0f}%)"
                                   + ("" if ok else " -- the attack cannot even break an undefended model: "
                                                    "it is broken or too weak")})
    return out


def accuracy_vs_eps(
    classifier: nn.Module,
    purifier: nn.Module | None,
    images: torch.Tensor,
    labels: torch.Tensor,
    eps_list: list[float],
    config: EvalConfig | None = None,
    *,
    plot: str | None = None,
    sanity_tol: float = 0.02,
    zero_threshold: float = 0.1,
    **legacy,
) -> dict:
    """``evaluate_threat_models`` with ``config`` at each eps of ``eps_list`` (its ``eps`` is ignored;
    clean rows once); sanity checks over the whole sweep; optional PNG plot of accuracy vs eps per
    (defense, threat model). The former ``EvalConfig`` keyword arguments still work, with a
    DeprecationWarning."""
    if not eps_list:
        raise ValueError("eps_list must not be empty")
    cfg = _legacy_eval_config(config, legacy, "accuracy_vs_eps")
    rows: list[dict] = []
    for i, e in enumerate(sorted(eps_list)):
        rep = evaluate_threat_models(classifier, purifier, images, labels,
                                     replace(cfg, eps=e, include_clean=cfg.include_clean and i == 0, sanity=False))
        rows.extend(rep["rows"])
    report = {"rows": rows, "sanity": sanity_checks(rows, tol=sanity_tol, zero_threshold=zero_threshold),
              "settings": {**rep["settings"], "eps": sorted(eps_list)}}
    if plot:
        save_accuracy_vs_eps_plot(rows, plot)
        report["plot"] = str(plot)
    return report


def save_accuracy_vs_eps_plot(rows: list[dict], path, title: str | None = None) -> None:
    """Line plot of accuracy vs eps (x in units of 1/255 for L-inf), one line per (defense, threat model)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from pathlib import Path

    clean = {r["defense"]: r["accuracy"] for r in rows if r["threat_model"] == NO_ATTACK}
    groups: dict[tuple, list] = {}
    for r in rows:
        if r["threat_model"] != NO_ATTACK:
            groups.setdefault((r["defense"], r["threat_model"], r["attack"]), []).append(r)
    linf = any(r["norm"] == "linf" for r in rows if r["norm"])
    fig, ax = plt.subplots(figsize=(6, 4))
    for (d, tm, atk), rs in sorted(groups.items()):
        rs = sorted(rs, key=lambda r: r["eps"])
        xs = [0.0] + [r["eps"] * (255 if linf else 1) for r in rs]
        ys = [100 * clean.get(d, float("nan"))] + [100 * r["accuracy"] for r in rs]
        ax.plot(xs, ys, marker="o", label=f"{d} / {tm} ({atk}, EOT {rs[0]['eot']})")
    ax.set_xlabel("eps (x 1/255, L-inf)" if linf else "eps (L2)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    n = rows[0]["n"] if rows else 0
    ax.set_title(title or f"accuracy vs eps (n = {n})")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------
# The strict adaptive preset for randomized purifiers
# --------------------------------------------------------------------------
STRICT_STEPS = 200  # Lee & Kim (ICCV 2023) and the MAE-Pure paper: PGD-200 ...
STRICT_EOT = 20  # ... with EOT-20 and exact gradients through every purification step
STRICT_STEP_PER_EPS = 0.007 / (8 / 255)  # their step 0.007 at L-inf 8/255, scaled to other eps


def strict_attack_names(steps: int = STRICT_STEPS, eot: int = STRICT_EOT) -> dict[str, str]:
    """The row names of the strict preset's two attacks."""
    return {"pgd": f"strict-{attack_name('pgd', steps)}-EOT-{eot}",
            "autoattack": f"strict-{attack_name('autoattack', steps, 'rand')}-EOT-{eot}"}


def evaluate_strict(
    classifier: nn.Module,
    purifier: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    eps: float = 8 / 255,
    norm: str = "linf",
    steps: int = STRICT_STEPS,
    eot: int = STRICT_EOT,
    autoattack: bool = True,
    aa_steps: int = 100,
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = False,
) -> dict:
    """The strict adaptive evaluation of a (randomized) purifier: the attacker differentiates through
    every purification step and averages the gradient over ``eot`` draws of the purifier's randomness.

    * ``strict-PGD``: our PGD (random start, step 0.007 at 8/255 scaled with eps) with EOT on
      classifier(purifier(x)). MAE-Pure's differentiable forward is exact: d sign(g)/dg = 0, so the
      derivative of its S-step loop flows through the identity and the clipping only, and the graph
      it keeps holds one clipped step per purification step ([N, C, H, W] each): memory stays
      bounded at S = 150 without recomputation.
    * ``strict-AutoAttack-rand``: torchattacks' APGD-CE and APGD-DLR with EOT, ``aa_steps`` iterations.

    Each image counts as robust only if it survives both (the per-sample minimum). Rows carry
    ``preset: "strict"`` and ``budget``: ``"paper"`` at 200 steps and EOT 20 (and AutoAttack at 100
    iterations), else a string naming the reduction. Returns ``{"rows", "settings"}``.
    """
    from maep_fast._checks import check_images

    check_images(images, "images")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if isinstance(eot, bool) or not isinstance(eot, int) or eot < 1:
        raise ValueError(f"eot must be an int >= 1, got {eot!r}")
    if not (isinstance(eps, (int, float)) and eps >= 0):
        raise ValueError(f"eps must be a number >= 0, got {eps!r}")
    if labels.shape[0] != images.shape[0] or images.shape[0] == 0:
        raise ValueError(f"labels must have one entry per image ({images.shape[0]} > 0), got {labels.shape[0]}")
    device = next(classifier.parameters()).device
    classifier.eval()
    purifier.eval()
    defended = PurifiedClassifier(purifier, classifier).eval()
    names = strict_attack_names(steps, eot)
    step_size = STRICT_STEP_PER_EPS * eps
    gen = torch.Generator(device=device).manual_seed(seed)
    n = images.shape[0]
    survived = {"pgd": 0, "autoattack": 0, "both": 0}
    for k in tqdm(range(0, n, batch_size), desc="strict adaptive", leave=False, disable=not progress):
        x, y = images[k:k + batch_size].to(device), labels[k:k + batch_size].to(device)
        x_pgd = pgd_attack(defended, x, y, eps=eps, step_size=step_size, steps=steps, norm=norm, eot=eot,
                           generator=gen)
        ok = _predict_purified(purifier, classifier, x_pgd) == y
        survived["pgd"] += int(ok.sum())
        if autoattack:
            from maep_fast.attacks.torchattacks_adapter import run_attack

            x_aa = run_attack(defended, x, y, "autoattack", norm=norm, eps=eps, version="rand", steps=aa_steps,
                              eot=eot, seed=seed)
            ok_aa = _predict_purified(purifier, classifier, x_aa) == y
            survived["autoattack"] += int(ok_aa.sum())
            ok = ok & ok_aa
        survived["both"] += int(ok.sum())
    reduced = [f"{steps} of {STRICT_STEPS} steps"] if steps < STRICT_STEPS else []
    reduced += [f"EOT {eot} of {STRICT_EOT}"] if eot < STRICT_EOT else []
    reduced += [f"AutoAttack {aa_steps} of 100 iterations"] if autoattack and aa_steps < 100 else []
    budget = "paper" if not reduced else "reduced: " + ", ".join(reduced)
    base = {"defense": "purifier", "threat_model": ADAPTIVE, "norm": norm, "eps": eps, "eot": eot,
            "n": n, "seed": seed, "preset": "strict", "budget": budget}
    rows = [{**base, "attack": names["pgd"], "steps": steps, "step_size": step_size,
             "accuracy": survived["pgd"] / n}]
    if autoattack:
        rows.append({**base, "attack": names["autoattack"], "steps": aa_steps, "step_size": None,
                     "accuracy": survived["autoattack"] / n})
        rows.append({**base, "attack": f"strict-worst-of-{names['pgd']}+{attack_name('autoattack', aa_steps, 'rand')}",
                     "steps": steps,
                     "step_size": step_size, "accuracy": survived["both"] / n})
    settings = dict(eps=eps, norm=norm, steps=steps, eot=eot, step_size=step_size, autoattack=autoattack,
                    aa_steps=aa_steps, seed=seed, n=n, budget=budget,
                    purifier=getattr(purifier, "config", None))
    return {"rows": rows, "settings": settings}
