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
with ``trades_beta`` (6.0 is TRADES' usual value; MIMIR's code supports it),
optionally with the eps ramped up from ``eps_start`` over the first
``ramp_frac`` of the steps. Both run on ``maep_fast.train.loop.fit``.

The whole pipeline (pretraining, ViT from the encoder, finetuning; resumable,
seeded) is ``train_mimir_vit(dataset, MIMIRRecipe(...))``; ``MIMIRRecipe``'s
defaults are the recipe measured on the embedded 16x16 digits and the defaults
of ``maep-fast mimir`` (docs/mimir.md). ``pretrain="mae"`` / ``"none"`` give the
comparison runs (plain MAE pretraining; adversarial training from scratch).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

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


def _snapshot_step(loop: LoopConfig) -> int:
    """Optimizer steps already taken by the snapshot ``fit`` will resume from (0 without one)."""
    if not (loop.resume and loop.state_dir):
        return 0
    state = Path(loop.state_dir) / "state.json"
    if not state.is_file():
        return 0
    return int(json.loads(state.read_text()).get("step", 0))


def eps_at(step: int, total_steps: int, eps: float, eps_start: float | None, ramp_frac: float) -> float:
    """The training eps at optimizer step ``step`` of ``total_steps``: linear from ``eps_start`` to ``eps``
    over the first ``ramp_frac`` of the steps, then ``eps`` (``eps_start=None`` or ``ramp_frac=0``: always eps)."""
    if eps_start is None or ramp_frac <= 0:
        return eps
    ramp = ramp_frac * max(total_steps, 1)
    if step >= ramp:
        return eps
    return eps_start + (eps - eps_start) * step / ramp


def adversarial_finetune(classifier: nn.Module, dataset, eps: float = 8 / 255, alpha: float = 2 / 255,
                         steps: int = 10, trades_beta: float | None = None, loop: LoopConfig | None = None,
                         norm: str = "linf", eps_start: float | None = None, ramp_frac: float = 0.0) -> list[dict]:
    """PGD adversarial training (``trades_beta=None``) or TRADES (``trades_beta``, e.g. 6.0).

    ``eps_start`` / ``ramp_frac``: the training eps grows linearly from ``eps_start`` to ``eps`` over the
    first ``ramp_frac`` of the optimizer steps (``alpha`` scales with it); resumed runs continue the ramp
    where the snapshot stopped."""
    loop = loop or LoopConfig(epochs=50, lr=5e-4, desc="adversarial finetune")
    if eps_start is not None and not 0 <= eps_start <= eps:
        raise ValueError(f"eps_start must be in [0, eps={eps}], got {eps_start}")
    if not 0 <= ramp_frac <= 1:
        raise ValueError(f"ramp_frac must be in [0, 1], got {ramp_frac}")
    n = len(dataset)
    total_steps = loop.epochs * max(1, n // loop.batch_size if n > loop.batch_size else 1)
    counter = [_snapshot_step(loop)]

    def step(x, y):
        e = eps_at(counter[0], total_steps, eps, eps_start, ramp_frac)
        a = alpha * e / eps if eps > 0 else alpha
        counter[0] += 1
        with torch.autocast(x.device.type, enabled=False):
            if trades_beta is None:
                classifier.eval()
                x_adv = pgd_attack(classifier, x, y, eps=e, step_size=a, steps=steps, norm=norm)
                classifier.train()
                logits = classifier(x_adv)
                loss = F.cross_entropy(logits, y)
                acc = (logits.argmax(1) == y).float().mean()
                return loss, {"loss": loss.detach(), "adv_acc": acc, "eps": torch.tensor(e)}
            classifier.eval()
            with torch.no_grad():
                p_clean = F.softmax(classifier(x), 1)

            def kl(logits, _):
                return F.kl_div(F.log_softmax(logits, 1), p_clean, reduction="sum")

            x_adv = pgd_attack(classifier, x, y, eps=e, step_size=a, steps=steps, norm=norm, loss_fn=kl)
            classifier.train()
            logits = classifier(x)
            l_nat = F.cross_entropy(logits, y)
            l_rob = F.kl_div(F.log_softmax(classifier(x_adv), 1), F.softmax(logits, 1), reduction="batchmean")
            loss = l_nat + trades_beta * l_rob
            acc = (logits.argmax(1) == y).float().mean()
            return loss, {"loss": loss.detach(), "nat": l_nat.detach(), "rob": l_rob.detach(), "acc": acc,
                          "eps": torch.tensor(e)}

    params = [p for p in classifier.parameters() if p.requires_grad]
    run_cfg = {"stage": "adversarial_finetune", "eps": eps, "alpha": alpha, "steps": steps, "trades_beta": trades_beta,
               "lr": loop.lr, "batch_size": loop.batch_size, "eps_start": eps_start, "ramp_frac": ramp_frac}
    return fit(classifier, params, dataset, step, loop, run_cfg)


PRETRAIN_CHOICES = ("mimir", "mae", "none")


@dataclass
class MIMIRRecipe:
    """Everything ``train_mimir_vit`` needs: the ViT, the pretraining and the adversarial finetuning.

    The defaults are the recipe measured on the embedded 16x16 digits (docs/mimir.md): patch 4
    (16 tokens), a 96-d 4-block encoder (4 heads), 20 MIMIR epochs (published PGD_MAE and HSIC
    settings), then 15 TRADES (beta 6) epochs with PGD-3 at 16/255 whose eps ramps up from 0 over the
    first 30 % of the finetuning steps; batch 64, AdamW, warmup + cosine.
    ``pretrain``: "mimir" (MIMIR), "mae" (plain MAE pretraining, same epochs) or "none" (no
    pretraining: the finetuning starts from the MAE's initialisation)."""
    pretrain: str = "mimir"
    img_size: int = 16
    in_chans: int = 1
    num_classes: int = 10
    patch_size: int = 4
    embed_dim: int = 96
    depth: int = 4
    num_heads: int = 4
    decoder_embed_dim: int = 64
    decoder_depth: int = 2
    decoder_num_heads: int = 4
    mask_ratio: float = 0.75
    pretrain_epochs: int = 20
    pretrain_lr: float = 1.5e-3
    pretrain_eps: float = 8 / 255  # MIMIR's PGD_MAE radius (alpha = 10/8 of it, as published)
    mi_weight: float = 1e-5
    finetune_epochs: int = 15
    finetune_lr: float = 1e-3
    eps: float = 16 / 255  # finetuning eps (L-inf); measured better than 8/255 at both 8 and 16/255 eval eps
    eps_start: float | None = 0.0  # None: no ramp
    ramp_frac: float = 0.3
    steps: int = 3  # PGD steps of the finetuning attack
    alpha: float | None = None  # None: 2.5 * eps / steps
    trades_beta: float | None = 6.0  # None: PGD-AT (Madry)
    batch_size: int = 64
    seed: int = 0

    def check(self) -> None:
        if self.pretrain not in PRETRAIN_CHOICES:
            raise ValueError(f"pretrain must be one of {PRETRAIN_CHOICES}, got {self.pretrain!r}")
        if self.img_size % self.patch_size:
            raise ValueError(f"patch_size {self.patch_size} must divide img_size {self.img_size}")
        for name in ("pretrain_epochs", "finetune_epochs", "steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.eps < 0 or self.pretrain_eps < 0:
            raise ValueError("eps and pretrain_eps must be >= 0")
        if self.eps_start is not None and not 0 <= self.eps_start <= self.eps:
            raise ValueError(f"eps_start must be in [0, eps], got {self.eps_start}")
        if not 0 <= self.ramp_frac <= 1:
            raise ValueError(f"ramp_frac must be in [0, 1], got {self.ramp_frac}")
        if self.trades_beta is not None and self.trades_beta < 0:
            raise ValueError(f"trades_beta must be >= 0, got {self.trades_beta}")
        if not 0 < self.mask_ratio < 1:
            raise ValueError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")

    @property
    def finetune_alpha(self) -> float:
        return self.alpha if self.alpha is not None else (2.5 * self.eps / max(self.steps, 1))

    def describe(self) -> str:
        pre = {"mimir": f"MIMIR pretrain {self.pretrain_epochs} ep (PGD_MAE 1 step {self.pretrain_eps * 255:g}/255, "
                        f"HSIC {self.mi_weight:g})",
               "mae": f"MAE pretrain {self.pretrain_epochs} ep", "none": "no pretraining"}[self.pretrain]
        ft = "TRADES(beta %g)" % self.trades_beta if self.trades_beta is not None else "PGD-AT"
        ramp = (f", eps ramp {self.eps_start * 255:g}->{self.eps * 255:g}/255 over {self.ramp_frac:.0%}"
                if self.eps_start is not None and self.ramp_frac > 0 else "")
        return (f"ViT patch {self.patch_size} {self.embed_dim}-d x{self.depth}; {pre} + {ft} PGD-{self.steps} "
                f"{self.finetune_epochs} ep at {self.eps * 255:g}/255{ramp}")


def build_mae_for(recipe: MIMIRRecipe) -> MaskedAutoencoderViT:
    """The (untrained) MAE of ``recipe``; its encoder becomes the ViT classifier."""
    return MaskedAutoencoderViT(img_size=recipe.img_size, patch_size=recipe.patch_size, in_chans=recipe.in_chans,
                                embed_dim=recipe.embed_dim, depth=recipe.depth, num_heads=recipe.num_heads,
                                decoder_embed_dim=recipe.decoder_embed_dim, decoder_depth=recipe.decoder_depth,
                                decoder_num_heads=recipe.decoder_num_heads, norm_pix_loss=True)


def train_mimir_vit(dataset, recipe: MIMIRRecipe | None = None, *, state_dir: str | Path | None = None,
                    resume: bool = False, snapshot_every: int = 0, progress: bool = True,
                    device: str | torch.device = "cpu"):
    """Pretrain (MIMIR / MAE / none) then adversarially finetune a ViT classifier on ``dataset``.

    Seeds every RNG with ``recipe.seed`` first. With ``state_dir``, each stage snapshots under
    ``state_dir/state_pretrain`` and ``state_dir/state_finetune``; ``resume=True`` continues from them and ends
    with the same weights as an uninterrupted run. Returns ``(vit, mae, info)``; ``info`` holds both
    stages' per-epoch histories and their wall-clock seconds."""
    import time

    from maep_fast.models.vit_classifier import ViTClassifier
    from maep_fast.train.common import set_seed
    from maep_fast.train.mae_pretrain import MAEPretrainConfig, train_mae

    recipe = recipe or MIMIRRecipe()
    recipe.check()
    c, h, _ = dataset.image_shape
    if (c, h) != (recipe.in_chans, recipe.img_size):
        raise ValueError(f"the data set holds {c}x{h}x{h} images, the recipe expects "
                         f"{recipe.in_chans}x{recipe.img_size}x{recipe.img_size}")
    set_seed(recipe.seed)
    mae = build_mae_for(recipe).to(device)
    sd = Path(state_dir) if state_dir is not None else None

    def loop(stage: str, epochs: int, lr: float, seed: int, desc: str) -> LoopConfig:
        return LoopConfig(epochs=epochs, batch_size=recipe.batch_size, lr=lr, seed=seed, progress=progress,
                          desc=desc, state_dir=str(sd / f"state_{stage}") if sd is not None else None, resume=resume,
                          snapshot_every=snapshot_every)

    t0 = time.perf_counter()
    h_pre: list[dict] = []
    if recipe.pretrain == "mimir" and recipe.pretrain_epochs:
        h_pre = train_mimir(mae, dataset, MIMIRConfig(
            mask_ratio=recipe.mask_ratio, eps=recipe.pretrain_eps, alpha=recipe.pretrain_eps * 10 / 8,
            mi_weight=recipe.mi_weight,
            loop=loop("pretrain", recipe.pretrain_epochs, recipe.pretrain_lr, recipe.seed, "MIMIR pretrain")))
    elif recipe.pretrain == "mae" and recipe.pretrain_epochs:
        h_pre = train_mae(mae, dataset, MAEPretrainConfig(
            mask_ratio=recipe.mask_ratio,
            loop=loop("pretrain", recipe.pretrain_epochs, recipe.pretrain_lr, recipe.seed, "MAE pretrain")))
    t_pre = time.perf_counter() - t0
    torch.manual_seed(recipe.seed + 1)  # the new head's initialisation does not depend on the pretraining's RNG use
    vit = ViTClassifier.from_mae(mae, num_classes=recipe.num_classes)
    t1 = time.perf_counter()
    h_ft = adversarial_finetune(vit, dataset, eps=recipe.eps, alpha=recipe.finetune_alpha, steps=recipe.steps,
                                trades_beta=recipe.trades_beta, eps_start=recipe.eps_start,
                                ramp_frac=recipe.ramp_frac,
                                loop=loop("finetune", recipe.finetune_epochs, recipe.finetune_lr, recipe.seed + 1,
                                          "MIMIR ViT adversarial finetune"))
    vit.eval()
    info = {"recipe": asdict(recipe), "pretrain_history": h_pre, "finetune_history": h_ft,
            "seconds": {"pretrain": round(t_pre, 1), "finetune": round(time.perf_counter() - t1, 1)},
            "description": recipe.describe()}
    return vit, mae, info
