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


pytestmark = pytest.mark.usefixtures("one_thread")


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


def test_eps_ramp_schedule_and_finetune_history():
    from maep_fast.train.mimir import eps_at

    assert eps_at(0, 100, 8.0, 0.0, 0.5) == 0.0
    assert eps_at(25, 100, 8.0, 0.0, 0.5) == pytest.approx(4.0)
    assert eps_at(50, 100, 8.0, 0.0, 0.5) == 8.0 and eps_at(99, 100, 8.0, 2.0, 0.5) == 8.0
    assert eps_at(0, 100, 8.0, None, 0.5) == 8.0 and eps_at(0, 100, 8.0, 0.0, 0.0) == 8.0
    torch.manual_seed(0)
    ds = ImageDataset(torch.rand(32, 1, 8, 8), torch.arange(32) % 2)
    clf = ViTClassifier.from_mae(tiny_mae(), num_classes=2)
    hist = adversarial_finetune(clf, ds, eps=8 / 255, alpha=4 / 255, steps=1, eps_start=0.0, ramp_frac=1.0,
                                loop=LoopConfig(epochs=3, batch_size=16, lr=1e-3, progress=False))
    eps = [h["eps"] for h in hist]
    assert eps[0] < eps[1] < eps[2] < 8 / 255
    with pytest.raises(ValueError, match="eps_start"):
        adversarial_finetune(clf, ds, eps=4 / 255, eps_start=8 / 255, loop=LoopConfig(epochs=1, progress=False))


def test_recipe_trains_a_vit_and_checks_its_fields():
    from maep_fast.train.mimir import MIMIRRecipe, train_mimir_vit

    ds = ImageDataset(torch.rand(32, 1, 8, 8), torch.arange(32) % 2)
    r = MIMIRRecipe(img_size=8, num_classes=2, patch_size=2, embed_dim=16, depth=1, num_heads=2, decoder_embed_dim=8,
                    decoder_depth=1, decoder_num_heads=2, pretrain_epochs=1, finetune_epochs=1, steps=1,
                    batch_size=16)
    vit, mae, info = train_mimir_vit(ds, r, progress=False)
    assert isinstance(vit, ViTClassifier) and vit(ds.images[:2]).shape == (2, 2)
    assert not torch.equal(vit.blocks[0].attn.qkv.weight, mae.blocks[0].attn.qkv.weight)  # finetuned
    assert len(info["pretrain_history"]) == 1 and len(info["finetune_history"]) == 1
    for bad, msg in [(dict(patch_size=3), "patch_size"), (dict(pretrain="x"), "pretrain"),
                     (dict(eps_start=1.0), "eps_start"), (dict(mask_ratio=1.0), "mask_ratio")]:
        with pytest.raises(ValueError, match=msg):
            train_mimir_vit(ds, MIMIRRecipe(img_size=8, **bad), progress=False)
    with pytest.raises(ValueError, match="expects"):
        train_mimir_vit(ds, MIMIRRecipe(img_size=16), progress=False)


class _Toy(torch.nn.Module):
    """A two-class model with encoder features (forward_features) and a linear head."""

    def __init__(self):
        super().__init__()
        self.f = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 16), torch.nn.Tanh())
        self.head = torch.nn.Linear(16, 2)

    def forward_features(self, x):
        return self.f(x)

    def forward(self, x):
        return self.head(self.f(x))


def _trained_toy():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(64) % 2
    x = (0.4 + 0.2 * y.view(-1, 1, 1, 1).float() + 0.05 * torch.randn(64, 1, 8, 8, generator=g)).clamp(0, 1)
    model = _Toy()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, x, y


def _acc(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def test_attack_hsic_copy_matches_the_training_hsic():
    from maep_fast.attacks.mimir_attacks import hsic_normalized_cca as attack_hsic

    g = torch.Generator().manual_seed(1)
    for m, dx, dy, s in [(8, 4, 6, 5.0), (12, 3, 3, 1.0)]:
        x, y = torch.randn(m, dx, generator=g), torch.randn(m, dy, generator=g)
        assert attack_hsic(x, y, sigma=s).item() == pytest.approx(hsic_normalized_cca(x, y, sigma=s).item(), rel=1e-5)


def test_pgd_mi_lowers_accuracy_and_moves_the_mi_term():
    from maep_fast.attacks.mimir_attacks import mi_term, pgd_mi

    model, x, y = _trained_toy()
    eps = 0.12
    assert _acc(model, x, y) == 1.0
    noise = (x + (torch.rand(x.shape, generator=torch.Generator().manual_seed(2)) * 2 - 1) * eps).clamp(0, 1)
    assert _acc(model, noise, y) >= 0.9  # random noise of the same size barely hurts
    x_adv = pgd_mi(model, x, y, eps=eps, step_size=eps / 4, steps=10, generator=torch.Generator().manual_seed(0))
    assert (x_adv - x).abs().max() <= eps + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    assert _acc(model, x_adv, y) <= 0.3
    # the MI term alone (CE swamped by a large weight): +1 raises HSIC(features, x_adv), -1 lowers it
    kw = dict(eps=eps, step_size=eps / 4, steps=10, mi_weight=1e3, random_init=False)
    up = mi_term(model, pgd_mi(model, x, y, mi_sign=1, **kw))
    down = mi_term(model, pgd_mi(model, x, y, mi_sign=-1, **kw))
    assert up > mi_term(model, x) > down
    with pytest.raises(ValueError, match="mi_sign"):
        pgd_mi(model, x, y, eps=eps, step_size=0.01, mi_sign=0)


def test_pgd_feature_moves_the_features_more_than_noise():
    from maep_fast.attacks.mimir_attacks import feature_distance, pgd_feature

    model, x, _ = _trained_toy()
    eps = 0.05
    x_adv = pgd_feature(model, x, eps=eps, step_size=eps / 4, steps=10, generator=torch.Generator().manual_seed(0),
                        batch_size=24)
    assert (x_adv - x).abs().max() <= eps + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    noise = (x + (torch.rand(x.shape, generator=torch.Generator().manual_seed(3)) * 2 - 1) * eps).clamp(0, 1)
    d_adv, d_noise = feature_distance(model, x, x_adv), feature_distance(model, x, noise)
    assert d_adv.mean() > 5 * d_noise.mean() and (d_adv > 0).all()
    assert torch.equal(pgd_feature(model, x, eps=0.0, step_size=0.01), x)
    with pytest.raises(TypeError, match="forward_features"):
        pgd_feature(torch.nn.Sequential(torch.nn.Flatten()), x, eps=eps, step_size=0.01)
