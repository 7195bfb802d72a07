"""MaskedAutoencoderViT with the names and methods of facebookresearch/mae.

Shapes (N images, C channels, p patch size, L = (img_size/p)^2 patches):
    imgs           [N, C, H, W]
    patchify(imgs) [N, L, p*p*C]
    latent         [N, 1 + L_keep, embed_dim]      (cls token first)
    pred           [N, L, p*p*C]
    mask           [N, L]   0 = kept, 1 = removed, in original patch order
"""
from __future__ import annotations

import torch
import torch.nn as nn

from maep_fast._checks import check_ratio, check_tensor
from maep_fast.models.pos_embed import get_2d_sincos_pos_embed
from maep_fast.models.vit_blocks import Block, PatchEmbed
from maep_fast.ops._dispatch import requested_backend
from maep_fast.ops.patch_recon_loss import patch_recon_loss
from maep_fast.ops.patchify import patchify as _patchify
from maep_fast.ops.patchify import unpatchify as _unpatchify


class MaskedAutoencoderViT(nn.Module):
    """Masked autoencoder with a ViT backbone (He et al., 2022).

    All sizes are configurable; ``self.config`` holds the constructor
    arguments so checkpoints can rebuild the model.
    """

    def __init__(
        self,
        img_size: int = 32,
        patch_size: int = 4,
        in_chans: int = 3,
        embed_dim: int = 192,
        depth: int = 12,
        num_heads: int = 3,
        decoder_embed_dim: int = 128,
        decoder_depth: int = 2,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm_pix_loss: bool = False,
        fused_attn: bool = True,
    ):
        super().__init__()
        if in_chans not in (1, 3):
            raise ValueError(f"in_chans must be 1 or 3, got {in_chans}")
        if img_size % patch_size:
            raise ValueError(f"img_size ({img_size}) must be divisible by patch_size ({patch_size})")
        self.config = dict(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, depth=depth,
            num_heads=num_heads, decoder_embed_dim=decoder_embed_dim, decoder_depth=decoder_depth,
            decoder_num_heads=decoder_num_heads, mlp_ratio=mlp_ratio, norm_pix_loss=norm_pix_loss,
        )
        self.img_size = img_size
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.norm_pix_loss = norm_pix_loss
        self.ops_backend = "auto"

        # encoder
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList(
            [Block(embed_dim, num_heads, mlp_ratio, fused_attn=fused_attn) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

        # decoder
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, decoder_embed_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            [Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, fused_attn=fused_attn) for _ in range(decoder_depth)]
        )
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans, bias=True)
        self.initialize_weights()

    # ------------------------------------------------------------------ init
    def initialize_weights(self) -> None:
        grid = int(self.patch_embed.num_patches**0.5)
        pe = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], grid, cls_token=True)
        self.pos_embed.data.copy_(torch.from_numpy(pe).float().unsqueeze(0))
        dpe = get_2d_sincos_pos_embed(self.decoder_pos_embed.shape[-1], grid, cls_token=True)
        self.decoder_pos_embed.data.copy_(torch.from_numpy(dpe).float().unsqueeze(0))
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    # ------------------------------------------------------------ switches
    def set_fused_attn(self, enabled: bool) -> None:
        for blk in list(self.blocks) + list(self.decoder_blocks):
            blk.attn.fused_attn = enabled

    def set_backend(self, backend: str) -> "MaskedAutoencoderViT":
        """Ops backend for attention and the reconstruction loss: auto | torch | triton | cpp | cuda.

        "torch" is the pure-PyTorch reference path everywhere.
        """
        requested_backend(backend)  # validates
        self.ops_backend = backend
        for blk in list(self.blocks) + list(self.decoder_blocks):
            blk.attn.backend = backend
        return self

    # -------------------------------------------------------------- layout
    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] -> [N, L, p*p*C]."""
        return _patchify(imgs, self.patch_size)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """[N, L, p*p*C] -> [N, C, H, W]."""
        return _unpatchify(x, self.patch_size, self.in_chans)

    def check_input(self, imgs: object, name: str = "imgs") -> torch.Tensor:
        """Shape/dtype checks only (no device sync): [N, in_chans, img_size, img_size]."""
        check_tensor(imgs, name, ndim=4)
        n, c, h, w = imgs.shape
        if c != self.in_chans:
            raise ValueError(f"{name} must have {self.in_chans} channel(s), got shape {list(imgs.shape)}")
        if (h, w) != (self.img_size, self.img_size):
            raise ValueError(f"{name} must be {self.img_size}x{self.img_size} for this model, got {h}x{w}")
        return imgs

    # ------------------------------------------------------------- masking
    def random_masking(self, x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
        """Per-sample random masking by argsort of uniform noise.

        x: [N, L, D] -> (x_masked [N, L_keep, D], mask [N, L], ids_restore [N, L])
        with L_keep = int(L * (1 - mask_ratio)).
        """
        n, length, d = x.shape
        len_keep = int(length * (1 - mask_ratio))
        if noise is None:
            noise = torch.rand(n, length, device=x.device)
        elif tuple(noise.shape) != (n, length):
            raise ValueError(f"noise must have shape [{n}, {length}], got {list(noise.shape)}")
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).expand(-1, -1, d))
        mask = torch.ones(n, length, device=x.device, dtype=x.dtype)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, dim=1, index=ids_restore)
        return x_masked, mask, ids_restore

    # ------------------------------------------------------------- forward
    def forward_encoder(self, x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
        """imgs [N, C, H, W] -> (latent [N, 1+L_keep, E], mask [N, L], ids_restore [N, L] or None)."""
        x = self.patch_embed(x)
        x = x + self.pos_embed[:, 1:, :]
        if mask_ratio > 0:
            x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)
        else:  # r = 0: nothing to shuffle; skip the gathers
            mask = torch.zeros(x.shape[0], x.shape[1], device=x.device, dtype=x.dtype)
            ids_restore = None
        cls_token = self.cls_token + self.pos_embed[:, :1, :]
        x = torch.cat((cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor | None) -> torch.Tensor:
        """latent [N, 1+L_keep, E] -> pred [N, L, p*p*C]."""
        x = self.decoder_embed(x)
        if ids_restore is not None:
            n, length = ids_restore.shape
            mask_tokens = self.mask_token.expand(n, length + 1 - x.shape[1], -1)
            x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
            x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
            x = torch.cat([x[:, :1, :], x_], dim=1)
        x = x + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_norm(x)
        x = self.decoder_pred(x)
        return x[:, 1:, :]

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Mean squared error on removed patches (MAE's formula).

        ``mask=None`` averages over every patch (what ``forward`` passes at mask
        ratio 0, instead of dividing by ``mask.sum() == 0``); an all-zero mask
        gives 0.
        """
        return patch_recon_loss(pred, imgs, mask, patch_size=self.patch_size, norm_pix=self.norm_pix_loss, p=2,
                                backend=self.ops_backend)

    def forward(self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None):
        """-> (loss, pred [N, L, p*p*C], mask [N, L])."""
        self.check_input(imgs)
        check_ratio(mask_ratio, "mask_ratio")
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        removes = int(self.patch_embed.num_patches * (1 - mask_ratio)) < self.patch_embed.num_patches
        loss = self.forward_loss(imgs, pred, mask if removes else None)
        return loss, pred, mask

    def reconstruct(self, imgs: torch.Tensor, mask_ratio: float = 0.0, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Pixel reconstruction [N, C, H, W] (for models trained without norm_pix_loss)."""
        self.check_input(imgs)
        check_ratio(mask_ratio, "mask_ratio")
        latent, _, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        return self.unpatchify(self.forward_decoder(latent, ids_restore))
