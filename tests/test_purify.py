import pytest
import torch

from conftest import tiny_mae
from maep_fast.purify import PurifiedClassifier, Purifier, tiled_apply
from maep_fast.purify.tiling import ramp_window


def test_purify_shapes_chunking_and_range():
    p = Purifier(tiny_mae(in_chans=3), batch_size=3)
    x = torch.rand(7, 3, 8, 8)
    y = p.purify(x)
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    torch.testing.assert_close(y, p(x).detach(), rtol=1e-5, atol=1e-6)  # chunked == one batch


def test_purifier_is_differentiable_end_to_end():
    p = Purifier(tiny_mae(in_chans=1))
    clf = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))
    model = PurifiedClassifier(p, clf)
    x = torch.rand(2, 1, 8, 8, requires_grad=True)
    model(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("size", [(8, 8), (13, 21), (24, 9), (32, 32)])
@pytest.mark.parametrize("overlap", [0, 2, 5])
def test_tiling_identity_and_pointwise(size, overlap):
    x = torch.rand(2, 3, *size)
    torch.testing.assert_close(tiled_apply(lambda t: t, x, 8, overlap), x)  # blending an identity is exact
    torch.testing.assert_close(tiled_apply(lambda t: t * 2 + 1, x, 8, overlap), x * 2 + 1)


def test_tiling_blends_overlaps():
    # a function that returns the tile's own mean: blended output must vary smoothly, not in blocks
    x = torch.linspace(0, 1, 24).view(1, 1, 1, 24).expand(1, 1, 8, 24).contiguous()
    y = tiled_apply(lambda t: t.mean(dim=(2, 3), keepdim=True).expand_as(t), x, 8, 4)
    row = y[0, 0, 0]
    assert torch.all(row[1:] - row[:-1] >= -1e-6)  # monotone like the input
    assert (row[1:] - row[:-1]).max() < 0.2
    w = ramp_window(8, 3)
    assert w.min() > 0 and w.max() == 1


def test_large_images_tiled_by_purifier():
    p = Purifier(tiny_mae(in_chans=3), tile_overlap=2)
    x = torch.rand(2, 3, 20, 13)
    y = p.purify(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    manual = tiled_apply(lambda t: p.model.reconstruct(t).clamp(0, 1), x, 8, 2)
    torch.testing.assert_close(y, manual, rtol=1e-5, atol=1e-6)


def test_bad_inputs():
    p = Purifier(tiny_mae(in_chans=1))
    with pytest.raises(ValueError, match="rank"):
        p.purify(torch.rand(8, 8))
    with pytest.raises(ValueError, match="channel"):
        p.purify(torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match="at least 8x8"):
        p.purify(torch.rand(1, 1, 4, 4))
    with pytest.raises(ValueError, match="NaN"):
        p.purify(torch.full((1, 1, 8, 8), float("nan")))
    with pytest.raises(ValueError, match=r"\[0.0, 1.0\]"):
        p.purify(torch.rand(1, 1, 8, 8) * 255)
    with pytest.raises(ValueError, match="empty"):
        p.purify(torch.rand(0, 1, 8, 8))
    with pytest.raises(TypeError, match="dtype"):
        p.purify(torch.zeros(1, 1, 8, 8, dtype=torch.uint8))
    with pytest.raises(TypeError, match="torch.Tensor"):
        p.purify([[0.0]])
    with pytest.raises(ValueError, match="norm_pix_loss"):
        Purifier(tiny_mae(norm_pix_loss=True))
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="on cuda"):
            p.purify(torch.rand(1, 1, 8, 8, device="cuda"))
    else:
        with pytest.raises(ValueError, match="on meta"):
            p.purify(torch.empty(1, 1, 8, 8, device="meta"))


def test_randomized_maep_averages_fresh_masks_and_is_differentiable():
    from maep_fast.purify import RandomizedMAEP

    rnd = RandomizedMAEP(tiny_mae(in_chans=1), mask_ratio=0.5, n_masks=3, batch_size=2)
    assert rnd.randomized and rnd.config["n_masks"] == 3
    x = torch.rand(5, 1, 8, 8, requires_grad=True)
    rnd(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    y1, y2 = rnd.purify(x.detach()), rnd.purify(x.detach())
    assert y1.shape == x.shape and y1.min() >= 0 and y1.max() <= 1
    assert not torch.equal(y1, y2)  # fresh masks on every call
    with pytest.raises(ValueError, match="mask_ratio"):
        RandomizedMAEP(tiny_mae(in_chans=1), mask_ratio=0.0)
    with pytest.raises(ValueError, match="n_masks"):
        RandomizedMAEP(tiny_mae(in_chans=1), n_masks=0)


def test_randomized_maep_with_input_noise():
    """noise_std > 0: the mean of reconstructions of x + fresh Gaussian noise (mask ratio 0 allowed then)."""
    from maep_fast.purify import RandomizedMAEP

    model = tiny_mae(in_chans=1).eval()
    rnd = RandomizedMAEP(model, mask_ratio=0.0, n_masks=2, noise_std=0.25)
    assert rnd.config["noise_std"] == 0.25 and rnd.config["kind"] == "MAEP + test-time noise"
    x = torch.rand(4, 1, 8, 8)
    torch.manual_seed(3)
    got = rnd(x)
    torch.manual_seed(3)
    want = torch.stack([model.reconstruct(x + 0.25 * torch.randn_like(x), mask_ratio=0.0) for _ in range(2)]).mean(0)
    torch.testing.assert_close(got, want.clamp(0, 1))
    assert not torch.equal(rnd.purify(x), rnd.purify(x))
    for bad in (-0.1, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="noise_std"):
            RandomizedMAEP(model, noise_std=bad)


def test_randomized_maep_import_paths():
    import warnings

    import maep_fast
    import maep_fast.demo
    from maep_fast.purify import RandomizedMAEP
    from maep_fast.purify.randomized import RandomizedMAEP as direct

    assert maep_fast.RandomizedMAEP is RandomizedMAEP is direct
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the supported paths do not warn
        from maep_fast import RandomizedMAEP as top  # noqa: F401
    with pytest.warns(DeprecationWarning, match="maep_fast.purify"):
        from maep_fast.demo import RandomizedMAEP as old
    assert old is RandomizedMAEP
    with pytest.raises(AttributeError):
        maep_fast.demo.no_such_name  # noqa: B018
