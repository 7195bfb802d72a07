"""MAEP two-stage training (Chen & Lu, arXiv 2501.16904).

Stage 1: the masked autoencoder P sees the adversarial image x_adv with mask
ratio r (default 0.5) and is trained with

    L = w_pur * l1(unpatchify(P(x_adv)), x) + w_mae * MSE on removed patches

(the purification loss of DISCO plus MAE's masked reconstruction loss, here
reconstructing the *clean* image; the paper does not publish the weights,
both are parameters). Adversarial pairs come from PGD against a frozen
classifier, made online per batch, or from a precomputed tensor set.

Stage 2 ("train-test discrepancy"): LoRA adapters on the decoder only, the
rest frozen, trained at mask ratio 0 (the test-time setting), then merged.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

from maep_fast.attacks.pgd import pgd_attack
from maep_fast.models.lora import apply_decoder_lora, remove_lora
from maep_fast.models.mae import MaskedAutoencoderViT
from maep_fast.ops.patch_recon_loss import patch_recon_loss
from maep_fast.train.loop import LoopConfig, fit


@dataclass
class AttackConfig:
    """PGD used to make training pairs (default: L-inf 8/255, step 2/255, 10 steps)."""

    norm: str = "linf"
    eps: float = 8 / 255
    step_size: float = 2 / 255
    steps: int = 10


@dataclass
class MAEPConfig:
    mask_ratio: float = 0.5
    w_pur: float = 1.0
    w_mae: float = 1.0
    attack: AttackConfig = field(default_factory=AttackConfig)
    stage1: LoopConfig = field(default_factory=lambda: LoopConfig(epochs=20, lr=1e-3, desc="MAEP stage 1"))
    stage2: LoopConfig = field(default_factory=lambda: LoopConfig(epochs=5, lr=1e-3, warmup_epochs=0.5, desc="MAEP stage 2 (LoRA)"))
    lora_rank: int = 8
    lora_alpha: float = 16.0
    fused: bool = True  # False: the pure-PyTorch reference path for every op (attention, loss, PGD step)

    @property
    def backend(self) -> str:
        return "auto" if self.fused else "torch"


class AdversarialPairs:
    """A precomputed set of (clean [N, C, H, W], adversarial [N, C, H, W], labels [N])."""

    def __init__(self, clean: torch.Tensor, adversarial: torch.Tensor, labels: torch.Tensor):
        if clean.shape != adversarial.shape:
            raise ValueError(f"adversarial must have the shape of clean {list(clean.shape)}, got {list(adversarial.shape)}")
        if labels.shape[0] != clean.shape[0]:
            raise ValueError(f"labels must have {clean.shape[0]} entries, got {labels.shape[0]}")
        self.clean, self.adversarial, self.labels = clean, adversarial, labels

    def __len__(self) -> int:
        return self.clean.shape[0]

    def loader(self, batch_size: int, shuffle: bool, seed: int, drop_last: bool = False):
        ds = torch.utils.data.TensorDataset(self.clean, self.adversarial, self.labels)
        g = torch.Generator().manual_seed(seed)
        return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=g, drop_last=drop_last)


def make_adversarial(classifier: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: AttackConfig,
                     backend: str = "auto") -> torch.Tensor:
    """PGD examples against the frozen ``classifier`` (fp32, outside any autocast)."""
    with torch.autocast(x.device.type, enabled=False):
        return pgd_attack(classifier, x, y, eps=attack.eps, step_size=attack.step_size, steps=attack.steps,
                          norm=attack.norm, backend=backend)


def maep_loss(model: MaskedAutoencoderViT, x_adv: torch.Tensor, x: torch.Tensor, mask_ratio: float,
              w_pur: float, w_mae: float) -> tuple[torch.Tensor, dict]:
    """w_pur * l1(P(x_adv), x) + w_mae * masked MSE(P(x_adv), x); one forward pass.

    At mask ratio 0 the MAE term averages over all patches (no 0/0).
    """
    latent, mask, ids_restore = model.forward_encoder(x_adv, mask_ratio)
    pred = model.forward_decoder(latent, ids_restore)  # [N, L, p*p*C]
    be = model.ops_backend
    l_pur = patch_recon_loss(pred, x, None, patch_size=model.patch_size, norm_pix=False, p=1, backend=be)
    l_mae = patch_recon_loss(pred, x, mask if mask_ratio > 0 else None, patch_size=model.patch_size,
                             norm_pix=model.norm_pix_loss, p=2, backend=be)
    loss = w_pur * l_pur + w_mae * l_mae
    return loss, {"loss": loss.detach(), "l1_pur": l_pur.detach(), "mae": l_mae.detach()}


def _step_fn(model, classifier, cfg: MAEPConfig, mask_ratio: float):
    if classifier is not None:
        classifier.eval()
        for p in classifier.parameters():
            p.requires_grad_(False)

    def step(*batch):
        if len(batch) == 3:  # precomputed pairs
            x, x_adv, _ = batch
        else:
            x, y = batch
            x_adv = make_adversarial(classifier, x, y, cfg.attack, backend=cfg.backend)
        return maep_loss(model, x_adv, x, mask_ratio, cfg.w_pur, cfg.w_mae)

    return step


def _run_config(stage: str, cfg: MAEPConfig, model: MaskedAutoencoderViT, loop: LoopConfig) -> dict:
    return {"stage": stage, "model": model.config, "mask_ratio": cfg.mask_ratio, "w_pur": cfg.w_pur,
            "w_mae": cfg.w_mae, "attack": asdict(cfg.attack), "lr": loop.lr, "batch_size": loop.batch_size,
            "lora_rank": cfg.lora_rank}


def train_stage1(model: MaskedAutoencoderViT, dataset, cfg: MAEPConfig, classifier: nn.Module | None = None) -> list[dict]:
    """Masked adversarial-to-clean training. ``dataset``: an ImageDataset (pairs made online
    against ``classifier``) or an AdversarialPairs set (no classifier needed)."""
    if not isinstance(dataset, AdversarialPairs) and classifier is None:
        raise ValueError("classifier is required to make adversarial pairs online (or pass an AdversarialPairs set)")
    model.set_backend(cfg.backend)
    params = [p for p in model.parameters() if p.requires_grad]
    return fit(model, params, dataset, _step_fn(model, classifier, cfg, cfg.mask_ratio), cfg.stage1,
               _run_config("stage1", cfg, model, cfg.stage1))


def train_stage2(model: MaskedAutoencoderViT, dataset, cfg: MAEPConfig, classifier: nn.Module | None = None,
                 merge: bool = True) -> list[dict]:
    """LoRA-finetune the decoder at mask ratio 0. With ``merge`` the adapters are folded
    into the weights and removed afterwards (a plain MaskedAutoencoderViT remains)."""
    if not isinstance(dataset, AdversarialPairs) and classifier is None:
        raise ValueError("classifier is required to make adversarial pairs online (or pass an AdversarialPairs set)")
    model.set_backend(cfg.backend)
    apply_decoder_lora(model, rank=cfg.lora_rank, alpha=cfg.lora_alpha)
    params = [p for p in model.parameters() if p.requires_grad]
    history = fit(model, params, dataset, _step_fn(model, classifier, cfg, 0.0), cfg.stage2,
                  _run_config("stage2", cfg, model, cfg.stage2))
    if merge:
        remove_lora(model)
        for p in model.parameters():
            p.requires_grad_(True)
        for name in ("pos_embed", "decoder_pos_embed"):  # fixed buffers-as-parameters stay frozen, as in MAE
            getattr(model, name).requires_grad_(False)
    return history


def train_maep(model: MaskedAutoencoderViT, dataset, cfg: MAEPConfig, classifier: nn.Module | None = None) -> dict:
    """Both stages; returns {"stage1": history, "stage2": history}."""
    if model.norm_pix_loss:
        raise ValueError("MAEP must output pixels: build the purifier with norm_pix_loss=False")
    h1 = train_stage1(model, dataset, cfg, classifier)
    h2 = train_stage2(model, dataset, cfg, classifier) if cfg.stage2.epochs > 0 else []
    return {"stage1": h1, "stage2": h2}
