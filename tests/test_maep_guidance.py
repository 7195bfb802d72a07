"""MAEP's two options beyond the paper: classifier guidance (w_cls) and clean inputs (clean_frac)."""
import pytest
import torch
import torch.nn.functional as F

from conftest import frozen_cnn, tiny_mae
from maep_fast.cli import main
from maep_fast.train import AdversarialPairs, AttackConfig, LoopConfig, MAEPConfig, maep_loss, train_maep
from maep_fast.train.maep import _run_config, _with_clean_inputs
from test_train import loop, toy_data


def _batch(n=6, seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 8, 8, generator=g)
    return (x + 0.1 * torch.randn(n, 1, 8, 8, generator=g)).clamp(0, 1), x


@pytest.mark.parametrize("mask_ratio", [0.0, 0.5])
def test_guidance_term_is_the_kl_of_the_classifier_outputs(mask_ratio):
    model, clf = tiny_mae(), frozen_cnn()
    x_adv, x = _batch()
    torch.manual_seed(7)
    plain, plain_parts = maep_loss(model, x_adv, x, mask_ratio, 1.0, 0.5)
    torch.manual_seed(7)
    guided, parts = maep_loss(model, x_adv, x, mask_ratio, 1.0, 0.5, clf, 0.3)
    assert "kl_cls" not in plain_parts
    torch.manual_seed(7)
    latent, _, ids = model.forward_encoder(x_adv, mask_ratio)
    purified = model.unpatchify(model.forward_decoder(latent, ids)).clamp(0, 1)
    p_clean = F.softmax(clf(x), 1)
    kl = (p_clean * (p_clean.log() - F.log_softmax(clf(purified), 1))).sum(1).mean()
    torch.testing.assert_close(parts["kl_cls"], kl.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(guided, plain + 0.3 * kl, rtol=1e-5, atol=1e-7)
    assert kl > 0  # an untrained purifier changes the classifier's output


def test_guidance_gradient_reaches_the_purifier_not_the_classifier():
    model, clf = tiny_mae(), frozen_cnn()
    x_adv, x = _batch()
    loss, _ = maep_loss(model, x_adv, x, 0.0, 0.0, 0.0, clf, 1.0)  # the guidance term alone
    loss.backward()
    assert model.decoder_pred.weight.grad is not None and model.decoder_pred.weight.grad.abs().sum() > 0
    assert model.patch_embed.proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in clf.parameters())


def test_guidance_lowers_the_kl_in_training():
    torch.manual_seed(0)
    data, clf = toy_data(), frozen_cnn()
    pairs = AdversarialPairs(data.images, (data.images + 0.15 * torch.randn_like(data.images)).clamp(0, 1), data.labels)
    model = tiny_mae()

    def kl_on_pairs():
        with torch.no_grad():
            return maep_loss(model, pairs.adversarial, pairs.clean, 0.0, 0.0, 0.0, clf, 1.0)[0].item()

    before = kl_on_pairs()
    cfg = MAEPConfig(mask_ratio=0.0, w_pur=0.0, w_mae=0.0, w_cls=1.0, stage1=loop(6), stage2=loop(0))
    hist = train_maep(model, pairs, cfg, clf)
    assert "kl_cls" in hist["stage1"][-1]
    assert kl_on_pairs() < 0.7 * before


def test_clean_inputs_replace_whole_rows_at_the_given_rate():
    x = torch.zeros(4000, 1, 2, 2)
    x_adv = torch.ones(4000, 1, 2, 2)
    torch.manual_seed(0)
    out = _with_clean_inputs(x_adv, x, 0.25)
    rows = out.flatten(1)
    assert torch.all((rows == 0).all(1) | (rows == 1).all(1))  # a row is all clean or all adversarial
    assert abs((rows[:, 0] == 0).float().mean().item() - 0.25) < 0.03
    torch.manual_seed(0)
    torch.testing.assert_close(_with_clean_inputs(x_adv, x, 0.25), out, rtol=0, atol=0)  # the CPU RNG decides


def test_clean_frac_feeds_clean_inputs_to_the_loss(monkeypatch):
    import maep_fast.train.maep as maep_mod

    seen = []
    real = maep_mod.maep_loss

    def spy(model, x_adv, x, *a):
        seen.append(((x_adv - x).flatten(1).abs().amax(1) == 0).float().mean().item())
        return real(model, x_adv, x, *a)

    monkeypatch.setattr(maep_mod, "maep_loss", spy)
    data = toy_data()
    pairs = AdversarialPairs(data.images, (data.images + 0.1).clamp(0, 1) * 0.9, data.labels)
    torch.manual_seed(0)
    train_maep(tiny_mae(), pairs, MAEPConfig(clean_frac=0.5, stage1=loop(2), stage2=loop(0)))
    assert 0.3 < sum(seen) / len(seen) < 0.7
    seen.clear()
    train_maep(tiny_mae(), pairs, MAEPConfig(stage1=loop(1), stage2=loop(0)))
    assert sum(seen) == 0


@pytest.mark.parametrize("field,value", [("w_cls", -0.1), ("w_cls", float("nan")), ("w_pur", -1.0),
                                         ("w_mae", float("inf")), ("clean_frac", 1.0), ("clean_frac", -0.2)])
def test_config_rejects_bad_weights(field, value):
    with pytest.raises(ValueError, match=field):
        MAEPConfig(**{field: value})


def test_guidance_without_a_classifier_is_refused_before_training():
    data = toy_data()
    pairs = AdversarialPairs(data.images, data.images, data.labels)
    model = tiny_mae()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="w_cls"):
        train_maep(model, pairs, MAEPConfig(w_cls=1.0, stage1=loop(1), stage2=loop(0)))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="classifier"):
        maep_loss(model, data.images[:4], data.images[:4], 0.0, 1.0, 1.0, None, 1.0)


def test_plain_run_config_keeps_its_old_keys():
    """Snapshots of runs without the new options must still resume: their run config is unchanged."""
    plain = _run_config("stage1", MAEPConfig(), tiny_mae(), LoopConfig())
    assert "w_cls" not in plain and "clean_frac" not in plain
    guided = _run_config("stage1", MAEPConfig(w_cls=0.5, clean_frac=0.1), tiny_mae(), LoopConfig())
    assert guided["w_cls"] == 0.5 and guided["clean_frac"] == 0.1


def test_cli_train_with_guidance(tmp_path, capsys):
    assert main(["train-classifier", "--image-size", "8", "--subset", "64", "--epochs", "1", "--batch-size", "32",
                 "--no-progress", "--out", str(tmp_path / "clf")]) == 0
    args = ["train", "--classifier", str(tmp_path / "clf"), "--image-size", "8", "--subset", "64", "--epochs", "1",
            "--stage2-epochs", "1", "--steps", "1", "--batch-size", "32", "--no-progress", "--w-cls", "1",
            "--clean-frac", "0.2", "--eps", "28/255", "--eps-min", "4/255", "--out", str(tmp_path / "m")]
    assert main(args) == 0
    import json
    meta = json.loads((tmp_path / "m" / "maep" / "config.json").read_text())
    assert "kl_cls" in json.dumps(meta)
    run = json.loads((tmp_path / "m" / "state_stage1" / "state.json").read_text())["run_config"]
    assert abs(run["attack"]["eps_min"] - 4 / 255) < 1e-9 and abs(run["attack"]["eps"] - 28 / 255) < 1e-9
    assert run["w_cls"] == 1.0 and run["clean_frac"] == 0.2
    capsys.readouterr()
    bad = [a if a != "1" or args[i - 1] != "--w-cls" else "-1" for i, a in enumerate(args)]
    with pytest.raises(SystemExit) as exit_info:
        main([*bad[:-1], str(tmp_path / "bad")])
    assert exit_info.value.code == 2
    assert "--w-cls" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_eps_range_draws_each_batch_inside_it_and_scales_the_step():
    cfg = AttackConfig(eps=24 / 255, step_size=6 / 255, steps=3, eps_min=8 / 255)
    torch.manual_seed(0)
    draws = [cfg.draw() for _ in range(400)]
    eps = torch.tensor([e for e, _ in draws])
    assert eps.min() >= 8 / 255 and eps.max() <= 24 / 255
    assert eps.min() < 10 / 255 and eps.max() > 22 / 255  # spread over the range
    assert all(abs(s - e / 4) < 1e-12 for e, s in draws)
    assert AttackConfig(eps=0.1, step_size=0.02).draw() == (0.1, 0.02)  # no range: the fixed eps


def test_eps_range_bounds_the_training_pairs(monkeypatch):
    import maep_fast.train.maep as maep_mod

    seen = []
    real = maep_mod.maep_loss

    def spy(model, x_adv, x, *a):
        seen.append((x_adv - x).abs().amax().item())
        return real(model, x_adv, x, *a)

    monkeypatch.setattr(maep_mod, "maep_loss", spy)
    data = toy_data()
    cfg = MAEPConfig(attack=AttackConfig(eps=0.2, step_size=0.05, steps=2, eps_min=0.02),
                     stage1=loop(3), stage2=loop(0))
    torch.manual_seed(0)
    train_maep(tiny_mae(), data, cfg, frozen_cnn())
    assert max(seen) <= 0.2 + 1e-6
    assert min(seen) < 0.15 and max(seen) > 0.05 and len(set(round(v, 4) for v in seen)) > 3


@pytest.mark.parametrize("eps_min", [-0.01, 0.5, "a"])
def test_eps_range_is_checked(eps_min):
    with pytest.raises(ValueError, match="eps_min"):
        AttackConfig(eps=0.1, eps_min=eps_min)


def test_plain_attack_config_keeps_the_old_run_config():
    plain = _run_config("stage1", MAEPConfig(), tiny_mae(), LoopConfig())
    assert "eps_min" not in plain["attack"]
    ranged = _run_config("stage1", MAEPConfig(attack=AttackConfig(eps_min=0.0)), tiny_mae(), LoopConfig())
    assert ranged["attack"]["eps_min"] == 0.0

