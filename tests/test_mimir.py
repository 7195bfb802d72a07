"""MIMIR: HSIC against the direct formula, PGD_MAE, the pretraining loss, ViT
classifier from the encoder, adversarial finetuning, checkpoints."""
import math

import pytest
import torch

from conftest import tiny_mae
from maep_fast.checkpoint import load_model, save_model
from maep_fast.data.dataset import ImageDataset
from maep_fast.models.vit_classifier import ViTClassifier
from maep_fast.train.hsic import hsic_normalized_cca, hsic_penalty
from maep_fast.train.loop import LoopConfig
from maep_fast.train.mimir import MIMIRConfig, _mae_loss, adversarial_finetune, mimir_loss, pgd_mae, train_mimir


def hsic_direct(x, y, sigma=5.0, eps=1e-5):
    """The HSIC-bottleneck reference, written out with explicit loops and inverses (float64)."""
    m = x.shape[0]
    x, y = x.reshape(m, -1).double(), y.reshape(m, -1).double()

    def kc(z):
        d = z.shape[1]
        k = torch.empty(m, m, dtype=torch.float64)
        for i in range(m):
            for j in range(m):
                k[i, j] = math.exp(-float(((z[i] - z[j]) ** 2).sum()) / (2 * sigma**2 * d))
        h = torch.eye(m, dtype=torch.float64) - torch.ones(m, m, dtype=torch.float64) / m
        return k @ h

    kx, ky = kc(x), kc(y)
    i = torch.eye(m, dtype=torch.float64)
    rx = kx @ torch.inverse(kx + eps * m * i)
    ry = ky @ torch.inverse(ky + eps * m * i)
    return float((rx * ry.t()).sum())


@pytest.mark.parametrize("m,dx,dy,sigma", [(4, 3, 5, 5.0), (6, 10, 2, 1.0), (5, 7, 7, 0.5)])
def test_hsic_matches_direct_formula(m, dx, dy, sigma):
    g = torch.Generator().manual_seed(m)
    x, y = torch.randn(m, dx, generator=g, dtype=torch.float64), torch.randn(m, dy, generator=g, dtype=torch.float64)
    assert hsic_normalized_cca(x, y, sigma=sigma).item() == pytest.approx(hsic_direct(x, y, sigma), rel=1e-6, abs=1e-9)


def test_hsic_dependence_and_nan_safety():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 8, generator=g)
    dep = hsic_normalized_cca(x, 2 * x + 0.01 * torch.randn(16, 8, generator=g), sigma=1.0)
    ind = hsic_normalized_cca(x, torch.randn(16, 8, generator=g), sigma=1.0)
    assert dep > ind
    bad = x.clone()
    bad[0, 0] = float("nan")
    assert not torch.isfinite(hsic_normalized_cca(bad, x))
    assert hsic_penalty(bad, x).item() == 0.0
    p = hsic_penalty(x.requires_grad_(True), x.detach() * 2, weight=1e-5)
    assert torch.isfinite(p) and p > 0
    p.backward()
    assert torch.isfinite(x.grad).all()
    with pytest.raises(ValueError, match="same number"):
        hsic_normalized_cca(x[:3], x[:4])


def test_pgd_mae_raises_the_mae_loss_and_stays_in_ball():
    torch.manual_seed(0)
    m = tiny_mae(norm_pix_loss=True).eval()
    x = torch.rand(8, 1, 8, 8)
    noise = torch.rand(8, 16)
    x_adv = pgd_mae(m, x, noise, eps=8 / 255, alpha=2 / 255, steps=5, random_start=False)
    assert (x_adv - x).abs().max() <= 8 / 255 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        before, _ = _mae_loss(m, x, x, 0.75, noise)
        after, _ = _mae_loss(m, x_adv, x_adv, 0.75, noise)
    assert after > before
    x1 = pgd_mae(m, x, noise)  # MIMIR defaults: random start, 1 step, eps 8/255, alpha 10/255
    assert (x1 - x).abs().max() <= 8 / 255 + 1e-6


def test_mimir_loss_and_training_step():
    torch.manual_seed(0)
    m = tiny_mae(norm_pix_loss=True)
    x = torch.rand(8, 1, 8, 8)
    cfg = MIMIRConfig()
    loss, metrics = mimir_loss(m, x, cfg)
    assert torch.isfinite(loss) and set(metrics) == {"loss", "mae", "mi"}
    assert metrics["mi"] > 0 and metrics["loss"] == pytest.approx(float(metrics["mae"] + metrics["mi"]), rel=1e-5)
    loss.backward()
    assert m.patch_embed.proj.weight.grad is not None
    ds = ImageDataset(torch.rand(16, 1, 8, 8), torch.randint(0, 3, (16,)))
    hist = train_mimir(m, ds, MIMIRConfig(loop=LoopConfig(epochs=2, batch_size=8, lr=1e-3, progress=False)))
    assert len(hist) == 2 and all(math.isfinite(h["loss"]) for h in hist)


def test_vit_classifier_from_mae_and_checkpoint(tmp_path):
    torch.manual_seed(0)
    m = tiny_mae()
    clf = ViTClassifier.from_mae(m, num_classes=4)
    assert torch.equal(clf.blocks[1].mlp.fc1.weight, m.blocks[1].mlp.fc1.weight)
    assert torch.equal(clf.patch_embed.proj.weight, m.patch_embed.proj.weight)
    x = torch.rand(3, 1, 8, 8)
    assert clf(x).shape == (3, 4)
    save_model(clf, tmp_path / "vit")
    back = load_model(tmp_path / "vit", expect_kind="classifier")
    assert isinstance(back, ViTClassifier) and torch.allclose(back(x), clf(x))
    assert not ViTClassifier.from_mae(m, global_pool=False).global_pool


@pytest.mark.parametrize("trades_beta", [None, 6.0])
def test_adversarial_finetune_runs_and_learns(trades_beta):
    torch.manual_seed(0)
    n = 48
    y = torch.arange(n) % 2
    x = torch.rand(n, 1, 8, 8) * 0.3
    x[y == 1] += 0.6  # two easily separable classes
    ds = ImageDataset(x.clamp(0, 1), y)
    clf = ViTClassifier.from_mae(tiny_mae(), num_classes=2)
    hist = adversarial_finetune(clf, ds, eps=2 / 255, alpha=1 / 255, steps=2, trades_beta=trades_beta,
                                loop=LoopConfig(epochs=6, batch_size=16, lr=3e-3, warmup_epochs=0.5, progress=False))
    assert len(hist) == 6 and all(math.isfinite(h["loss"]) for h in hist)
    with torch.no_grad():
        acc = (clf(ds.images).argmax(1) == y).float().mean()
    assert acc >= 0.9
