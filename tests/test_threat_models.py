"""Threat models, report schema, sanity checks, attack wrappers, torchattacks adapter."""
from dataclasses import replace

import pytest
import torch

from conftest import linear_model, tiny_mae
from maep_fast.attacks.bpda import BPDA, bpda_model
from maep_fast.attacks.eot import EOT, eot_grad
from maep_fast.evaluate import (THREAT_MODELS, EvalConfig, accuracy_vs_eps, attack_name, evaluate_threat_models,
                                format_table, result_row, sanity_checks)
from maep_fast.purify import Purifier
from maep_fast.purify.mae_pure import MAEPure

ROW_KEYS = {"defense", "threat_model", "attack", "norm", "eps", "steps", "eot", "n", "seed", "accuracy"}


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    clf = linear_model()
    x = torch.rand(8, 1, 8, 8)
    y = clf(x).argmax(1)
    return clf, x, y, tiny_mae().eval()


@pytest.mark.parametrize("kind", ["maep", "mae-pure"])
def test_each_threat_model_runs(setup, kind):
    clf, x, y, mae = setup
    pur = Purifier(mae) if kind == "maep" else MAEPure(mae, steps=2, step_size=0.02, eta=0.05)
    rep = evaluate_threat_models(clf, pur, x, y, EvalConfig(eps=0.1, steps=2, eot=2 if kind == "mae-pure" else None,
                                                            batch_size=4, seed=1, defense=kind))
    rows = {(r["defense"], r["threat_model"]): r for r in rep["rows"]}
    assert set(rows) == {("none", "none"), ("none", "oblivious"), (kind, "none")} | {(kind, t) for t in THREAT_MODELS}
    for r in rep["rows"]:
        assert set(r) >= ROW_KEYS and r["n"] == 8 and r["seed"] == 1 and 0 <= r["accuracy"] <= 1
    assert rows[("none", "none")]["accuracy"] == 1.0
    assert rows[(kind, "oblivious")]["eot"] == 1
    want_eot = 2 if kind == "mae-pure" else 1
    assert rows[(kind, "adaptive-full-gradient")]["eot"] == want_eot and rows[(kind, "bpda-eot")]["eot"] == want_eot
    assert rows[(kind, "bpda-eot")]["attack"] == "PGD-2"
    assert rep["settings"]["randomized_defense"] == (kind == "mae-pure")
    assert all(set(s) >= {"check", "passed", "message"} for s in rep["sanity"])
    assert "bpda-eot" in format_table(rep["rows"])


def test_randomized_purifier_defaults_to_eot_20(setup):
    clf, x, y, mae = setup
    config = EvalConfig(eps=0.05, steps=1, threat_models=("bpda-eot",), include_undefended=False)
    rep = evaluate_threat_models(clf, MAEPure(mae, steps=1), x[:2], y[:2], config)
    assert [r["eot"] for r in rep["rows"] if r["threat_model"] == "bpda-eot"] == [20]
    seeded = evaluate_threat_models(clf, MAEPure(mae, steps=1, seed=0), x[:2], y[:2], config)
    assert [r["eot"] for r in seeded["rows"] if r["threat_model"] == "bpda-eot"] == [1]


def test_bad_threat_model_and_attack(setup):
    clf, x, y, mae = setup
    with pytest.raises(ValueError, match="threat model"):
        EvalConfig(threat_models=("nope",))
    with pytest.raises(ValueError, match="attack"):
        EvalConfig(attack="fgsm")
    with pytest.raises(ValueError, match="norm"):
        EvalConfig(norm="l1")


def test_legacy_keyword_call_warns_and_matches_the_config_call(setup):
    """The former keyword arguments still work, with a DeprecationWarning, and give the same report."""
    clf, x, y, mae = setup
    new = evaluate_threat_models(clf, Purifier(mae), x, y, EvalConfig(eps=0.1, steps=2, threat_models=("oblivious",)))
    with pytest.warns(DeprecationWarning, match="EvalConfig"):
        old = evaluate_threat_models(clf, Purifier(mae), x, y, eps=0.1, steps=2, threat_models=["oblivious"])
    assert old == new
    with pytest.warns(DeprecationWarning, match="EvalConfig"):
        sweep = accuracy_vs_eps(clf, None, x, y, [0.1], steps=2)
    assert sweep["rows"] == accuracy_vs_eps(clf, None, x, y, [0.1], EvalConfig(steps=2))["rows"]
    with pytest.raises(TypeError, match="nope"):
        evaluate_threat_models(clf, None, x, y, nope=1)
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="threat model"):
        evaluate_threat_models(clf, None, x, y, threat_models=["nope"])


def test_rows_and_attack_names_have_one_schema():
    assert [attack_name(a, 7, "rand") for a in ("pgd", "ta-pgd", "autoattack", "apgd", "apgd-t")] == [
        "PGD-7", "torchattacks-PGD-7", "AutoAttack-rand", "APGD-CE-7", "APGD-T-7"]
    assert EvalConfig(attack="autoattack", version="standard").name == "AutoAttack-standard"
    clean = result_row("MAEP", "none", 0.5, n=4, seed=0, attack="PGD-2", norm="linf", eps=0.1, steps=2, eot=3)
    assert clean == {"defense": "MAEP", "threat_model": "none", "attack": "none", "norm": None, "eps": 0.0, "steps": 0,
                     "step_size": 0.0, "eot": 0, "n": 4, "seed": 0, "accuracy": 0.5}
    row = result_row("MAEP", "oblivious", 0.25, n=4, seed=1, attack="PGD-2", norm="linf", eps=0.1, steps=2,
                     step_size=0.025, eot=1, note="x")
    assert list(row) == [*clean, "note"] and row["attack"] == "PGD-2" and row["eps"] == 0.1 and row["eot"] == 1


def _row(defense, tm, eps, acc, attack="PGD-10"):
    return {"defense": defense, "threat_model": tm, "attack": attack if tm != "none" else "none",
            "norm": "linf" if tm != "none" else None, "eps": eps if tm != "none" else 0.0, "steps": 10, "eot": 1,
            "n": 100, "seed": 0, "accuracy": acc}


def test_sanity_checks_pass_on_a_consistent_report():
    rows = [_row("none", "none", 0, 0.99), _row("none", "oblivious", 0.03, 0.3), _row("none", "oblivious", 0.1, 0.0),
            _row("d", "none", 0, 0.95), _row("d", "oblivious", 0.03, 0.8), _row("d", "oblivious", 0.1, 0.6),
            _row("d", "adaptive-full-gradient", 0.03, 0.4), _row("d", "adaptive-full-gradient", 0.1, 0.1)]
    checks = sanity_checks(rows)
    assert {c["check"] for c in checks} == {"attack-lowers-accuracy", "adaptive-le-oblivious", "monotone-in-eps",
                                            "undefended-reaches-zero"}
    assert all(c["passed"] for c in checks), [c["message"] for c in checks if not c["passed"]]


def test_sanity_flags_fire_on_violations():
    rows = [_row("none", "none", 0, 0.99), _row("none", "oblivious", 0.03, 0.3), _row("none", "oblivious", 0.1, 0.5),
            _row("d", "none", 0, 0.7), _row("d", "oblivious", 0.03, 0.5), _row("d", "adaptive-full-gradient", 0.03, 0.9),
            _row("d", "bpda-eot", 0.03, 0.45)]
    failed = {(c["check"], c.get("threat_model")) for c in sanity_checks(rows) if not c["passed"]}
    assert ("monotone-in-eps", "oblivious") in failed  # undefended accuracy rises from 30 % to 50 %
    assert ("undefended-reaches-zero", "oblivious") in failed  # 50 % at the largest eps
    assert ("adaptive-le-oblivious", "adaptive-full-gradient") in failed  # 90 % > 50 %
    assert ("attack-lowers-accuracy", "adaptive-full-gradient") in failed  # 90 % > clean 70 %
    assert ("adaptive-le-oblivious", "bpda-eot") not in failed
    msgs = [c["message"] for c in sanity_checks(rows) if not c["passed"]]
    assert any("too weak" in m for m in msgs)


def test_accuracy_vs_eps_and_plot(setup, tmp_path):
    clf, x, y, mae = setup
    rep = accuracy_vs_eps(clf, Purifier(mae), x, y, [0.02, 0.5], EvalConfig(
        threat_models=("oblivious", "adaptive-full-gradient"), steps=5, step_size=0.2), plot=str(tmp_path / "sweep.png"))
    eps_rows = [r for r in rep["rows"] if r["defense"] == "none" and r["threat_model"] == "oblivious"]
    assert sorted(r["eps"] for r in eps_rows) == [0.02, 0.5]
    assert sum(r["threat_model"] == "none" for r in rep["rows"]) == 2  # clean rows once
    by = {c["check"] for c in rep["sanity"]}
    assert {"monotone-in-eps", "undefended-reaches-zero"} <= by
    und = [c for c in rep["sanity"] if c["check"] == "undefended-reaches-zero"][0]
    assert und["passed"], und["message"]  # a linear model is broken at eps 0.5
    assert (tmp_path / "sweep.png").stat().st_size > 1000


def test_bpda_forward_is_purifier_backward_is_identity(setup):
    clf, x, y, mae = setup
    pur = Purifier(mae)
    xg = x.clone().requires_grad_(True)
    out = BPDA(pur)(xg)
    assert torch.allclose(out, pur.purify(x), atol=1e-6)
    (g,) = torch.autograd.grad(out.sum(), xg)
    assert torch.equal(g, torch.ones_like(x))
    assert bpda_model(pur, clf)(x).shape == (8, 3)


def test_eot_averages():
    calls = []

    class Noisy(torch.nn.Module):
        def forward(self, x):
            calls.append(1)
            return x.flatten(1)[:, :3] * (len(calls) % 2 + 1.0)

    x = torch.rand(2, 1, 8, 8)
    out = EOT(Noisy(), n=4)(x)
    assert len(calls) == 4 and torch.allclose(out, x.flatten(1)[:, :3] * 1.5)
    lin = linear_model()
    g = eot_grad(lin, x, torch.tensor([0, 1]), n=3)
    assert torch.allclose(g, eot_grad(lin, x, torch.tensor([0, 1]), n=1), atol=1e-6)
    with pytest.raises(ValueError):
        EOT(lin, n=0)


def test_autoattack_adapter_on_a_linear_model():
    pytest.importorskip("torchattacks")
    from maep_fast.attacks.torchattacks_adapter import build_attack, run_attack

    torch.manual_seed(0)
    clf = linear_model(k=10)
    x = torch.rand(4, 1, 8, 8)
    y = clf(x).argmax(1)
    for attack, kw in [("apgd", {}), ("apgd-t", {}), ("autoattack", {"version": "standard", "n_queries": 20}),
                       ("autoattack", {"version": "rand", "eot": 2})]:
        x_adv = run_attack(clf, x, y, attack, norm="linf", eps=0.3, steps=5, n_classes=10, **kw)
        assert x_adv.shape == x.shape and (x_adv - x).abs().max() <= 0.3 + 1e-5
        assert x_adv.min() >= 0 and x_adv.max() <= 1
        assert (clf(x_adv).argmax(1) == y).float().mean() <= 0.5, attack
    x_adv = run_attack(clf, x, y, "apgd", norm="l2", eps=1.0, steps=5, n_classes=10)
    assert (x_adv - x).flatten(1).norm(dim=1).max() <= 1.0 + 1e-4
    with pytest.raises(ValueError):
        build_attack(clf, "autoattack", version="plus")
    with pytest.raises(ValueError, match="at least 4 classes"):
        build_attack(linear_model(k=3), "apgd-t", n_classes=3)
    rep = evaluate_threat_models(clf, None, x, y, EvalConfig(attack="apgd", eps=0.3, steps=5))
    assert [r["attack"] for r in rep["rows"] if r["threat_model"] == "oblivious"] == ["APGD-CE-5"]


def test_cli_eval_threat_models_and_purify_mae_pure(tmp_path, capsys):
    import json

    from maep_fast.checkpoint import save_model
    from maep_fast.cli import main
    from maep_fast.data import save_images
    from maep_fast.models.classifiers import SmallCNN

    torch.manual_seed(0)
    save_model(SmallCNN(in_chans=1, num_classes=10, width=4), tmp_path / "clf")
    save_model(tiny_mae(), tmp_path / "mae")
    mp = ["--mp-steps", "2", "--mp-step-size", "4/255", "--mp-eta", "8/255"]
    out = tmp_path / "rep.json"
    assert main(["eval", "--classifier", str(tmp_path / "clf"), "--purifier", str(tmp_path / "mae"), "--image-size", "8",
                 "--n", "6", "--steps", "1", "--eps", "8/255", "--purifier-kind", "mae-pure", "--eot-adaptive", "1",
                 "--threat-models", "oblivious,bpda-eot", "--out", str(out), "--no-progress", *mp]) == 0
    rep = json.loads(out.read_text())
    assert {r["threat_model"] for r in rep["rows"]} == {"none", "oblivious", "bpda-eot"}
    assert rep["settings"]["purifier"]["steps"] == 2 and "sanity" in rep
    assert "[sanity" in capsys.readouterr().out
    out2 = tmp_path / "sweep.json"
    assert main(["eval", "--classifier", str(tmp_path / "clf"), "--image-size", "8", "--n", "4", "--steps", "1",
                 "--eps-sweep", "4/255,64/255", "--out", str(out2), "--no-progress"]) == 0
    assert (tmp_path / "sweep.png").is_file()
    paths = save_images(torch.rand(2, 1, 8, 8), [tmp_path / f"in{i}.png" for i in range(2)])
    assert main(["purify", "--method", "mae-pure", "--purifier", str(tmp_path / "mae"), *map(str, paths),
                 "--out-dir", str(tmp_path / "o"), *mp]) == 0
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["in0.png", "in1.png"]


def test_torchattacks_pgd_matches_ours_in_strength_and_reports_its_name(setup):
    """attack="ta-pgd": torchattacks' own PGD (EOTPGD for EOT > 1) as an independent cross-check."""
    pytest.importorskip("torchattacks")
    clf, x, y, mae = setup
    config = EvalConfig(eps=0.3, steps=10, threat_models=("oblivious",), seed=0)
    ours = evaluate_threat_models(clf, None, x, y, config)
    theirs = evaluate_threat_models(clf, None, x, y, replace(config, attack="ta-pgd"))
    row = {r["threat_model"]: r for r in theirs["rows"]}
    assert row["oblivious"]["attack"] == "torchattacks-PGD-10" and row["oblivious"]["step_size"] == pytest.approx(0.075)
    acc = {r["threat_model"]: r["accuracy"] for r in ours["rows"]}
    assert row["none"]["accuracy"] == 1.0 and row["oblivious"]["accuracy"] < 1.0  # it attacks
    assert abs(row["oblivious"]["accuracy"] - acc["oblivious"]) <= 0.25  # two PGD implementations, same strength
    rand = evaluate_threat_models(clf, MAEPure(mae, steps=1, step_size=0.02, eta=0.05), x[:4], y[:4], EvalConfig(
        attack="ta-pgd", eps=0.1, steps=2, eot=3, threat_models=("adaptive-full-gradient",), include_undefended=False))
    assert [r["eot"] for r in rand["rows"] if r["threat_model"] != "none"] == [3]


def test_markdown_table_names_every_setting():
    from maep_fast.evaluate import markdown_table

    rows = [{"defense": "MAEP", "threat_model": "none", "attack": "none", "norm": None, "eps": 0.0, "steps": 0,
             "eot": 0, "n": 360, "accuracy": 0.95},
            {"defense": "MAEP", "threat_model": "adaptive-full-gradient", "attack": "PGD-20", "norm": "linf",
             "eps": 16 / 255, "steps": 20, "eot": 4, "n": 360, "accuracy": 0.5}]
    lines = markdown_table(rows).splitlines()
    assert lines[0] == "| defense | threat model | attack | eps | steps | EOT | n | accuracy |"
    assert lines[2] == "| MAEP | none | - | - | - | - | 360 | 95.00 % |"
    assert lines[3] == "| MAEP | adaptive-full-gradient | PGD-20 | 16/255 | 20 | 4 | 360 | 50.00 % |"
