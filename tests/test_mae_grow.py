"""deepen_mae: appended blocks start as the identity, so the deeper MAE computes what the original did."""
import pytest
import torch

from maep_fast import load_model, save_model
from maep_fast.models.grow import deepen_mae
from maep_fast.models.presets import create_mae


def _trained_like(seed=0):
    torch.manual_seed(seed)
    m = create_mae("demo", img_size=16).eval()
    with torch.no_grad():  # move every weight off its init so a dropped copy would show
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


@pytest.mark.parametrize("enc,dec", [(0, 0), (3, 0), (0, 1), (2, 3)])
def test_deepen_keeps_the_function(enc, dec):
    m = _trained_like()
    d = deepen_mae(m, enc, dec).eval()
    assert d.config["depth"] == m.config["depth"] + enc
    assert d.config["decoder_depth"] == m.config["decoder_depth"] + dec
    assert len(d.blocks) == d.config["depth"] and len(d.decoder_blocks) == d.config["decoder_depth"]
    x = torch.rand(5, 1, 16, 16)
    noise = torch.rand(5, m.patch_embed.num_patches)
    for ratio in (0.0, 0.5):
        torch.testing.assert_close(d.reconstruct(x, ratio, noise), m.reconstruct(x, ratio, noise), rtol=0, atol=1e-6)


def test_new_blocks_learn_and_the_original_is_untouched():
    m = _trained_like()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    d = deepen_mae(m, 1, 1)
    x = torch.rand(4, 1, 16, 16)
    d.reconstruct(x).square().mean().backward()
    new = d.blocks[-1]
    # the zero projections get a gradient (their inputs are not zero), so the block can move off the identity
    assert new.attn.proj.weight.grad.abs().sum() > 0 and new.mlp.fc2.weight.grad.abs().sum() > 0
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    d.blocks[0].attn.qkv.weight.data.zero_()
    assert not torch.equal(m.blocks[0].attn.qkv.weight, d.blocks[0].attn.qkv.weight)  # a copy, not shared


def test_deepened_checkpoint_round_trips(tmp_path):
    d = deepen_mae(_trained_like(), 2, 1).eval()
    save_model(d, tmp_path / "m")
    back = load_model(tmp_path / "m", expect_kind="mae").eval()
    x = torch.rand(3, 1, 16, 16)
    torch.testing.assert_close(back.reconstruct(x), d.reconstruct(x), rtol=0, atol=0)


@pytest.mark.parametrize("kw,name", [({"encoder_blocks": -1}, "encoder_blocks"), ({"decoder_blocks": 1.5}, "decoder_blocks"),
                                     ({"encoder_blocks": True}, "encoder_blocks")])
def test_bad_counts_name_the_argument(kw, name):
    with pytest.raises(ValueError, match=name):
        deepen_mae(_trained_like(), **kw)


def test_not_an_mae():
    with pytest.raises(TypeError, match="MaskedAutoencoderViT"):
        deepen_mae(torch.nn.Linear(2, 2))
