import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import linear_model

from maep_fast.attacks import pgd_attack
from maep_fast.evaluate import AttackSpec, evaluate, format_table


@settings(deadline=None, max_examples=15)
@given(norm=st.sampled_from(["linf", "l2"]), eps=st.floats(0.0, 0.5), steps=st.integers(0, 5), n=st.integers(1, 4))
def test_pgd_stays_in_ball_and_range(norm, eps, steps, n):
    model = linear_model()
    x = torch.rand(n, 1, 8, 8)
    y = torch.randint(0, 3, (n,))
    x_adv = pgd_attack(model, x, y, eps=eps, step_size=eps / 3 + 1e-3, steps=steps, norm=norm)
    d = (x_adv - x).reshape(n, -1)
    if norm == "linf":
        assert d.abs().max() <= eps + 1e-6
    else:
        assert torch.all(d.norm(dim=1) <= eps * (1 + 1e-5) + 1e-6)
    assert x_adv.min() >= 0 and x_adv.max() <= 1


def test_pgd_raises_the_loss_and_lowers_accuracy():
    model = linear_model()
    x = torch.rand(64, 1, 8, 8)
    y = model(x).argmax(1)  # 100 % clean accuracy by construction
    x_adv = pgd_attack(model, x, y, eps=0.1, step_size=0.02, steps=10)
    ce = torch.nn.functional.cross_entropy
    assert ce(model(x_adv), y) > ce(model(x), y)
    assert (model(x_adv).argmax(1) == y).float().mean() < 0.5


def test_pgd_bad_inputs():
    model = linear_model()
    x, y = torch.rand(2, 1, 8, 8), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="eps"):
        pgd_attack(model, x, y, eps=-0.1, step_size=0.01, steps=1)
    with pytest.raises(ValueError, match="step_size"):
        pgd_attack(model, x, y, eps=0.1, step_size=float("nan"), steps=1)
    with pytest.raises(ValueError, match="x must hold pixel values"):
        pgd_attack(model, x * 3, y, eps=0.1, step_size=0.01, steps=1)
    with pytest.raises(ValueError, match="NaN"):
        pgd_attack(model, x * float("nan"), y, eps=0.1, step_size=0.01, steps=1)
    with pytest.raises(ValueError, match="one label per image"):
        pgd_attack(model, x, torch.tensor([0]), eps=0.1, step_size=0.01, steps=1)
    with pytest.raises(ValueError, match="norm"):
        pgd_attack(model, x, y, eps=0.1, step_size=0.01, steps=1, norm="l1")
    with pytest.raises(ValueError, match="empty"):
        pgd_attack(model, x[:0], y[:0], eps=0.1, step_size=0.01, steps=1)


def test_evaluate_report_names_threat_models():
    from conftest import tiny_mae
    from maep_fast.purify import Purifier

    clf = linear_model()
    x = torch.rand(10, 1, 8, 8)
    y = clf(x).argmax(1)
    spec = AttackSpec(norm="linf", eps=0.1, step_size=0.03, steps=3)
    rep = evaluate(clf, Purifier(tiny_mae()), x, y, spec, batch_size=4, progress=False, keep_examples=3)
    rows = {(r["defense"], r["threat_model"]): r for r in rep["rows"]}
    assert set(rows) == {("none", "none"), ("none", "oblivious"), ("purifier", "none"), ("purifier", "oblivious"),
                         ("purifier", "adaptive-full-gradient")}
    for r in rep["rows"]:
        assert set(r) >= {"threat_model", "attack", "norm", "eps", "steps", "eot", "n", "accuracy"}
        assert r["n"] == 10 and 0 <= r["accuracy"] <= 1
    assert rows[("none", "none")]["accuracy"] == 1.0
    assert rows[("none", "oblivious")]["attack"] == "PGD-3" and rows[("none", "oblivious")]["eps"] == 0.1
    assert rows[("none", "oblivious")]["accuracy"] < 1.0
    assert rep["examples"]["clean"].shape == (3, 1, 8, 8)
    table = format_table(rep["rows"])
    assert "adaptive-full-gradient" in table and "25.5/255" in table
