"""LoRA adapters (Hu et al., 2021) for nn.Linear layers.

``LoRALinear`` subclasses nn.Linear, so the frozen base keeps its name
(``...qkv.weight``) and published state dicts still map one to one; the
adapter adds ``lora_A`` [r, in] and ``lora_B`` [out, r]:

    y = x W^T + b + (alpha / r) * x A^T B^T

``merge()`` folds the update into ``weight``; ``unmerge()`` takes it out.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class LoRALinear(nn.Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool = True, rank: int = 4, alpha: float = 8.0):
        super().__init__(in_features, out_features, bias=bias)
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.rank = rank
        self.alpha = alpha
        self.scaling = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.merged = False

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, alpha: float) -> "LoRALinear":
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, rank, alpha)
        new = new.to(device=linear.weight.device, dtype=linear.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(linear.weight)
            if linear.bias is not None:
                new.bias.copy_(linear.bias)
        new.weight.requires_grad_(False)
        if new.bias is not None:
            new.bias.requires_grad_(False)
        return new

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if not self.merged:
            out = out + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling
        return out

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.weight.add_(self.delta_weight())
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight.sub_(self.delta_weight())
            self.merged = False

    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear holding the merged weights."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        lin = lin.to(device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.weight + (0 if self.merged else self.delta_weight()))
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin


def apply_lora(module: nn.Module, rank: int = 4, alpha: float = 8.0) -> list[str]:
    """Replace every nn.Linear inside ``module`` by a LoRALinear (in place).

    Returns the qualified names that were wrapped.
    """
    wrapped = []
    for name, child in list(module.named_modules()):
        for cname, sub in list(child.named_children()):
            if isinstance(sub, nn.Linear) and not isinstance(sub, LoRALinear):
                setattr(child, cname, LoRALinear.from_linear(sub, rank, alpha))
                wrapped.append(f"{name}.{cname}" if name else cname)
    return wrapped


def lora_layers(module: nn.Module) -> list[LoRALinear]:
    return [m for m in module.modules() if isinstance(m, LoRALinear)]


def merge_lora(module: nn.Module) -> None:
    for m in lora_layers(module):
        m.merge()


def unmerge_lora(module: nn.Module) -> None:
    for m in lora_layers(module):
        m.unmerge()


def remove_lora(module: nn.Module) -> None:
    """Replace every LoRALinear by a plain nn.Linear with the merged weights."""
    for _, child in list(module.named_modules()):
        for cname, sub in list(child.named_children()):
            if isinstance(sub, LoRALinear):
                setattr(child, cname, sub.to_linear())


def decoder_modules(model: nn.Module) -> list[nn.Module]:
    """The decoder of a MaskedAutoencoderViT (what MAEP's stage 2 adapts)."""
    return [model.decoder_embed, model.decoder_blocks, model.decoder_pred]


def apply_decoder_lora(model: nn.Module, rank: int = 4, alpha: float = 8.0) -> list[str]:
    """Freeze the whole model, then add trainable LoRA adapters to the decoder only."""
    for p in model.parameters():
        p.requires_grad_(False)
    names = []
    # decoder_embed / decoder_pred are direct Linear attributes: wrap them explicitly
    for attr in ("decoder_embed", "decoder_pred"):
        lin = getattr(model, attr)
        if not isinstance(lin, LoRALinear):
            setattr(model, attr, LoRALinear.from_linear(lin, rank, alpha))
        names.append(attr)
    names += [f"decoder_blocks.{n}" for n in apply_lora(model.decoder_blocks, rank, alpha)]
    return names
