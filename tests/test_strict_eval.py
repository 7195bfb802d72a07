"""The strict adaptive preset for randomized purifiers (``evaluate_strict``): PGD with EOT and exact
gradients through every purification step, and AutoAttack-rand, each row named and its budget stated."""
import pytest
import torch

from conftest import linear_model, tiny_mae
from maep_fast.evaluate import STRICT_EOT, STRICT_STEPS, evaluate_strict, strict_attack_names
from maep_fast.purify.mae_pure import MAEPure


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    clf = linear_model()
    x = torch.rand(6, 1, 8, 8)
    return clf, x, clf(x).argmax(1), tiny_mae().eval()


class CountingPurifier(torch.nn.Module):
    """A randomized stand-in: x + small noise, counting the differentiable calls."""

    randomized, seed = True, None

    def __init__(self):
        super().__init__()
        self.grad_calls = 0

    def forward(self, x):
        if torch.is_grad_enabled() and x.requires_grad:
            self.grad_calls += 1
        return (x + 0.01 * torch.randn_like(x)).clamp(0, 1)


def test_rows_are_named_and_the_reduced_budget_is_stated(setup):
    clf, x, y, mae = setup
    pur = MAEPure(mae, steps=2, step_size=0.02, eta=0.05)
    rep = evaluate_strict(clf, pur, x, y, eps=0.1, steps=2, eot=2, aa_steps=2, batch_size=4)
    names = strict_attack_names(2, 2)
    rows = {r["attack"]: r for r in rep["rows"]}
    assert set(rows) == {names["pgd"], names["autoattack"], f"strict-worst-of-{names['pgd']}+AutoAttack-rand"}
    for r in rep["rows"]:
        assert r["preset"] == "strict" and r["threat_model"] == "adaptive-full-gradient" and r["eot"] == 2
        assert r["n"] == 6 and 0 <= r["accuracy"] <= 1
        assert r["budget"] == "reduced: 2 of 200 steps, EOT 2 of 20, AutoAttack 2 of 100 iterations"
    worst = rows[f"strict-worst-of-{names['pgd']}+AutoAttack-rand"]["accuracy"]
    assert worst <= min(rows[names["pgd"]]["accuracy"], rows[names["autoattack"]]["accuracy"])
    assert rows[names["pgd"]]["step_size"] == pytest.approx(0.1 * 0.007 / (8 / 255))


def test_defaults_are_the_papers_budget():
    assert (STRICT_STEPS, STRICT_EOT) == (200, 20)
    assert strict_attack_names() == {"pgd": "strict-PGD-200-EOT-20", "autoattack": "strict-AutoAttack-rand-EOT-20"}


def test_every_pgd_step_averages_eot_gradients_through_the_purifier(setup):
    clf, x, y, _ = setup
    pur = CountingPurifier()
    rep = evaluate_strict(clf, pur, x, y, eps=0.05, steps=3, eot=4, autoattack=False, batch_size=6)
    assert pur.grad_calls == 3 * 4
    assert [r["attack"] for r in rep["rows"]] == ["strict-PGD-3-EOT-4"]


def test_the_attack_lowers_accuracy_through_mae_pure(setup):
    clf, x, y, mae = setup
    rep = evaluate_strict(clf, MAEPure(mae, steps=2, step_size=0.01, eta=0.02), x, y, eps=0.3, steps=5, eot=1,
                          autoattack=False)
    assert rep["rows"][0]["accuracy"] < 1.0  # a linear classifier at eps 0.3 falls under a working attack


@pytest.mark.parametrize("kw,name", [(dict(steps=0), "steps"), (dict(eot=0), "eot"), (dict(eps=-1.0), "eps")])
def test_bad_arguments_are_named(setup, kw, name):
    clf, x, y, mae = setup
    with pytest.raises(ValueError, match=name):
        evaluate_strict(clf, MAEPure(mae, steps=1), x, y, autoattack=False, **kw)


def test_cli_eval_strict(tmp_path, capsys):
    import json

    from maep_fast.cli import main

    assert main(["train-classifier", "--image-size", "8", "--subset", "32", "--epochs", "1", "--batch-size", "32",
                 "--no-progress", "--out", str(tmp_path / "clf")]) == 0
    assert main(["pretrain", "--image-size", "8", "--subset", "32", "--epochs", "1", "--batch-size", "32",
                 "--no-progress", "--out", str(tmp_path / "mae")]) == 0
    out = tmp_path / "strict.json"
    assert main(["eval", "--classifier", str(tmp_path / "clf"), "--purifier", str(tmp_path / "mae" / "mae"),
                 "--purifier-kind", "mae-pure", "--mp-steps", "2", "--image-size", "8", "--n", "4", "--eps", "8/255",
                 "--strict", "--strict-steps", "2", "--strict-eot", "2", "--strict-aa-steps", "0", "--no-progress",
                 "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert [r["attack"] for r in rep["rows"]] == ["strict-PGD-2-EOT-2"]
    assert rep["rows"][0]["budget"].startswith("reduced") and rep["rows"][0]["n"] == 4
    assert "strict-PGD-2-EOT-2" in capsys.readouterr().out
    assert main(["eval", "--classifier", str(tmp_path / "clf"), "--image-size", "8", "--n", "4", "--strict"]) == 2
