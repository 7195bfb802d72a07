"""MIMIR (Xu et al., arXiv 2312.04960, NDSS 2026): adversarial masked-image-modeling
pretraining with a mutual-information penalty, then adversarial finetuning.

Pretraining step, per batch x (labels unused):

1. one mask noise ``noise ~ U[N, L]`` is drawn; the SAME masks are used for
   the attack and for the training loss;
2. ``x_adv = pgd_mae(model, x, noise)``: PGD that *maximizes the MAE loss
   itself* (MIMIR's PGD_MAE: the model's own loss on x_adv, i.e. target
   x_adv; ``attack_target="clean"`` uses x instead), uniform random start,
   1 step, eps 8/255, alpha 10/255 (published);
3. ``L = MAE loss(pred from masked x_adv, target clean x)
       + w * HSIC(latent(x_adv), x_adv)``, w = 1e-5, sigma = 5 (published);
   the HSIC term is skipped when not finite.

Published sizes: mask 0.75, norm_pix_loss, CIFAR-10 patch 2, decoder 128-d
depth 2 (``create_mae("mae_vit_small_patch2", norm_pix_loss=True)``).

Finetuning: ``ViTClassifier.from_mae(model)`` and ``adversarial_finetune``:
PGD-AT (Madry) with PGD-10, eps 8/255, alpha 2/255 (published), or TRADES
with ``trades_beta`` (6.0 is TRADES' usual value; MIMIR's code supports it).
Both run on ``maep_fast.train.loop.fit``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from maep_fast.attacks.pgd import pgd_attack
from maep_fast.models.mae import MaskedAutoencoderViT
from maep_fast.ops.patch_recon_loss import patch_recon_loss
from maep_fast.train.hsic import hsic_penalty
from maep_fast.train.loop import LoopConfig, fit


@dataclass
class MIMIRConfig:
    mask_ratio: float = 0.75  # published
    eps: float = 8 / 255  # published
    alpha: float = 10 / 255  # published
    attack_steps: int = 1  # published
    random_start: bool = True  # published
    attack_target: str = "adv"  # "adv": the MAE's own loss on x_adv (MIMIR's PGD_MAE); "clean": target x
    mi_weight: float = 1e-5  # published (--mi_xpl)
    sigma: float = 5.0  # published
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(epochs=20, lr=1.5e-4, desc="MIMIR pretrain"))


def _mae_loss(model: MaskedAutoencoderViT, x_in: torch.Tensor, target: torch.Tensor, mask_ratio: float,
              noise: torch.Tensor):
    latent, mask, ids_restore = model.forward_encoder(x_in, mask_ratio, noise)
    pred = model.forward_decoder(latent, ids_restore)
    loss = patch_recon_loss(pred, target, mask, patch_size=model.patch_size, norm_pix=model.norm_pix_loss, p=2)
    return loss, latent


def pgd_mae(model: MaskedAutoencoderViT, x: torch.Tensor, noise: torch.Tensor, *, mask_ratio: float = 0.75,
            eps: float = 8 / 255, alpha: float = 10 / 255, steps: int = 1, random_start: bool = True,
            target: str = "adv", generator: torch.Generator | None = None) -> torch.Tensor:
    """Label-free PGD (L-inf) that maximizes the MAE loss under the given mask noise."""
    from maep_fast.ops.pgd_step import pgd_step_

    if target not in ("adv", "clean"):
        raise ValueError(f"target must be 'adv' or 'clean', got {target!r}")
    x0 = x.detach()
    if random_start:
        x_adv = (x0 + (torch.rand(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype) * 2 - 1) * eps).clamp(0, 1)
    else:
        x_adv = x0.clone()
    with torch.autocast(x0.device.type, enabled=False), torch.enable_grad():
        for _ in range(steps):
            xg = x_adv.detach().requires_grad_(True)
            loss, _ = _mae_loss(model, xg, xg if target == "adv" else x0, mask_ratio, noise)
            grad = torch.autograd.grad(loss, xg)[0]
            x_adv = xg.detach()
            pgd_step_(x_adv, grad, x0, alpha, eps, norm="linf", direction=1, clamp=(0.0, 1.0))
    return x_adv.detach()


def mimir_loss(model: MaskedAutoencoderViT, x: torch.Tensor, cfg: MIMIRConfig,
               noise: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """One MIMIR step's loss on a clean batch x (draws the shared mask noise if not given)."""
    if noise is None:
        noise = torch.rand(x.shape[0], model.patch_embed.num_patches, device=x.device)
    x_adv = pgd_mae(model, x, noise, mask_ratio=cfg.mask_ratio, eps=cfg.eps, alpha=cfg.alpha, steps=cfg.attack_steps,
                    random_start=cfg.random_start, target=cfg.attack_target)
    l_mae, latent = _mae_loss(model, x_adv, x, cfg.mask_ratio, noise)
    l_mi = hsic_penalty(latent.reshape(x.shape[0], -1), x_adv.reshape(x.shape[0], -1), cfg.mi_weight, cfg.sigma)
    loss = l_mae + l_mi
    return loss, {"loss": loss.detach(), "mae": l_mae.detach(), "mi": l_mi.detach()}


def train_mimir(model: MaskedAutoencoderViT, dataset, cfg: MIMIRConfig | None = None) -> list[dict]:
    """Adversarial MAE pretraining on ``dataset`` (ImageDataset; labels ignored) with ``fit``."""
    cfg = cfg or MIMIRConfig()
    if not isinstance(model, MaskedAutoencoderViT):
        raise TypeError(f"model must be a MaskedAutoencoderViT, got {type(model).__name__}")

    def step(x, *rest):
        return mimir_loss(model, x, cfg)

    params = [p for p in model.parameters() if p.requires_grad]
    run_cfg = {"stage": "mimir", "model": model.config,
               **{k: v for k, v in asdict(cfg).items() if k != "loop"}, "lr": cfg.loop.lr,
               "batch_size": cfg.loop.batch_size}
    return fit(model, params, dataset, step, cfg.loop, run_cfg)


def adversarial_finetune(classifier: nn.Module, dataset, eps: float = 8 / 255, alpha: float = 2 / 255,
                         steps: int = 10, trades_beta: float | None = None, loop: LoopConfig | None = None,
                         norm: str = "linf") -> list[dict]:
    """PGD adversarial training (``trades_beta=None``) or TRADES (``trades_beta``, e.g. 6.0)."""
    loop = loop or LoopConfig(epochs=50, lr=5e-4, desc="adversarial finetune")

    def step(x, y):
        with torch.autocast(x.device.type, enabled=False):
            if trades_beta is None:
                classifier.eval()
                x_adv = pgd_attack(classifier, x, y, eps=eps, step_size=alpha, steps=steps, norm=norm)
                classifier.train()
                logits = classifier(x_adv)
                loss = F.cross_entropy(logits, y)
                acc = (logits.argmax(1) == y).float().mean()
                return loss, {"loss": loss.detach(), "adv_acc": acc}
            classifier.eval()
            with torch.no_grad():
                p_clean = F.softmax(classifier(x), 1)

            def kl(logits, _):
                return F.kl_div(F.log_softmax(logits, 1), p_clean, reduction="sum")

            x_adv = pgd_attack(classifier, x, y, eps=eps, step_size=alpha, steps=steps, norm=norm, loss_fn=kl)
            classifier.train()
            logits = classifier(x)
            l_nat = F.cross_entropy(logits, y)
            l_rob = F.kl_div(F.log_softmax(classifier(x_adv), 1), F.softmax(logits, 1), reduction="batchmean")
            loss = l_nat + trades_beta * l_rob
            return loss, {"loss": loss.detach(), "nat": l_nat.detach(), "rob": l_rob.detach()}

    params = [p for p in classifier.parameters() if p.requires_grad]
    run_cfg = {"stage": "adversarial_finetune", "eps": eps, "alpha": alpha, "steps": steps, "trades_beta": trades_beta,
               "lr": loop.lr, "batch_size": loop.batch_size}
    return fit(classifier, params, dataset, step, loop, run_cfg)
