"""Named MaskedAutoencoderViT sizes.

32x32 presets use the ViT sizes of docs/methods.md (Tiny 192/12/3, Small 384/12/6,
Base 768/12/12) with MIMIR's decoder (128-d, depth 2, 16 heads), at patch 2
or 4. ``mae_vit_base_patch4_dec512`` is MAE-Pure's CIFAR-10 purifier with
MAE's standard 512-d, 8-block decoder. ``demo`` is small enough to train on a
2-core CPU in about a minute (16x16 grayscale digits).
"""
from __future__ import annotations

from maep_fast.models.mae import MaskedAutoencoderViT

_ENCODERS = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12)}

PRESETS: dict[str, dict] = {}
for _size, (_dim, _depth, _heads) in _ENCODERS.items():
    for _patch in (2, 4):
        PRESETS[f"mae_vit_{_size}_patch{_patch}"] = dict(
            img_size=32, patch_size=_patch, in_chans=3, embed_dim=_dim, depth=_depth, num_heads=_heads,
            decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=16,
        )
PRESETS["mae_vit_base_patch4_dec512"] = dict(
    img_size=32, patch_size=4, in_chans=3, embed_dim=768, depth=12, num_heads=12,
    decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16,
)
PRESETS["demo"] = dict(
    img_size=16, patch_size=2, in_chans=1, embed_dim=96, depth=4, num_heads=4,
    decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4,
)


def create_mae(name: str, **overrides) -> MaskedAutoencoderViT:
    """Build a preset by name; keyword overrides replace preset fields."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return MaskedAutoencoderViT(**{**PRESETS[name], **overrides})
