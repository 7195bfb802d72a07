import pytest
import torch

from conftest import tiny_mae
from maep_fast.data import ImageDataset
from maep_fast.models import SmallCNN
from maep_fast.train import AdversarialPairs, AttackConfig, LoopConfig, MAEPConfig, maep_loss, train_maep, train_stage1
from maep_fast.train.common import warmup_cosine


def toy_data(n=64, size=8):
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, 3, (n,), generator=g)
    base = torch.stack([torch.linspace(0, 1, size).view(1, size).expand(size, size) * (c + 1) / 3 for c in range(3)])
    x = (base[y].unsqueeze(1) + 0.05 * torch.randn(n, 1, size, size, generator=g)).clamp(0, 1)
    return ImageDataset(x, y, name="toy")


def loop(epochs, **kw):
    return LoopConfig(epochs=epochs, batch_size=16, lr=3e-3, warmup_epochs=0.2, progress=False, **kw)


def test_stage1_lowers_both_loss_terms_on_fixed_batch():
    torch.manual_seed(0)
    data = toy_data()
    x = data.images[:32]
    x_adv = (x + 0.03 * torch.randn_like(x)).clamp(0, 1)
    pairs = AdversarialPairs(data.images, (data.images + 0.03 * torch.randn_like(data.images)).clamp(0, 1), data.labels)
    model = tiny_mae()
    noise = torch.rand(32, 16)

    def terms():
        with torch.no_grad():
            latent, mask, ids = model.forward_encoder(x_adv, 0.5, noise)
            pred = model.forward_decoder(latent, ids)
            from maep_fast.ops import patch_recon_loss
            return (patch_recon_loss(pred, x, None, patch_size=2, norm_pix=False, p=1).item(),
                    patch_recon_loss(pred, x, mask, patch_size=2, norm_pix=False, p=2).item())

    l1_before, mae_before = terms()
    cfg = MAEPConfig(stage1=loop(6))
    hist = train_stage1(model, pairs, cfg)
    l1_after, mae_after = terms()
    assert l1_after < 0.7 * l1_before and mae_after < 0.7 * mae_before
    assert hist[-1]["l1_pur"] < hist[0]["l1_pur"] and hist[-1]["mae"] < hist[0]["mae"]


def test_online_pairs_and_stage2_lora_only_touch_the_decoder():
    data = toy_data(48)
    clf = SmallCNN(1, 3, width=4)
    model = tiny_mae()
    cfg = MAEPConfig(attack=AttackConfig(eps=4 / 255, step_size=2 / 255, steps=2), stage1=loop(1), stage2=loop(2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    clf_before = {k: v.clone() for k, v in clf.state_dict().items()}
    train_stage1(model, data, cfg, clf)
    after1 = {k: v.clone() for k, v in model.state_dict().items()}
    assert not torch.equal(before["blocks.0.attn.qkv.weight"], after1["blocks.0.attn.qkv.weight"])
    from maep_fast.train import train_stage2
    train_stage2(model, data, cfg, clf, merge=True)
    after2 = model.state_dict()
    assert set(after2) == set(before)  # adapters merged and removed
    for k in after2:
        if k.startswith("decoder_") and k.endswith("weight") and "norm" not in k:
            assert not torch.equal(after1[k], after2[k]), k  # LoRA changed the decoder linears
        else:
            assert torch.equal(after1[k], after2[k]), k  # everything else frozen
    for k, v in clf.state_dict().items():
        assert torch.equal(v, clf_before[k])  # the classifier is never trained


def test_loss_at_mask_ratio_zero_is_finite():
    model = tiny_mae()
    x = torch.rand(4, 1, 8, 8)
    loss, parts = maep_loss(model, x, x, 0.0, 1.0, 1.0)
    assert torch.isfinite(loss) and parts["mae"] > 0


def test_resume_matches_uninterrupted(tmp_path, monkeypatch):
    import json

    from maep_fast.checkpoint import CheckpointError
    from maep_fast.train import loop as loop_mod

    data = toy_data(32)
    pairs = AdversarialPairs(data.images, (data.images * 0.9).clamp(0, 1), data.labels)
    init = tiny_mae().state_dict()

    def fresh():
        m = tiny_mae()
        m.load_state_dict(init)
        return m

    ref = fresh()
    train_stage1(ref, pairs, MAEPConfig(stage1=loop(5)))

    class Stop(Exception):
        pass

    real_save, calls = loop_mod.save_training_state, []

    def save_then_stop(*a, **k):  # the process "dies" right after the 3rd epoch's snapshot
        real_save(*a, **k)
        calls.append(1)
        if len(calls) == 3:
            raise Stop

    monkeypatch.setattr(loop_mod, "save_training_state", save_then_stop)
    with pytest.raises(Stop):
        train_stage1(fresh(), pairs, MAEPConfig(stage1=loop(5, state_dir=str(tmp_path / "s"))))
    monkeypatch.setattr(loop_mod, "save_training_state", real_save)
    assert json.loads((tmp_path / "s" / "state.json").read_text())["epoch"] == 3

    resumed = tiny_mae()  # different init: everything must come from the snapshot
    torch.manual_seed(123)  # and the RNG state too
    train_stage1(resumed, pairs, MAEPConfig(stage1=loop(5, state_dir=str(tmp_path / "s"), resume=True)))
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, rtol=1e-5, atol=1e-6)
    with pytest.raises(CheckpointError, match="different settings"):
        train_stage1(tiny_mae(), pairs, MAEPConfig(mask_ratio=0.25, stage1=loop(6, state_dir=str(tmp_path / "s"), resume=True)))


def test_warmup_cosine_schedule():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    s = warmup_cosine(opt, 4, 12)
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        s.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:])) and lrs[-1] < 0.05


def test_train_maep_rejects_norm_pix_and_missing_classifier():
    data = toy_data(16)
    with pytest.raises(ValueError, match="norm_pix_loss"):
        train_maep(tiny_mae(norm_pix_loss=True), data, MAEPConfig(stage1=loop(1)), SmallCNN(1, 3, width=4))
    with pytest.raises(ValueError, match="classifier is required"):
        train_stage1(tiny_mae(), data, MAEPConfig(stage1=loop(1)))
