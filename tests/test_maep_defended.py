"""MAEP trained through itself: ``AttackConfig(target="defended")`` makes each batch's pairs by PGD on
classifier(purifier(x)) with the purifier's current weights, at test-time settings."""
import json

import pytest
import torch
import torch.nn.functional as F

from conftest import frozen_cnn, tiny_mae
from maep_fast.attacks.pgd import pgd_attack
from maep_fast.cli import main
from maep_fast.train import AttackConfig, LoopConfig, MAEPConfig, train_maep
from maep_fast.train.maep import _run_config, defended_model, make_adversarial
from test_train import toy_data


def _xy(n=6, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


def _defended_attack(**kw):
    return AttackConfig(eps=16 / 255, step_size=4 / 255, steps=3, target="defended", **kw)


def test_defended_pairs_are_pgd_on_classifier_of_purifier():
    model, clf = tiny_mae().eval(), frozen_cnn()
    x, y = _xy()
    attack = _defended_attack()
    torch.manual_seed(11)
    got = make_adversarial(clf, x, y, attack, purifier=model)
    torch.manual_seed(11)
    want = pgd_attack(lambda z: clf(model.reconstruct(z, mask_ratio=0.0).clamp(0, 1)), x, y,
                      eps=attack.eps, step_size=attack.step_size, steps=attack.steps)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert (got - x).abs().max() <= attack.eps + 1e-6


def test_defended_pairs_follow_the_purifier_weights_classifier_pairs_do_not():
    clf = frozen_cnn()
    x, y = _xy()
    a, b = tiny_mae().eval(), tiny_mae().eval()
    with torch.no_grad():
        for p in b.parameters():
            p.add_(0.2 * torch.randn_like(p))
    outs = {}
    for target in ("classifier", "defended"):
        attack = AttackConfig(eps=16 / 255, step_size=4 / 255, steps=3, target=target)
        for name, m in (("a", a), ("b", b)):
            torch.manual_seed(5)
            outs[target, name] = make_adversarial(clf, x, y, attack, purifier=m)
    assert torch.equal(outs["classifier", "a"], outs["classifier", "b"])
    assert not torch.equal(outs["defended", "a"], outs["defended", "b"])


def test_defended_pairs_raise_the_defended_loss_more_than_classifier_pairs():
    """The point of the option: against the pipeline, its own PGD is the stronger attack."""
    model, clf = tiny_mae().eval(), frozen_cnn()
    x, y = _xy(n=32)
    f = defended_model(model, clf, AttackConfig())
    losses = {}
    for target in ("classifier", "defended"):
        torch.manual_seed(2)
        xa = make_adversarial(clf, x, y, AttackConfig(eps=16 / 255, step_size=4 / 255, steps=5, target=target),
                              purifier=model)
        with torch.no_grad():
            losses[target] = F.cross_entropy(f(xa), y).item()
    assert losses["defended"] > losses["classifier"]


def test_classifier_frac_one_gives_classifier_pairs():
    model, clf = tiny_mae().eval(), frozen_cnn()
    x, y = _xy()
    torch.manual_seed(4)
    mixed = make_adversarial(clf, x, y, _defended_attack(classifier_frac=1.0), purifier=model)
    torch.manual_seed(4)
    torch.rand(())  # the per-batch draw that chose classifier-only pairs
    plain = make_adversarial(clf, x, y, AttackConfig(eps=16 / 255, step_size=4 / 255, steps=3))
    torch.testing.assert_close(mixed, plain, rtol=0, atol=0)


@pytest.mark.parametrize("kw,mask_ratio,sigma,k", [
    (dict(purifier_mask_ratio=0.25, purifier_masks=3), 0.25, 0.0, 3),  # random masks
    (dict(purifier_noise=0.2, purifier_masks=2), 0.0, 0.2, 2),  # Gaussian input noise at mask 0
])
def test_randomized_purifier_in_the_attack_averages_fresh_draws(kw, mask_ratio, sigma, k):
    model, clf = tiny_mae().eval(), frozen_cnn()
    x, _ = _xy()
    f = defended_model(model, clf, _defended_attack(**kw))
    torch.manual_seed(8)
    got = f(x)
    torch.manual_seed(8)
    mean = torch.stack([model.reconstruct(x + sigma * torch.randn_like(x) if sigma else x, mask_ratio=mask_ratio)
                        for _ in range(k)]).mean(0)
    torch.testing.assert_close(got, clf(mean.clamp(0, 1)))
    torch.manual_seed(9)
    assert not torch.equal(f(x), got)  # fresh draws on every call
    xg = x.clone().requires_grad_(True)
    F.cross_entropy(f(xg), torch.zeros(x.shape[0], dtype=torch.long)).backward()
    assert xg.grad.abs().sum() > 0  # the attack's gradient flows through the randomized purifier


def test_input_noise_is_added_to_every_training_input():
    """With input_noise the loss sees x_adv + sigma * N(0, 1), drawn from the global RNG after the pairs."""
    from maep_fast.train.maep import _step_fn, maep_loss

    model, clf = tiny_mae().eval(), frozen_cnn()
    x, y = _xy()
    cfg = MAEPConfig(w_cls=1.0, input_noise=0.3, attack=AttackConfig(eps=8 / 255, step_size=4 / 255, steps=1))
    torch.manual_seed(4)
    got, _ = _step_fn(model, clf, cfg, 0.0)(x, y)
    torch.manual_seed(4)
    x_adv = make_adversarial(clf, x, y, cfg.attack)
    want, _ = maep_loss(model, x_adv + 0.3 * torch.randn_like(x_adv), x, 0.0, 1.0, 1.0, clf, 1.0)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.manual_seed(4)
    quiet, _ = _step_fn(model, clf, MAEPConfig(w_cls=1.0, attack=cfg.attack), 0.0)(x, y)
    assert not torch.equal(quiet, got)


def test_training_through_the_purifier_runs_and_lowers_the_defended_loss():
    torch.manual_seed(0)
    model, clf = tiny_mae(), frozen_cnn()
    ds = toy_data(n=32, size=8)
    cfg = MAEPConfig(w_cls=1.0, attack=AttackConfig(eps=16 / 255, step_size=8 / 255, steps=2, target="defended"),
                     stage1=LoopConfig(epochs=3, batch_size=16, lr=3e-3, warmup_epochs=0, progress=False),
                     stage2=LoopConfig(epochs=0, progress=False))
    hist = train_maep(model, ds, cfg, clf)["stage1"]
    assert len(hist) == 3 and all(torch.isfinite(torch.tensor(h["loss"])) for h in hist)
    assert hist[-1]["loss"] < hist[0]["loss"]


@pytest.mark.parametrize("kw,field", [
    (dict(target="purifier"), "target"), (dict(classifier_frac=1.5), "classifier_frac"),
    (dict(purifier_mask_ratio=1.0), "purifier_mask_ratio"), (dict(purifier_masks=0), "purifier_masks"),
    (dict(eot=0), "eot"), (dict(steps=-1), "steps"), (dict(eps=float("nan")), "eps"),
    (dict(step_size=-1.0), "step_size"), (dict(norm="l3"), "norm"), (dict(steps=2.5), "steps"),
    (dict(purifier_noise=-0.1), "purifier_noise"), (dict(purifier_noise=float("inf")), "purifier_noise"),
])
def test_attack_config_rejects_bad_fields(kw, field):
    with pytest.raises(ValueError, match=field):
        AttackConfig(**kw)


@pytest.mark.parametrize("ratio", [1.5, 1.0, -0.5, float("nan"), "0.5"])
def test_mask_ratio_is_validated_at_construction(ratio):
    with pytest.raises(ValueError, match="mask_ratio"):
        MAEPConfig(mask_ratio=ratio)


@pytest.mark.parametrize("kw,field", [(dict(lora_rank=0), "lora_rank"), (dict(lora_alpha=-1.0), "lora_alpha"),
                                      (dict(fused="yes"), "fused"), (dict(stage1=5), "stage1"),
                                      (dict(input_noise=-0.5), "input_noise"),
                                      (dict(input_noise=float("nan")), "input_noise")])
def test_other_maep_config_fields_are_validated(kw, field):
    with pytest.raises(ValueError, match=field):
        MAEPConfig(**kw)


def test_defended_target_needs_the_classification_loss():
    with pytest.raises(ValueError, match="w_cls"):
        MAEPConfig(attack=_defended_attack())


def test_run_config_names_the_defended_options_and_keeps_plain_runs_unchanged():
    plain = _run_config("stage1", MAEPConfig(), tiny_mae(), LoopConfig())["attack"]
    assert set(plain) == {"norm", "eps", "step_size", "steps"}
    cfg = MAEPConfig(w_cls=1.0, attack=_defended_attack(purifier_mask_ratio=0.25, purifier_masks=2, eot=4))
    run = _run_config("stage1", cfg, tiny_mae(), LoopConfig())["attack"]
    assert run["target"] == "defended" and run["purifier_masks"] == 2 and run["eot"] == 4
    noisy = MAEPConfig(w_cls=1.0, input_noise=0.25, attack=_defended_attack(purifier_noise=0.25))
    run = _run_config("stage1", noisy, tiny_mae(), LoopConfig())
    assert run["input_noise"] == 0.25 and run["attack"]["purifier_noise"] == 0.25
    assert "input_noise" not in _run_config("stage1", MAEPConfig(), tiny_mae(), LoopConfig())


def test_cli_train_through_the_purifier(tmp_path, capsys):
    assert main(["train-classifier", "--image-size", "8", "--subset", "32", "--epochs", "1", "--batch-size", "32",
                 "--no-progress", "--out", str(tmp_path / "clf")]) == 0
    args = ["train", "--classifier", str(tmp_path / "clf"), "--image-size", "8", "--subset", "32", "--epochs", "1",
            "--stage2-epochs", "1", "--steps", "1", "--batch-size", "32", "--no-progress", "--w-cls", "1",
            "--attack-target", "defended", "--classifier-frac", "0.25", "--purifier-mask-ratio", "0.25",
            "--purifier-masks", "2", "--attack-eot", "2", "--purifier-noise", "0.1", "--input-noise", "0.1",
            "--eps", "16/255", "--out", str(tmp_path / "m")]
    assert main(args) == 0
    run = json.loads((tmp_path / "m" / "state_stage1" / "state.json").read_text())["run_config"]
    assert run["attack"] == {**run["attack"], "target": "defended", "classifier_frac": 0.25,
                             "purifier_mask_ratio": 0.25, "purifier_masks": 2, "eot": 2, "purifier_noise": 0.1}
    assert run["input_noise"] == 0.1
    # finetune the result further, through itself, from --init (stage 1 only)
    again = [a if a != "1" or args[i - 1] != "--stage2-epochs" else "0" for i, a in enumerate(args)]
    assert main([*again[:-1], str(tmp_path / "m2"), "--init", str(tmp_path / "m" / "maep")]) == 0
    assert (tmp_path / "m2" / "maep" / "model.safetensors").exists()
    capsys.readouterr()
    no_guidance = [a if a != "1" or args[i - 1] != "--w-cls" else "0" for i, a in enumerate(args)]
    assert main([*no_guidance[:-1], str(tmp_path / "bad")]) == 2
    assert "w_cls" in capsys.readouterr().err

