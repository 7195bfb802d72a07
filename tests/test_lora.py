import torch

from conftest import tiny_mae
from maep_fast.models.lora import LoRALinear, apply_decoder_lora, lora_layers, merge_lora, remove_lora, unmerge_lora


def test_lora_linear_math_and_merge():
    base = torch.nn.Linear(7, 5)
    lora = LoRALinear.from_linear(base, rank=3, alpha=6.0)
    torch.nn.init.normal_(lora.lora_B)
    x = torch.randn(4, 7)
    expect = base(x) + (x @ lora.lora_A.T @ lora.lora_B.T) * 2.0
    torch.testing.assert_close(lora(x), expect)
    lora.merge()
    torch.testing.assert_close(lora(x), expect, rtol=1e-5, atol=1e-5)
    lora.unmerge()
    torch.testing.assert_close(lora.weight, base.weight, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lora.to_linear()(x), expect, rtol=1e-5, atol=1e-5)


def test_decoder_only_lora_freezes_everything_else():
    m = tiny_mae()
    names = apply_decoder_lora(m, rank=2, alpha=4.0)
    assert "decoder_embed" in names and "decoder_pred" in names
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert all(n.startswith("decoder") for n in trainable)
    assert not any(isinstance(mod, LoRALinear) for mod in m.blocks.modules())
    # a fresh adapter (B = 0) does not change the function
    x = torch.rand(2, 1, 8, 8)
    ref = tiny_mae()
    ref.load_state_dict({k: v for k, v in m.state_dict().items() if "lora_" not in k})
    torch.testing.assert_close(m.reconstruct(x), ref.reconstruct(x))


def test_merge_unmerge_remove_roundtrip():
    m = tiny_mae().eval()
    apply_decoder_lora(m, rank=2, alpha=4.0)
    for layer in lora_layers(m):
        torch.nn.init.normal_(layer.lora_B, std=0.1)
    x = torch.rand(2, 1, 8, 8)
    y = m.reconstruct(x)
    merge_lora(m)
    torch.testing.assert_close(m.reconstruct(x), y, rtol=1e-5, atol=1e-5)
    unmerge_lora(m)
    torch.testing.assert_close(m.reconstruct(x), y, rtol=1e-5, atol=1e-5)
    remove_lora(m)
    assert not lora_layers(m)
    assert not any("lora_" in k for k in m.state_dict())
    torch.testing.assert_close(m.reconstruct(x), y, rtol=1e-5, atol=1e-5)
