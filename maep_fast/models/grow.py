"""Deepen a trained MAE without changing what it computes.

``deepen_mae`` appends blocks to the encoder and/or the decoder of a
``MaskedAutoencoderViT``. Each new block's residual branches end in a
zero-initialised projection (``attn.proj`` and ``mlp.fc2``), so the new block
is the identity and the deeper model computes exactly what the original did;
the new blocks then learn from there. This adds capacity to a purifier that
was already trained (for example a guided MAEP before it is finetuned through
itself) without retraining it from scratch.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from maep_fast.models.mae import MaskedAutoencoderViT


def _zero_residual(block: nn.Module) -> None:
    for lin in (block.attn.proj, block.mlp.fc2):
        nn.init.zeros_(lin.weight)
        nn.init.zeros_(lin.bias)


def deepen_mae(model: MaskedAutoencoderViT, encoder_blocks: int = 0, decoder_blocks: int = 0) -> MaskedAutoencoderViT:
    """A new MaskedAutoencoderViT with ``encoder_blocks`` identity blocks appended to
    ``model.blocks`` and ``decoder_blocks`` to ``model.decoder_blocks``; every other weight is
    copied. Same function as ``model`` (on the same backend); ``config`` gives the new depths,
    so the checkpoint round-trips. The input model is not modified."""
    if not isinstance(model, MaskedAutoencoderViT):
        raise TypeError(f"model must be a MaskedAutoencoderViT, got {type(model).__name__}")
    for name, v in (("encoder_blocks", encoder_blocks), ("decoder_blocks", decoder_blocks)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be an int >= 0, got {v!r}")
    cfg = dict(model.config)
    cfg["depth"] += encoder_blocks
    cfg["decoder_depth"] += decoder_blocks
    fused = model.blocks[0].attn.fused_attn if len(model.blocks) else True
    ref = next(model.parameters())
    new = MaskedAutoencoderViT(**cfg, fused_attn=fused).to(device=ref.device, dtype=ref.dtype)
    for blk in list(new.blocks)[model.config["depth"]:] + list(new.decoder_blocks)[model.config["decoder_depth"]:]:
        _zero_residual(blk)
    missing, unexpected = new.load_state_dict(model.state_dict(), strict=False)
    if unexpected:
        raise RuntimeError(f"deepen_mae: unexpected keys {unexpected}")
    fresh = {f"blocks.{i}." for i in range(model.config["depth"], cfg["depth"])}
    fresh |= {f"decoder_blocks.{i}." for i in range(model.config["decoder_depth"], cfg["decoder_depth"])}
    stray = [k for k in missing if not any(k.startswith(p) for p in fresh)]
    if stray:
        raise RuntimeError(f"deepen_mae: weights not copied: {stray}")
    new.set_backend(model.ops_backend)
    new.train(model.training)
    return new
