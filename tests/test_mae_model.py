"""MaskedAutoencoderViT against MAE's published definitions (facebookresearch/mae)."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import tiny_mae
from maep_fast.models import PRESETS, create_mae
from maep_fast.models.pos_embed import get_2d_sincos_pos_embed

MAE_NAMES = ["patch_embed", "cls_token", "pos_embed", "blocks", "norm", "decoder_embed", "mask_token",
             "decoder_pos_embed", "decoder_blocks", "decoder_norm", "decoder_pred"]
MAE_METHODS = ["patchify", "unpatchify", "random_masking", "forward_encoder", "forward_decoder", "forward_loss"]


def mae_formula_loss(imgs, pred, mask, p, norm_pix):
    """MAE's forward_loss written out from the paper / repository, with loops over patches."""
    n, c, h, w = imgs.shape
    gh, gw = h // p, w // p
    losses = torch.zeros(n, gh * gw, dtype=torch.float64)
    for i in range(n):
        for a in range(gh):
            for b in range(gw):
                patch = imgs[i, :, a * p:(a + 1) * p, b * p:(b + 1) * p].permute(1, 2, 0).reshape(-1).double()
                if norm_pix:
                    patch = (patch - patch.mean()) / (patch.var(unbiased=True) + 1e-6) ** 0.5
                losses[i, a * gw + b] = ((pred[i, a * gw + b].double() - patch) ** 2).mean()
    return (losses * mask.double()).sum() / mask.double().sum()


def test_names_and_methods():
    m = tiny_mae()
    for name in MAE_NAMES:
        assert hasattr(m, name), name
    for name in MAE_METHODS:
        assert callable(getattr(m, name)), name
    keys = m.state_dict().keys()
    assert "pos_embed" in keys and "decoder_pos_embed" in keys and "mask_token" in keys
    assert not m.pos_embed.requires_grad and not m.decoder_pos_embed.requires_grad


@pytest.mark.parametrize("chans", [1, 3])
@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 0.75])
def test_shapes(chans, ratio):
    m = tiny_mae(in_chans=chans, img_size=12, patch_size=3)
    x = torch.rand(3, chans, 12, 12)
    loss, pred, mask = m(x, mask_ratio=ratio)
    assert pred.shape == (3, 16, 9 * chans)
    assert mask.shape == (3, 16)
    assert loss.dim() == 0 and torch.isfinite(loss)
    latent, _, _ = m.forward_encoder(x, ratio)
    assert latent.shape == (3, 1 + int(16 * (1 - ratio)), 32)
    assert m.reconstruct(x).shape == x.shape


@settings(deadline=None, max_examples=20)
@given(n=st.integers(1, 5), length=st.sampled_from([1, 4, 7, 16, 31]), ratio=st.floats(0.0, 0.95))
def test_random_masking_invariants(n, length, ratio):
    m = tiny_mae()
    x = torch.randn(n, length, 5)
    x_masked, mask, ids_restore = m.random_masking(x, ratio)
    keep = int(length * (1 - ratio))
    assert x_masked.shape == (n, keep, 5)
    assert torch.all(mask.sum(1) == length - keep)  # removed count
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    noise = torch.rand(n, length)
    x_masked, mask, ids_restore = m.random_masking(x, ratio, noise=noise)
    ids_shuffle = torch.argsort(noise, dim=1)
    # ids_restore inverts ids_shuffle
    assert torch.equal(torch.gather(ids_shuffle, 1, ids_restore), torch.arange(length).expand(n, length))
    # mask marks exactly the removed patches, and the kept tokens are the visible ones in shuffle order
    for i in range(n):
        kept = ids_shuffle[i, :keep]
        expect = torch.ones(length)
        expect[kept] = 0
        assert torch.equal(mask[i], expect)
        assert torch.equal(x_masked[i], x[i, kept])


@settings(deadline=None, max_examples=10)
@given(n=st.integers(1, 3), chans=st.sampled_from([1, 3]), p=st.sampled_from([2, 4]),
       grid=st.integers(1, 4), norm_pix=st.booleans(), ratio=st.sampled_from([0.25, 0.5, 0.75]))
def test_loss_equals_mae_formula(n, chans, p, grid, norm_pix, ratio):
    size = p * grid
    m = tiny_mae(in_chans=chans, img_size=size, patch_size=p, norm_pix_loss=norm_pix)
    x = torch.rand(n, chans, size, size)
    if int(grid * grid * (1 - ratio)) == grid * grid:  # nothing removed: MAE's formula is 0/0
        return
    loss, pred, mask = m(x, mask_ratio=ratio)
    ref = mae_formula_loss(x, pred.detach(), mask, p, norm_pix)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)


def test_patchify_roundtrip_and_layout():
    m = tiny_mae(in_chans=3, img_size=8, patch_size=2)
    x = torch.rand(2, 3, 8, 8)
    pt = m.patchify(x)
    assert pt.shape == (2, 16, 12)
    # patch (row 1, col 2), channel-last inside the patch, as in MAE's einsum nchpwq->nhwpqc
    expect = x[0, :, 2:4, 4:6].permute(1, 2, 0).reshape(-1)
    assert torch.equal(pt[0, 1 * 4 + 2], expect)
    assert torch.equal(m.unpatchify(pt), x)


def test_mask_ratio_zero_is_finite_and_has_no_masked_patches():
    m = tiny_mae(norm_pix_loss=True)
    x = torch.rand(4, 1, 8, 8)
    loss, pred, mask = m(x, mask_ratio=0.0)
    assert torch.isfinite(loss)
    assert mask.sum() == 0
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    # at r = 0 the loss averages over all patches
    target = m.patchify(x)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    torch.testing.assert_close(loss, ((pred - target) ** 2).mean())


def test_fused_and_explicit_attention_agree():
    m = tiny_mae().eval()
    x = torch.rand(3, 1, 8, 8)
    noise = torch.rand(3, 16)
    m.set_fused_attn(True)
    _, p1, _ = m(x, 0.5, noise=noise)
    m.set_fused_attn(False)
    _, p2, _ = m(x, 0.5, noise=noise)
    torch.testing.assert_close(p1, p2, rtol=1e-5, atol=1e-5)


def test_sincos_pos_embed_matches_formula():
    d, g = 16, 3
    pe = get_2d_sincos_pos_embed(d, g, cls_token=True)
    assert pe.shape == (g * g + 1, d) and np.all(pe[0] == 0)
    omega = 1.0 / 10000 ** (np.arange(d // 4) / (d / 4))
    for idx in range(g * g):
        h, w = divmod(idx, g)
        expect = np.concatenate([np.sin(w * omega), np.cos(w * omega), np.sin(h * omega), np.cos(h * omega)])
        np.testing.assert_allclose(pe[1 + idx], expect, atol=1e-12)


def test_presets_have_anchor_sizes():
    sizes = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12)}
    for name, (dim, depth, heads) in sizes.items():
        for p in (2, 4):
            cfg = PRESETS[f"mae_vit_{name}_patch{p}"]
            assert (cfg["embed_dim"], cfg["depth"], cfg["num_heads"], cfg["patch_size"], cfg["img_size"]) == (dim, depth, heads, p, 32)
            assert (cfg["decoder_embed_dim"], cfg["decoder_depth"], cfg["decoder_num_heads"]) == (128, 2, 16)
    m = create_mae("demo")
    assert m.in_chans == 1
    with pytest.raises(ValueError, match="unknown preset"):
        create_mae("nope")


def test_bad_inputs():
    m = tiny_mae()
    with pytest.raises(ValueError, match="rank"):
        m(torch.rand(1, 8, 8))
    with pytest.raises(ValueError, match="channel"):
        m(torch.rand(2, 3, 8, 8))
    with pytest.raises(ValueError, match="8x8"):
        m(torch.rand(2, 1, 16, 16))
    with pytest.raises(TypeError, match="dtype"):
        m(torch.zeros(2, 1, 8, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="empty"):
        m(torch.rand(0, 1, 8, 8))
    with pytest.raises(ValueError, match="mask_ratio"):
        m(torch.rand(2, 1, 8, 8), mask_ratio=1.0)
    with pytest.raises(ValueError, match="mask_ratio"):
        m(torch.rand(2, 1, 8, 8), mask_ratio=-0.1)
    with pytest.raises(ValueError, match="in_chans"):
        tiny_mae(in_chans=2)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_torch_compile_fullgraph(backend):
    m = tiny_mae(in_chans=3).set_backend(backend).eval()
    x = torch.rand(2, 3, 8, 8)
    noise = torch.rand(2, 16)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    for ratio in (0.0, 0.5):
        ref = m(x, ratio, noise=noise)
        out = compiled(x, ratio, noise=noise)
        for a, b in zip(out, ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
