"""Smoke tests of every CLI subcommand on tiny settings (real data, real files)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from maep_fast.cli import main
from maep_fast.data import save_images


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    assert main(["train-classifier", "--epochs", "1", "--image-size", "16", "--out", str(d / "clf"), "--no-progress"]) == 0
    assert main(["train", "--classifier", str(d / "clf"), "--image-size", "16", "--epochs", "1", "--stage2-epochs", "1",
                 "--steps", "1", "--eps", "8/255", "--batch-size", "256", "--out", str(d / "run"), "--no-progress"]) == 0
    return d


def test_train_writes_checkpoints(trained):
    assert (trained / "clf" / "model.safetensors").is_file()
    assert (trained / "run" / "maep" / "config.json").is_file()
    assert (trained / "run" / "state_stage1" / "state.json").is_file()


def test_resume_train(trained):
    assert main(["train", "--classifier", str(trained / "clf"), "--image-size", "16", "--epochs", "1", "--stage2-epochs", "1",
                 "--steps", "1", "--eps", "8/255", "--batch-size", "256", "--out", str(trained / "run"), "--resume",
                 "--no-progress"]) == 0


def test_eval_writes_report(trained, capsys):
    out = trained / "report.json"
    assert main(["eval", "--classifier", str(trained / "clf"), "--purifier", str(trained / "run" / "maep"),
                 "--image-size", "16", "--n", "16", "--steps", "2", "--eps", "8/255", "--out", str(out), "--no-progress"]) == 0
    rep = json.loads(out.read_text())
    assert {r["threat_model"] for r in rep["rows"]} == {"none", "oblivious", "adaptive-full-gradient"}
    assert "adaptive-full-gradient" in capsys.readouterr().out


def test_split_seed_trains_and_scores_on_another_digits_split(trained, tmp_path, capsys):
    clf = tmp_path / "clf1"
    assert main(["train-classifier", "--epochs", "1", "--image-size", "16", "--split-seed", "1", "--out", str(clf),
                 "--no-progress"]) == 0
    assert json.loads((clf / "config.json").read_text())["meta"]["split_seed"] == 1
    out = tmp_path / "report.json"
    assert main(["eval", "--classifier", str(clf), "--purifier", str(trained / "run" / "maep"), "--image-size", "16",
                 "--split-seed", "1", "--n", "8", "--steps", "1", "--eps", "8/255", "--out", str(out),
                 "--no-progress"]) == 0
    assert json.loads(out.read_text())["split_seed"] == 1
    assert main(["train-classifier", "--data", "cifar10", "--root", str(tmp_path), "--split-seed", "1",
                 "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    assert "digits only" in capsys.readouterr().err


def test_purify_files(trained, tmp_path):
    imgs = torch.rand(3, 1, 16, 16)
    paths = save_images(imgs, [tmp_path / f"in{i}.png" for i in range(3)])
    big = save_images(torch.rand(1, 1, 40, 24), [tmp_path / "big.png"])
    assert main(["purify", "--purifier", str(trained / "run" / "maep"), *map(str, paths), "--out-dir",
                 str(tmp_path / "out")]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["in0.png", "in1.png", "in2.png"]
    assert main(["purify", "--purifier", str(trained / "run" / "maep"), str(big[0]), "--out-dir", str(tmp_path / "o2")]) == 0
    from PIL import Image
    assert Image.open(tmp_path / "o2" / "big.png").size == (24, 40)  # larger images are tiled, size kept


def test_errors_are_reported_not_raised(tmp_path, capsys):
    assert main(["eval", "--classifier", str(tmp_path / "nope"), "--no-progress"]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--eps", "abc", "--out", str(tmp_path)])


@pytest.mark.slow
def test_demo_quick_via_module(tmp_path):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    r = subprocess.run([sys.executable, "-m", "maep_fast", "demo", "--quick", "--no-progress", "--out-dir", str(tmp_path)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "adaptive-full-gradient" in r.stdout and "oblivious" in r.stdout
    m = json.loads((tmp_path / "metrics.json").read_text())
    keys = {"defense", "threat_model", "attack", "eps", "steps", "eot", "n", "accuracy"}
    assert all(keys <= set(row) for row in m["rows"])
    tms = {(row["defense"], row["threat_model"]) for row in m["rows"]}
    assert {("MAEP", "oblivious"), ("MAEP", "adaptive-full-gradient"), ("MAE-Pure", "bpda-eot"),
            ("MAEP-rand", "adaptive-full-gradient"), ("no defense", "oblivious"),
            ("MAEP (through itself)", "adaptive-full-gradient")} <= tms
    assert (tmp_path / "maep_defended" / "model.safetensors").is_file()
    assert m["config"]["mae_pure"] and (tmp_path / "mae" / "model.safetensors").is_file()  # a plain MAE for MAE-Pure
    for f in ("grid.png", "acc_vs_eps.png", "table.md"):
        assert (tmp_path / f).stat().st_size > 100, f


@pytest.mark.slow
def test_demo_full_code_path_on_tiny_settings(tmp_path):
    """--full's code path (3 eps x our PGD, torchattacks PGD, AutoAttack; randomized MAEP; MAE-Pure and RMAE-Pure
    with the strict preset on their subset) with tiny training and attack budgets: every section, row and file is
    produced."""
    pytest.importorskip("torchattacks")
    from maep_fast.demo import FULL, QUICK, DemoConfig, run_demo
    from maep_fast.evaluate import strict_attack_names

    cfg = DemoConfig.from_flat(FULL, QUICK, {"mae_epochs": 1, "rand_eot": 2, "mp_eot": 1, "aa_steps": 1, "aa_queries": 5,
                                             "mp_aa_steps": 1, "n_eval": 8, "rand_n": 8, "mp_n": 4}, progress=False)
    m = run_demo(tmp_path, cfg)
    rows = m["rows"]
    assert {r["attack"] for r in rows} >= {"PGD-2", "torchattacks-PGD-2", "AutoAttack-standard", "AutoAttack-rand"}
    assert {round(r["eps"] * 255) for r in rows if r["threat_model"] != "none"} == {8, 16, 32}
    aa = {(r["defense"], r["attack"]) for r in rows if r["attack"].startswith("AutoAttack")}
    assert ("MAEP", "AutoAttack-standard") in aa and ("MAE-Pure", "AutoAttack-rand") in aa
    # the randomized defenses get the attacks --full names for them (budget): MAEP-rand our PGD only,
    # MAE-Pure our PGD and AutoAttack-rand
    by_defense = {d: {r["attack"] for r in rows if r["defense"] == d and r["threat_model"] != "none"}
                  for d in ("MAEP", "MAEP-rand", "MAE-Pure")}
    assert by_defense["MAEP"] == {"PGD-2", "torchattacks-PGD-2", "AutoAttack-standard"}
    assert by_defense["MAEP-rand"] == {"PGD-2"}
    # through MAE-Pure: the strict preset at the stated reduced budget (PGD and AutoAttack-rand with EOT, and
    # the per-image worst of both), only at the section's eps
    strict = {(r["defense"], r["attack"]) for r in rows if r.get("preset") == "strict"}
    names = strict_attack_names(steps=1, eot=1)
    for d in ("MAE-Pure", "RMAE-Pure"):
        assert {(d, names["pgd"]), (d, names["autoattack"])} < strict
    assert {r["threat_model"] for r in rows if r.get("preset") == "strict"} == {"adaptive-full-gradient"}
    assert all(r["budget"].startswith("reduced: 1 of 200 steps, EOT 1 of 20") and r["n"] == 4
               for r in rows if r.get("preset") == "strict")
    assert by_defense["MAE-Pure"] - {a for _, a in strict} == {"PGD-1", "AutoAttack-rand"}
    assert {round(r["eps"] * 255) for r in rows if r["threat_model"] != "none" and (
        r["defense"] == "MAEP-rand" or r["n"] == 4)} == {16}
    # RMAE-Pure: the finetuned MAE under MAE-Pure's schedule, attacks and subset
    rmae = {(r["threat_model"], r["attack"], r["n"]) for r in rows if r["defense"] == "RMAE-Pure"}
    assert {(tm, a) for tm, a, _ in rmae} >= {("oblivious", "PGD-1"), ("oblivious", "AutoAttack-rand"),
                                              ("adaptive-full-gradient", names["pgd"])}
    assert {n for *_, n in rmae} == {4} and "RMAE-Pure" in next(r for r in rows if r["defense"] == "RMAE-Pure")["note"]
    assert {c["check"] for c in m["sanity"] if c.get("defense") == "RMAE-Pure"} >= {"attack-lowers-accuracy",
                                                                                   "adaptive-le-oblivious"}
    assert (tmp_path / "rmae_pure" / "config.json").is_file()
    assert all(r["n"] == {"MAEP": 8, "MAEP-rand": 8}.get(r["defense"], r["n"]) for r in rows)
    # MAE-Pure: oblivious rows on all n_eval images, every threat model on the mp_n subset
    mp_n = {(r["threat_model"], r["n"]) for r in rows if r["defense"] == "MAE-Pure"}
    assert mp_n == {("none", 8), ("oblivious", 8), ("none", 4), ("oblivious", 4), ("adaptive-full-gradient", 4),
                    ("bpda-eot", 4)}
    clean = [(r["defense"], r["n"]) for r in rows if r["threat_model"] == "none"]
    assert len(clean) == len(set(clean))  # each clean row once
    base = [(r["attack"], r["eps"], r["n"]) for r in rows if r["defense"].startswith("no defense")]
    assert len(base) == len(set(base))  # and each undefended baseline once
    # MAEP and MAEP-rand attack the same 8 images here: one set of undefended PGD-2 rows serves both
    assert sum(r["defense"] == "no defense" and r["attack"] == "PGD-2" for r in rows) == 3
    assert m["config"]["w_cls"] == FULL["w_cls"] > 0 and "classifier guidance" in next(r for r in rows if r["defense"] == "MAEP")["note"]
    assert m["sanity"] and all({"check", "passed", "message"} <= set(c) for c in m["sanity"])
    for f in ("grid.png", "acc_vs_eps.png", "table.md", "metrics.json"):
        assert (tmp_path / f).is_file()


def test_demo_config_sections_and_the_flat_names():
    """DemoConfig nests one config per part; the former flat names map onto them (with a DeprecationWarning
    as keyword arguments and attributes, without one through from_flat), and to_flat gives them back."""
    import warnings

    from maep_fast.demo import FULL, QUICK, DemoConfig, MAEPureDemo, RandomizedDemo

    cfg = DemoConfig.from_flat(FULL, QUICK, mp_n=4)
    assert cfg.mae_pure.n == 4 and cfg.mae_pure.eot == QUICK["mp_eot"] and cfg.mae_pure.attacks == FULL["mp_attacks"]
    assert cfg.randomized == RandomizedDemo(mask_ratio=0.25, masks=2, eot=1, n=16, attacks=("pgd",), eps=(16 / 255,))
    assert cfg.mae_pure.strict and cfg.mae_pure.eps == (16 / 255,) and DemoConfig().mae_pure.eps == ()
    assert cfg.autoattack.queries == 250 and cfg.mimir.enabled and cfg.defended.epochs == 1 and cfg.maep.w_cls == 1.0
    flat = cfg.to_flat()
    assert flat["mp_n"] == 4 and flat["mae_pure"] is True and flat["mimir"] is True and flat["aa_steps"] == 10
    assert DemoConfig.from_flat(flat) == cfg
    with pytest.warns(DeprecationWarning, match="mp_n"):
        legacy = DemoConfig(mp_n=4, mae_pure=False, seed=3)
    assert legacy.mae_pure == MAEPureDemo(enabled=False, n=4) and legacy.seed == 3
    with pytest.warns(DeprecationWarning):
        assert legacy.mp_n == 4
    with pytest.warns(DeprecationWarning):
        legacy.rand_n = 7
    assert legacy.randomized.n == 7
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert DemoConfig(mae_pure=MAEPureDemo(n=4)).mae_pure.n == 4
    with pytest.raises(TypeError):
        DemoConfig.from_flat(no_such_setting=1)


def test_run_demo_is_its_stages_in_order():
    from maep_fast import demo

    assert [s.__name__ for s in demo.STAGES] == [
        "stage_classifier", "stage_maep", "stage_plain_mae", "stage_eval_maep", "stage_maep_defended",
        "stage_maep_rand", "stage_mae_pure", "stage_rmae_pure", "stage_mimir"]
    assert all(s.__doc__ for s in demo.STAGES)


def test_demo_rejects_quick_with_full(tmp_path, capsys):
    assert main(["demo", "--quick", "--full", "--out-dir", str(tmp_path)]) == 2
    assert "--quick and --full" in capsys.readouterr().err
