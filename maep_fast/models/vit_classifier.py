"""ViT classifier built from a (MIMIR-)pretrained MaskedAutoencoderViT encoder.

Takes images in [0, 1] [N, C, H, W] (no normalization inside: the MAE was
pretrained on [0, 1] pixels) and returns logits [N, num_classes]. Layers
keep MAE's names (patch_embed, cls_token, pos_embed, blocks, norm) so
``from_mae`` copies them one to one; ``head`` is a new linear layer.
``global_pool=True`` averages the patch tokens and applies a new LayerNorm
``fc_norm`` (MAE's finetuning default; without it the pooled features of a
pretrained encoder are nearly constant and the head does not learn), else
the cls token after ``norm`` is used. ``self.config`` rebuilds the model (checkpoints).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from maep_fast.models.pos_embed import get_2d_sincos_pos_embed
from maep_fast.models.vit_blocks import Block, PatchEmbed


class ViTClassifier(nn.Module):
    def __init__(self, img_size: int = 32, patch_size: int = 4, in_chans: int = 3, embed_dim: int = 192,
                 depth: int = 12, num_heads: int = 3, mlp_ratio: float = 4.0, num_classes: int = 10,
                 global_pool: bool = True):
        super().__init__()
        self.config = dict(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                           depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, num_classes=num_classes,
                           global_pool=global_pool)
        self.global_pool = global_pool
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False)
        pe = get_2d_sincos_pos_embed(embed_dim, int(num_patches**0.5), cls_token=True)
        self.pos_embed.data.copy_(torch.from_numpy(pe).float().unsqueeze(0))
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.fc_norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes)
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)
        nn.init.zeros_(self.head.bias)

    @classmethod
    def from_mae(cls, mae: nn.Module, num_classes: int = 10, global_pool: bool = True) -> "ViTClassifier":
        """Copy patch_embed / cls_token / pos_embed / blocks / norm from a MaskedAutoencoderViT."""
        c = mae.config
        model = cls(img_size=c["img_size"], patch_size=c["patch_size"], in_chans=c["in_chans"],
                    embed_dim=c["embed_dim"], depth=c["depth"], num_heads=c["num_heads"], mlp_ratio=c["mlp_ratio"],
                    num_classes=num_classes, global_pool=global_pool)
        state = {k: v for k, v in mae.state_dict().items()
                 if k.split(".")[0] in ("patch_embed", "cls_token", "pos_embed", "blocks", "norm")}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or set(missing) != {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}:
            raise ValueError(f"encoder weights do not match: missing {missing}, unexpected {unexpected}")
        return model.to(next(mae.parameters()).device)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x) + self.pos_embed[:, 1:, :]
        cls_tok = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat((cls_tok, x), dim=1)
        for blk in self.blocks:
            x = blk(x)
        if self.global_pool:
            return self.fc_norm(x[:, 1:].mean(1))
        return self.norm(x)[:, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))
