"""RMAE-Pure (``maep_fast.train.rmae_pure``): stage I PGD through MAE-Pure + classifier, stage II finetune of
the MAE with a straight-through sign on the last purification steps; ``maep-fast rmae-pure``."""
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import cli_rc, frozen_cnn
from maep_fast.checkpoint import load_model, save_model
from maep_fast.cli import main
from maep_fast.data import load_digits_dataset
from maep_fast.models.presets import create_mae
from maep_fast.purify.mae_pure import MAEPure
from maep_fast.train import LoopConfig, RMAEPureConfig, train_rmae_pure
from maep_fast.train import rmae_pure as R

pytestmark = pytest.mark.usefixtures("one_thread")

# tiny schedule: 1-step attack, 3 purification steps of which the last 2 carry the gradient
TINY = dict(attack_steps=1, train_steps=3, unroll=2, step_size=4 / 255, eta=16 / 255)


def _mae(seed=0):
    torch.manual_seed(seed)
    return create_mae("demo", img_size=16)


@pytest.fixture(scope="module")
def digits():
    return load_digits_dataset(16, "train")


@pytest.fixture(scope="module")
def linear_clf(digits):
    """A logistic-regression classifier fit on the digits (about 98% train accuracy), frozen."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        clf = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 10))
    opt = torch.optim.Adam(clf.parameters(), lr=0.05)
    for _ in range(100):
        loss = F.cross_entropy(clf(digits.images), digits.labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for p in clf.parameters():
        p.requires_grad_(False)
    return clf.eval()


def _cfg(epochs=1, batch_size=8, lr=1e-3, seed=0, **kw):
    loop_kw = {k: kw.pop(k) for k in ("state_dir", "resume", "snapshot_every") if k in kw}
    return RMAEPureConfig(**{**TINY, **kw}, loop=LoopConfig(epochs=epochs, batch_size=batch_size, lr=lr,
                                                            warmup_epochs=0, seed=seed, progress=False, **loop_kw))


# ----------------------------------------------------------------- config
@pytest.mark.parametrize("field,value", [
    ("norm", "l1"), ("eps", -1.0), ("attack_step_size", float("nan")), ("attack_steps", -1), ("eot", 0),
    ("train_steps", 0), ("step_size", -0.1), ("halve_step", 1), ("eta", "8/255"), ("mask_ratio", 0.0),
    ("mask_ratio", 1.0), ("n_masks", 0), ("mask_seed", -1), ("unroll", 0), ("surrogate_temperature", 0.0),
    ("w_cls", -1.0), ("w_rec", float("inf")), ("rec_mask_ratio", 1.5), ("clean_frac", 1.0),
    ("regenerate_every", 0), ("fused", "yes"), ("loop", {"epochs": 1}),
])
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        RMAEPureConfig(**{field: value})


def test_config_relations_and_defaults():
    with pytest.raises(ValueError, match="unroll must be <= train_steps"):
        RMAEPureConfig(train_steps=3, unroll=4)
    with pytest.raises(ValueError, match="w_cls and w_rec"):
        RMAEPureConfig(w_cls=0.0, w_rec=0.0)
    loop = LoopConfig()
    loop.epochs = -1
    with pytest.raises(ValueError, match="epochs"):  # the loop is validated too
        RMAEPureConfig(loop=loop)
    cfg = RMAEPureConfig()
    assert (cfg.norm, cfg.eps, cfg.attack_steps, cfg.eot) == ("linf", 8 / 255, 10, 1)
    assert (cfg.train_steps, cfg.unroll, cfg.w_cls, cfg.w_rec, cfg.regenerate_every) == (10, 2, 1.0, 1.0, 1)
    pure = MAEPure.__init__.__defaults__  # the purification schedule takes MAEPure's defaults
    assert (cfg.step_size, cfg.halve_step, cfg.eta, cfg.mask_ratio, cfg.n_masks) == pure[1:6]


# ------------------------------------------------------- the surrogate step
@pytest.mark.parametrize("unroll", [0, 1, 3, 4])
def test_straight_through_forward_is_mae_pure_output(unroll):
    mae, x = _mae(), torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    pur = MAEPure(mae, steps=4, step_size=2 / 255, eta=8 / 255, seed=3)
    want = pur.purify(x)
    got = R.straight_through_purify(pur, x, unroll=unroll, temperature=0.5)
    assert torch.equal(got.detach(), want)  # bit-identical: the forward value of the surrogate is sign(g)
    assert got.requires_grad == (unroll > 0)
    assert not torch.equal(want, x)  # the purification moved the input (the comparison can fail)
    # unseeded: the same global RNG state gives the same masks, hence the same output
    fresh = MAEPure(mae, steps=4, step_size=2 / 255, eta=8 / 255)
    torch.manual_seed(9)
    a = fresh.purify(x)
    torch.manual_seed(9)
    assert torch.equal(R.straight_through_purify(fresh, x, unroll=2).detach(), a)


def test_surrogate_gives_theta_a_gradient_plain_mae_pure_does_not(linear_clf, digits):
    """Why the surrogate exists: MAE-Pure's output depends on theta only through sign(grad_x L_rec), whose
    derivative is 0, so the classification loss has no gradient w.r.t. the MAE's weights."""
    mae = _mae()
    params = [p for p in mae.parameters() if p.requires_grad]
    x, y = digits.images[:4], digits.labels[:4]
    pur = MAEPure(mae, steps=3, step_size=4 / 255, eta=16 / 255, seed=2)

    ce = F.cross_entropy(linear_clf(R.straight_through_purify(pur, x, unroll=2)), y)
    grads = torch.autograd.grad(ce, params, allow_unused=True)
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    assert float(grads[0].abs().sum()) > 0  # reaches the patch embedding, the first layer

    # the exact graph (create_graph through every inner gradient) reaches theta, but only through sign: zeros
    exact = MAEPure(mae, steps=3, step_size=4 / 255, eta=16 / 255, seed=2, exact_graph=True)
    ce = F.cross_entropy(linear_clf(exact(x.clone().requires_grad_(True))), y)
    grads = torch.autograd.grad(ce, params, allow_unused=True)
    assert all(g is None or not g.any() for g in grads)
    # the default graph keeps the sign direction as a constant: theta is not in it at all
    ce = F.cross_entropy(linear_clf(pur(x.clone().requires_grad_(True))), y)
    assert all(g is None for g in torch.autograd.grad(ce, params, allow_unused=True))


def test_straight_through_sign_forward_exact_backward_tanh():
    g = torch.tensor([[-3.0, -0.5, 0.0, 0.5, 3.0]], requires_grad=True)
    d = R._straight_through_sign(g, 2.0)
    assert torch.equal(d.detach(), torch.sign(g.detach()))
    (grad,) = torch.autograd.grad(d.sum(), g)
    scale = 2.0 * g.detach().abs().mean()
    torch.testing.assert_close(grad, (1 - torch.tanh(g.detach() / scale) ** 2) / scale)
    z = torch.zeros(1, 4, requires_grad=True)  # an all-zero gradient: no surrogate gradient, no 1/0
    (gz,) = torch.autograd.grad(R._straight_through_sign(z, 1.0).sum(), z)
    assert torch.equal(gz, torch.zeros_like(gz))


# ------------------------------------------------------------------ training
def test_training_is_bit_reproducible_and_changes_the_weights(linear_clf, digits):
    ds = digits.subset(8, seed=0)
    before = {k: v.clone() for k, v in _mae().state_dict().items()}
    runs = []
    for _ in range(2):
        mae = _mae()
        out = train_rmae_pure(mae, ds, linear_clf, _cfg(batch_size=4, clean_frac=0.5))
        runs.append((mae.state_dict(), out["history"]))
    (a, ha), (b, hb) = runs
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert ha == hb
    assert any(not torch.equal(a[k], before[k]) for k in a)
    h = ha[0]
    assert set(h) == {"loss", "ce_cls", "mae_rec", "purified_acc", "stage1_acc", "epoch"}
    assert 0 <= h["stage1_acc"] <= 1 and h["mae_rec"] > 0
    assert linear_clf.training is False and not any(p.requires_grad for p in linear_clf.parameters())
    mae = _mae()  # another seed: other weights
    train_rmae_pure(mae, ds, linear_clf, _cfg(batch_size=4, clean_frac=0.5, seed=1))
    assert any(not torch.equal(mae.state_dict()[k], a[k]) for k in a)


def test_stage_one_attacks_the_system_and_regenerates(linear_clf, digits):
    ds = digits.subset(16, seed=1)
    cfg = _cfg(epochs=3, batch_size=8, eps=16 / 255, attack_step_size=8 / 255, attack_steps=2, w_rec=0.5,
               regenerate_every=2)
    mae = _mae()
    pur = R.training_purifier(mae, cfg)
    with torch.no_grad():
        torch.manual_seed(0)
        clean_acc = (linear_clf(pur.purify(ds.images)).argmax(1) == ds.labels).float().mean()
    adv, correct = R._stage_one(pur, linear_clf, ds.images, ds.labels, cfg, 0)
    assert (adv - ds.images).abs().max() <= 16 / 255 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    assert correct.mean() < clean_acc  # PGD through the purifier lowers the system's accuracy
    again, _ = R._stage_one(pur, linear_clf, ds.images, ds.labels, cfg, 0)
    other, _ = R._stage_one(pur, linear_clf, ds.images, ds.labels, cfg, 1)
    assert torch.equal(adv, again) and not torch.equal(adv, other)  # seeded per regeneration
    out = train_rmae_pure(mae, digits.subset(8, seed=1), linear_clf, cfg)
    assert out["regenerated_at"] == [1, 3]  # epochs 1-2 share the pairs, epoch 3 makes new ones
    assert [h["epoch"] for h in out["history"]] == [1, 2, 3]
    assert out["history"][0]["stage1_acc"] == out["history"][1]["stage1_acc"]


def test_overfit_lowers_the_classification_loss(linear_clf, digits, monkeypatch):
    """A few fixed images, pairs made once: finetuning lowers the stage-II classification loss; with the
    plain sign (no gradient to theta from the CE) it does not drop nearly as much."""
    ds = digits.subset(8, seed=0)
    kw = dict(epochs=6, batch_size=8, lr=1e-3, seed=2, eps=16 / 255, attack_step_size=8 / 255, attack_steps=2,
              train_steps=4, unroll=4, w_rec=0.0, regenerate_every=100)
    h = train_rmae_pure(_mae(2), ds, linear_clf, _cfg(**kw))["history"]
    first, last = h[0]["ce_cls"], h[-1]["ce_cls"]
    assert last < 0.85 * first, [e["ce_cls"] for e in h]
    monkeypatch.setattr(R, "_straight_through_sign", lambda g, tau: torch.sign(g))
    hc = train_rmae_pure(_mae(2), ds, linear_clf, _cfg(**kw))["history"]
    assert hc[0]["ce_cls"] == pytest.approx(first, rel=1e-6)  # same pairs, same first-epoch masks
    assert first - last > 2 * (hc[0]["ce_cls"] - hc[-1]["ce_cls"]), [e["ce_cls"] for e in hc]


class _Stop(Exception):
    pass


def test_resume_mid_period_ends_with_identical_weights(linear_clf, digits, tmp_path, monkeypatch):
    ds = digits.subset(8, seed=0)
    kw = dict(epochs=3, batch_size=4, regenerate_every=2)
    full = _mae()
    train_rmae_pure(full, ds, linear_clf, _cfg(**kw, state_dir=str(tmp_path / "a")))
    calls = {"n": 0}
    real_step = torch.optim.AdamW.step

    def stopping_step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 4:  # epoch 2, batch 2: inside the first regeneration period
            raise _Stop
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", stopping_step)
    with pytest.raises(_Stop):
        train_rmae_pure(_mae(), ds, linear_clf, _cfg(**kw, state_dir=str(tmp_path / "b"), snapshot_every=1))
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    snap = json.loads((tmp_path / "b" / "state.json").read_text())
    assert (snap["epoch"], snap["batch"]) == (1, 1)
    resumed = _mae()
    out = train_rmae_pure(resumed, ds, linear_clf, _cfg(**kw, state_dir=str(tmp_path / "b"), resume=True))
    assert out["regenerated_at"] == [3]  # epoch 2's pairs came from the saved file, epoch 3 made new ones
    assert all(torch.equal(resumed.state_dict()[k], v) for k, v in full.state_dict().items())


def test_bad_inputs_are_named_before_any_work(linear_clf, digits):
    ds = digits.subset(4, seed=0)
    mae = _mae()
    before = {k: v.clone() for k, v in mae.state_dict().items()}
    cases = [
        (dict(classifier=None), "classifier is required"),
        (dict(classifier=lambda x: x), "classifier must be an nn.Module"),
        (dict(model=torch.nn.Linear(2, 2)), "model must be a MaskedAutoencoderViT"),
        (dict(dataset=None), "dataset must be"),
        (dict(dataset=ds.images), "dataset must be"),
        (dict(dataset=_Empty()), "dataset is empty"),
        (dict(dataset=load_digits_dataset(8, "train").subset(4)), "dataset images must be 16x16"),
        (dict(cfg={"epochs": 1}), "cfg must be a RMAEPureConfig"),
        (dict(classifier=frozen_cnn(num_classes=3)), "class indices"),  # digit labels up to 9, 3 logits
    ]
    for change, message in cases:
        args = dict(model=mae, dataset=ds, classifier=linear_clf, cfg=_cfg())
        args.update(change)
        with pytest.raises(ValueError, match=message):
            train_rmae_pure(**args)
    assert all(torch.equal(mae.state_dict()[k], before[k]) for k in before)


class _Empty:
    def __len__(self):
        return 0

    def loader(self, **kw):
        return iter(())


# ----------------------------------------------------------------------- CLI
@pytest.fixture
def checkpoints(tmp_path):
    save_model(_mae(), tmp_path / "mae")
    save_model(frozen_cnn(num_classes=10), tmp_path / "clf")
    return tmp_path / "mae", tmp_path / "clf"


CLI_TINY = ["--data", "digits", "--image-size", "16", "--subset", "8", "--epochs", "1", "--batch-size", "4",
            "--steps", "1", "--train-steps", "2", "--unroll", "1", "--no-progress", "--seed", "1"]


def test_cli_writes_a_loadable_finetuned_mae(checkpoints, tmp_path, capsys):
    mae_dir, clf_dir = checkpoints
    out = tmp_path / "run"
    assert main(["rmae-pure", "--mae", str(mae_dir), "--classifier", str(clf_dir), "--out", str(out), *CLI_TINY,
                 "--eps", "16/255", "--lr", "1e-3", "--w-rec", "0.5"]) == 0
    assert f"saved {out / 'mae'}" in capsys.readouterr().out
    model = load_model(out / "mae", expect_kind="mae")
    meta = model.checkpoint_meta
    assert meta["recipe"]["unroll"] == 1 and meta["recipe"]["eps"] == pytest.approx(16 / 255)
    assert meta["recipe"]["w_rec"] == 0.5 and meta["recipe"]["train_steps"] == 2 and len(meta["history"]) == 1
    assert meta["init"] == str(mae_dir) and "RMAE-Pure" in meta["trained"]
    new, old = load_file(str(out / "mae" / "model.safetensors")), load_file(str(mae_dir / "model.safetensors"))
    assert any(not torch.equal(new[k], old[k]) for k in old)
    assert MAEPure(model, steps=2).purify(torch.rand(2, 1, 16, 16)).shape == (2, 1, 16, 16)


@pytest.mark.parametrize("flags,named", [
    (["--unroll", "0"], "argument --unroll"),
    (["--train-steps", "0"], "argument --train-steps"),
    (["--eps", "-1/255"], "argument --eps"),
    (["--mask-ratio", "1"], "argument --mask-ratio"),
    (["--temperature", "0"], "argument --temperature"),
    (["--w-cls", "x"], "argument --w-cls"),
    (["--clean-frac", "1"], "argument --clean-frac"),
    (["--regenerate-every", "0"], "argument --regenerate-every"),
    (["--norm", "l1"], "argument --norm"),
    (["--train-steps", "2", "--unroll", "3"], "--unroll 3 must be <= --train-steps 2"),
    (["--w-cls", "0", "--w-rec", "0"], "--w-cls and --w-rec"),
    (["--image-size", "8"], "pass --image-size 16"),
])
def test_cli_bad_flags_exit_2_naming_the_flag(checkpoints, tmp_path, capsys, flags, named):
    mae_dir, clf_dir = checkpoints
    assert cli_rc(["rmae-pure", "--mae", str(mae_dir), "--classifier", str(clf_dir), "--out", str(tmp_path / "x"),
                   *CLI_TINY, *flags]) == 2
    err = capsys.readouterr().err
    assert named in err and "error" in err
    assert not (tmp_path / "x" / "mae").exists()


def test_cli_needs_mae_and_classifier(checkpoints, tmp_path, capsys):
    mae_dir, clf_dir = checkpoints
    for args, named in ((["--classifier", str(clf_dir)], "--mae"), (["--mae", str(mae_dir)], "--classifier"),
                        (["--mae", str(clf_dir), "--classifier", str(clf_dir)], "expected 'mae'")):
        assert cli_rc(["rmae-pure", *args, "--out", str(tmp_path / "y"), *CLI_TINY]) == 2
        assert named in capsys.readouterr().err
