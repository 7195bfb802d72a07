"""bench/flops.py: FlopCounterMode counts agree with the hand counts of the ViT presets."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import flops  # noqa: E402

from maep_fast.models.presets import PRESETS, create_mae  # noqa: E402


def _close(a, b, rel=0.02):
    assert abs(a - b) <= rel * b, (a, b, a / b)


@pytest.mark.parametrize("preset", ["mae_vit_base_patch4_dec512", "demo"])
def test_counted_matches_hand(preset):
    _close(flops.maep_flops(preset), flops.hand_maep_flops(preset))
    _close(flops.mae_pure_step_flops(preset, 0.25), flops.hand_mae_pure_step_flops(preset, 0.25))
    _close(flops.mae_pure_step_flops(preset, 0.25, n_masks=2), flops.hand_mae_pure_step_flops(preset, 0.25, 2))
    _close(flops.maep_train_flops(preset), flops.hand_maep_train_flops(preset))


def test_hand_count_base_dec512_by_formula():
    # ViT-B/4 on 32x32: 65 tokens; 12 blocks at 768, 8 decoder blocks at 512
    h = flops.hand_vit_flops(PRESETS["mae_vit_base_patch4_dec512"])
    n, d, dd = 65, 768, 512
    enc = 12 * 2 * (12 * n * d * d + 2 * n * n * d)
    dec = 8 * 2 * (12 * n * dd * dd + 2 * n * n * dd)
    extra = 2 * (64 * 48 * d + n * d * dd + n * dd * 48)
    assert h["total"] == enc + dec + extra
    assert 14.5e9 < h["total"] < 14.7e9


def test_real_cpu_tensors_and_fused_attention_count_the_same():
    # on CPU, F.scaled_dot_product_attention runs a kernel missing from torch's registry: flops.CUSTOM covers it
    m = create_mae("demo").set_backend("auto")
    x = torch.rand(1, 1, 16, 16)
    with torch.no_grad():
        fused = flops.count(lambda: m.reconstruct(x, 0.0))
    assert fused == flops.maep_flops(m) == flops.hand_maep_flops("demo")


def test_ddpm_unet_flops_and_meta_device():
    from maep_fast.baselines import ddpm_cifar10_unet

    u = flops.diffpure_unet_flops()
    # DDPM CIFAR-10 is usually quoted at ~6.1 G multiply-adds per forward (35.7 M parameters)
    assert 5.9e9 < u / 2 < 6.4e9
    small = ddpm_cifar10_unet(block_out_channels=(32, 32, 32, 32), layers_per_block=1)
    with torch.device("meta"):
        small_meta = ddpm_cifar10_unet(block_out_channels=(32, 32, 32, 32), layers_per_block=1)
    assert flops.diffpure_unet_flops(small) == flops.diffpure_unet_flops(small_meta) > 0
