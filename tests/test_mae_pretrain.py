"""MAE pretraining: train_mae and `maep-fast pretrain`."""
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import tiny_mae
from maep_fast.checkpoint import load_model, save_model
from maep_fast.cli import main
from maep_fast.data import ImageDataset
from maep_fast.train import LoopConfig, MAEPretrainConfig, train_mae
from maep_fast.train.mae_pretrain import DECODER_PREFIXES, mae_trainable_parameters


def _data(n=48, size=8):
    g = torch.Generator().manual_seed(2)
    y = torch.randint(0, 3, (n,), generator=g)
    ramp = torch.linspace(0, 1, size)
    base = torch.stack([ramp.view(1, -1).expand(size, size), ramp.view(-1, 1).expand(size, size),
                        (ramp.view(1, -1) + ramp.view(-1, 1)).expand(size, size) / 2])
    x = (base[y].unsqueeze(1) + 0.02 * torch.randn(n, 1, size, size, generator=g)).clamp(0, 1)
    return ImageDataset(x, y, name="toy")


def _loop(epochs, **kw):
    return LoopConfig(epochs=epochs, batch_size=16, lr=3e-3, warmup_epochs=0.3, progress=False, **kw)


def _masked_loss(model, x, noise):
    with torch.no_grad():
        loss, _, _ = model(x, mask_ratio=0.75, noise=noise)
    return float(loss)


def test_train_mae_lowers_the_masked_reconstruction_loss():
    data = _data()
    model = tiny_mae()
    noise = torch.rand(len(data), 16, generator=torch.Generator().manual_seed(0))
    before = _masked_loss(model, data.images, noise)
    hist = train_mae(model, data, MAEPretrainConfig(loop=_loop(6)))
    after = _masked_loss(model, data.images, noise)
    assert len(hist) == 6 and all("loss" in h for h in hist)
    assert after < 0.5 * before, (before, after)
    assert hist[-1]["loss"] < hist[0]["loss"]


def test_loss_goes_through_the_models_forward_loss_on_removed_patches(monkeypatch):
    """The objective is MAE's: forward_loss (the fused patch_recon_loss) with the mask of removed patches."""
    model = tiny_mae()
    seen = []
    real = type(model).forward_loss

    def spy(self, imgs, pred, mask):
        seen.append(None if mask is None else mask.detach().clone())
        return real(self, imgs, pred, mask)

    monkeypatch.setattr(type(model), "forward_loss", spy)
    train_mae(model, _data(16), MAEPretrainConfig(mask_ratio=0.75, loop=_loop(1)))
    assert seen and all(m is not None for m in seen)
    assert all(torch.equal(m.sum(1), torch.full((m.shape[0],), 12.0)) for m in seen)  # 12 of 16 patches removed


def test_decoder_only_training_keeps_the_encoder_and_restores_flags():
    model = tiny_mae()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    train_mae(model, _data(32), MAEPretrainConfig(train="decoder", loop=_loop(2)))
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(DECODER_PREFIXES) for k in changed), changed
    assert "decoder_pred.weight" in changed and "mask_token" in changed
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].startswith(DECODER_PREFIXES) for p in mae_trainable_parameters(model, "decoder"))


def test_norm_pix_loss_setting_is_recorded_in_the_model_config(tmp_path):
    model = tiny_mae()
    train_mae(model, _data(16), MAEPretrainConfig(norm_pix_loss=True, loop=_loop(1)))
    assert model.norm_pix_loss and model.config["norm_pix_loss"] is True
    save_model(model, tmp_path / "m")
    assert load_model(tmp_path / "m").norm_pix_loss is True


def test_resume_is_bitwise_identical(tmp_path, monkeypatch):
    from maep_fast.train import loop as loop_mod

    init = tiny_mae().state_dict()
    ref = tiny_mae()
    ref.load_state_dict(init)
    train_mae(ref, _data(), MAEPretrainConfig(loop=_loop(3)))

    class Stop(Exception):
        pass

    real, calls = loop_mod.save_training_state, []

    def save_then_stop(*a, **k):
        real(*a, **k)
        calls.append(1)
        if len(calls) == 4:  # 3 steps per epoch, snapshot every 2 steps: stops mid-epoch 2
            raise Stop

    monkeypatch.setattr(loop_mod, "save_training_state", save_then_stop)
    m = tiny_mae()
    m.load_state_dict(init)
    with pytest.raises(Stop):
        train_mae(m, _data(), MAEPretrainConfig(loop=_loop(3, state_dir=str(tmp_path), snapshot_every=2)))
    monkeypatch.setattr(loop_mod, "save_training_state", real)
    resumed = tiny_mae()
    train_mae(resumed, _data(), MAEPretrainConfig(loop=_loop(3, state_dir=str(tmp_path), resume=True)))
    for k, v in ref.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], v), k


@settings(max_examples=6, deadline=None)
@given(ratio=st.one_of(st.floats(max_value=0.0, allow_nan=False), st.floats(min_value=1.0, allow_infinity=True)),
       )
def test_bad_mask_ratio_names_the_argument(ratio):
    with pytest.raises(ValueError, match="mask_ratio"):
        train_mae(tiny_mae(), _data(16), MAEPretrainConfig(mask_ratio=ratio, loop=_loop(1)))


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="train must be one of"):
        train_mae(tiny_mae(), _data(16), MAEPretrainConfig(train="encoder", loop=_loop(1)))
    with pytest.raises(TypeError, match="model must be a MaskedAutoencoderViT"):
        train_mae(torch.nn.Linear(2, 2), _data(16))
    with pytest.raises(TypeError, match="cfg must be a MAEPretrainConfig"):
        train_mae(tiny_mae(), _data(16), _loop(1))
    with pytest.raises(TypeError, match="norm_pix_loss"):
        train_mae(tiny_mae(), _data(16), MAEPretrainConfig(norm_pix_loss="yes", loop=_loop(1)))
    with pytest.raises(ValueError, match="mask_ratio"):
        train_mae(tiny_mae(), _data(16), MAEPretrainConfig(mask_ratio=float("nan"), loop=_loop(1)))


def test_cli_pretrain_then_finish_the_decoder(tmp_path, capsys):
    args = ["--image-size", "8", "--subset", "64", "--batch-size", "32", "--no-progress"]
    assert main(["pretrain", *args, "--epochs", "2", "--out", str(tmp_path / "a")]) == 0
    mae = load_model(tmp_path / "a" / "mae", expect_kind="mae")
    assert mae.img_size == 8 and mae.in_chans == 1
    meta = json.loads((tmp_path / "a" / "mae" / "config.json").read_text())["meta"]
    assert len(meta["history"]) == 2 and meta["mask_ratio"] == 0.75
    # --init a checkpoint, train only its decoder: the encoder stays bit for bit
    assert main(["pretrain", *args, "--epochs", "1", "--init", str(tmp_path / "a" / "mae"), "--train", "decoder",
                 "--out", str(tmp_path / "b")]) == 0
    a, b = mae.state_dict(), load_model(tmp_path / "b" / "mae").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if not k.startswith(DECODER_PREFIXES))
    assert not torch.equal(a["decoder_pred.weight"], b["decoder_pred.weight"])
    # an --init whose image size does not fit the data
    assert main(["pretrain", "--image-size", "16", "--subset", "64", "--epochs", "1", "--no-progress",
                 "--init", str(tmp_path / "a" / "mae"), "--out", str(tmp_path / "c")]) == 2
    assert "--image-size 8" in capsys.readouterr().err


def test_cli_pretrain_rejects_bad_values(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["pretrain", "--image-size", "8", "--subset", "32", "--epochs", "1", "--mask-ratio", "1.5",
              "--no-progress", "--out", str(tmp_path / "x")])
    assert exc.value.code == 2 and "--mask-ratio" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["pretrain", "--image-size", "8", "--subset", "-3", "--epochs", "1", "--no-progress",
              "--out", str(tmp_path / "y")])
    assert exc.value.code == 2 and "--subset" in capsys.readouterr().err
