"""Attention Matrix Variation (AMV), MAE-Pure's diagnostic.

AMV_l = || A_l(x_adv) - A_l(x_clean) ||_F for each decoder block l, with
A_l [N, heads, 1+L, 1+L] the softmax attention of decoder block l; the
Frobenius norm is taken per (sample, head) and averaged over samples and
heads. Both passes use the SAME mask noise (default mask ratio 0: the whole
image, so no noise is needed).
"""
from __future__ import annotations

from pathlib import Path

import torch

from maep_fast.models.mae import MaskedAutoencoderViT


@torch.no_grad()
def decoder_attention_maps(model: MaskedAutoencoderViT, x: torch.Tensor, mask_ratio: float = 0.0,
                           noise: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Attention matrices of every decoder block, each [N, heads, 1+L, 1+L]."""
    model.check_input(x, "x")
    blocks = list(model.decoder_blocks)
    old = [b.attn.keep_attn for b in blocks]
    try:
        for b in blocks:
            b.attn.keep_attn = True
            b.attn.last_attn = None
        latent, _, ids_restore = model.forward_encoder(x, mask_ratio, noise)
        model.forward_decoder(latent, ids_restore)
        maps = [b.attn.last_attn for b in blocks]
    finally:
        for b, k in zip(blocks, old):
            b.attn.keep_attn = k
            b.attn.last_attn = None
    return maps


@torch.no_grad()
def attention_matrix_variation(model: MaskedAutoencoderViT, x_clean: torch.Tensor, x_adv: torch.Tensor,
                               mask_ratio: float = 0.0, noise: torch.Tensor | None = None,
                               generator: torch.Generator | None = None) -> torch.Tensor:
    """AMV per decoder layer [n_decoder_blocks] (mean over batch and heads)."""
    if x_clean.shape != x_adv.shape:
        raise ValueError(f"x_clean and x_adv must have the same shape, got {list(x_clean.shape)} and {list(x_adv.shape)}")
    if mask_ratio > 0 and noise is None:
        noise = torch.rand(x_clean.shape[0], model.patch_embed.num_patches, generator=generator, device=x_clean.device)
    a = decoder_attention_maps(model, x_clean, mask_ratio, noise)
    b = decoder_attention_maps(model, x_adv, mask_ratio, noise)
    return torch.stack([(bi - ai).flatten(2).norm(dim=-1).mean() for ai, bi in zip(a, b)])


def save_amv_heatmap(model: MaskedAutoencoderViT, x_clean: torch.Tensor, x_adv: torch.Tensor, path,
                     layer: int = -1, index: int = 0, mask_ratio: float = 0.0, noise: torch.Tensor | None = None,
                     x_purified: torch.Tensor | None = None) -> torch.Tensor:
    """PNG: decoder attention (mean over heads) of image ``index`` at ``layer`` for clean,
    adversarial and |adv - clean| (and purified / |purified - clean| if given), titled with
    the per-layer AMV. Returns the AMV vector."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if mask_ratio > 0 and noise is None:
        noise = torch.rand(x_clean.shape[0], model.patch_embed.num_patches, device=x_clean.device)
    amv = attention_matrix_variation(model, x_clean, x_adv, mask_ratio, noise)
    ac = decoder_attention_maps(model, x_clean, mask_ratio, noise)[layer][index].mean(0).cpu()
    aa = decoder_attention_maps(model, x_adv, mask_ratio, noise)[layer][index].mean(0).cpu()
    panels = [("clean", ac), ("adversarial", aa), ("|adv - clean|", (aa - ac).abs())]
    if x_purified is not None:
        ap = decoder_attention_maps(model, x_purified, mask_ratio, noise)[layer][index].mean(0).cpu()
        panels += [("purified", ap), ("|purified - clean|", (ap - ac).abs())]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2))
    for ax, (title, m) in zip(axes, panels):
        im = ax.imshow(m.numpy(), cmap="viridis")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle("decoder attention, layer %d; AMV per layer: %s" % (
        layer if layer >= 0 else len(amv) + layer, ", ".join(f"{v:.3f}" for v in amv.tolist())), fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return amv
