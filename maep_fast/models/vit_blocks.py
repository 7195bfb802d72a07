"""Transformer pieces with timm's names: PatchEmbed, Attention, Mlp, Block.

Attention keeps timm's ``fused_attn`` switch: False (or ops backend
"torch", e.g. ``MAEP_FAST_BACKEND=torch``) runs the explicit reference
softmax(QK^T)V of ``maep_fast.ops.masked_patch_attention_reference``; True
runs a fused kernel: F.scaled_dot_product_attention for backend "auto"
(the fastest path measured so far; see ops/_dispatch.py), or our
``masked_patch_attention`` op for an explicit "triton" / "cpp" / "cuda".
``keep_attn = True`` stores the attention matrix [B, H, L, L] in
``last_attn`` (AMV diagnostic; reference path).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from maep_fast.ops._dispatch import requested_backend
from maep_fast.ops.masked_patch_attention import masked_patch_attention, masked_patch_attention_reference


class PatchEmbed(nn.Module):
    """[N, C, H, W] -> [N, (H/p)*(W/p), embed_dim] by a stride-p convolution."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.img_size = (img_size, img_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, fused_attn: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.fused_attn = fused_attn
        self.backend = "auto"  # ops backend; set through MaskedAutoencoderViT.set_backend
        self.keep_attn = False
        self.last_attn: torch.Tensor | None = None
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [B, H, L, D]
        backend = requested_backend(self.backend)
        if self.keep_attn:
            x, attn = masked_patch_attention_reference(q, k, v, None, self.scale, return_attn=True)
            self.last_attn = attn.detach()
        elif not self.fused_attn or backend == "torch":
            x = masked_patch_attention_reference(q, k, v, None, self.scale)
        elif backend == "auto":
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            x = masked_patch_attention(q, k, v, None, scale=self.scale, backend=backend)
        x = x.transpose(1, 2).reshape(b, n, c)
        return self.proj(x)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)); x + mlp(norm2(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True, fused_attn: bool = True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, fused_attn=fused_attn)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))
