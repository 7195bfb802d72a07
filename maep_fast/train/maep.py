"""MAEP two-stage training (Chen & Lu, arXiv 2501.16904).

Stage 1: the masked autoencoder P sees the adversarial image x_adv with mask
ratio r (default 0.5) and is trained with

    L = w_pur * l1(unpatchify(P(x_adv)), x) + w_mae * MSE on removed patches

(the purification loss of DISCO plus MAE's masked reconstruction loss, here
reconstructing the *clean* image; the paper does not publish the weights,
both are parameters). Adversarial pairs come from PGD against a frozen
classifier, made online per batch, or from a precomputed tensor set.

Three options beyond the paper, all off by default (``w_cls = 0``,
``clean_frac = 0``, ``AttackConfig.eps_min = None`` is the published recipe):

* ``w_cls``: classifier guidance, ``+ w_cls * KL(f(x) || f(clamp(P(x_adv))))``
  with the frozen classifier f (the high-level guided loss of HGD, Liao et
  al. 2018). It trains the purifier for that classifier; on the digits it
  is what brings the oblivious accuracy near clean (README, recipes).
* ``clean_frac``: that fraction of each batch is purified from the clean
  image (x -> x pairs), so clean inputs stay as they were.
* ``AttackConfig.eps_min``: each batch's training eps is drawn from
  [eps_min, eps], so the purifier undoes perturbations of every size in it.

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
    """PGD used to make training pairs (default: L-inf 8/255, step 2/255, 10 steps).

    With ``eps_min`` each batch draws its eps uniformly from [eps_min, eps] (CPU generator)
    and scales the step size with it: a purifier trained at one eps only learns to undo
    perturbations of that size."""

    norm: str = "linf"
    eps: float = 8 / 255
    step_size: float = 2 / 255
    steps: int = 10
    eps_min: float | None = None

    def __post_init__(self):
        if self.eps_min is not None and not (isinstance(self.eps_min, (int, float)) and 0 <= self.eps_min <= self.eps):
            raise ValueError(f"eps_min must be in [0, eps={self.eps:g}], got {self.eps_min!r}")

    def draw(self) -> tuple[float, float]:
        """(eps, step_size) for one batch."""
        if self.eps_min is None or self.eps_min == self.eps:
            return self.eps, self.step_size
        eps = self.eps_min + (self.eps - self.eps_min) * torch.rand(()).item()
        return eps, self.step_size * eps / self.eps


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
    w_cls: float = 0.0  # classifier guidance (not in the paper): needs the classifier, also with precomputed pairs
    clean_frac: float = 0.0  # fraction of each batch with the clean image as input

    def __post_init__(self):
        for name in ("w_pur", "w_mae", "w_cls"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v >= 0 and v == v and v != float("inf")):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if not (isinstance(self.clean_frac, (int, float)) and 0 <= self.clean_frac < 1):
            raise ValueError(f"clean_frac must be in [0, 1), got {self.clean_frac!r}")

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
    eps, step_size = attack.draw()
    with torch.autocast(x.device.type, enabled=False):
        return pgd_attack(classifier, x, y, eps=eps, step_size=step_size, steps=attack.steps,
                          norm=attack.norm, backend=backend)


def maep_loss(model: MaskedAutoencoderViT, x_adv: torch.Tensor, x: torch.Tensor, mask_ratio: float,
              w_pur: float, w_mae: float, classifier: nn.Module | None = None,
              w_cls: float = 0.0) -> tuple[torch.Tensor, dict]:
    """w_pur * l1(P(x_adv), x) + w_mae * masked MSE(P(x_adv), x) [+ w_cls * KL(f(x) || f(P(x_adv)))];
    one forward pass. x_adv, x: [N, C, H, W].

    At mask ratio 0 the MAE term averages over all patches (no 0/0). The guidance term
    (``w_cls > 0``) needs the frozen ``classifier`` f; P(x_adv) is clamped to [0, 1] first,
    as the purifier's output is at test time.
    """
    latent, mask, ids_restore = model.forward_encoder(x_adv, mask_ratio)
    pred = model.forward_decoder(latent, ids_restore)  # [N, L, p*p*C]
    be = model.ops_backend
    l_pur = patch_recon_loss(pred, x, None, patch_size=model.patch_size, norm_pix=False, p=1, backend=be)
    l_mae = patch_recon_loss(pred, x, mask if mask_ratio > 0 else None, patch_size=model.patch_size,
                             norm_pix=model.norm_pix_loss, p=2, backend=be)
    loss = w_pur * l_pur + w_mae * l_mae
    parts = {"l1_pur": l_pur.detach(), "mae": l_mae.detach()}
    if w_cls > 0:
        if classifier is None:
            raise ValueError("w_cls > 0 needs the classifier")
        with torch.autocast(x.device.type, enabled=False):
            purified = model.unpatchify(pred).float().clamp(0.0, 1.0)
            with torch.no_grad():
                target = classifier(x.float()).log_softmax(1)
            kl = nn.functional.kl_div(classifier(purified).log_softmax(1), target, log_target=True,
                                      reduction="batchmean")
        loss = loss + w_cls * kl
        parts["kl_cls"] = kl.detach()
    return loss, {"loss": loss.detach(), **parts}


def _with_clean_inputs(x_adv: torch.Tensor, x: torch.Tensor, frac: float) -> torch.Tensor:
    """Replace each row of x_adv by the clean x with probability ``frac`` (drawn from the
    CPU generator, which the training snapshots restore)."""
    pick = (torch.rand(x.shape[0]) < frac).to(x.device, non_blocking=True).view(-1, *([1] * (x.dim() - 1)))
    return torch.where(pick, x, x_adv)


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
        if cfg.clean_frac > 0:
            x_adv = _with_clean_inputs(x_adv, x, cfg.clean_frac)
        return maep_loss(model, x_adv, x, mask_ratio, cfg.w_pur, cfg.w_mae, classifier, cfg.w_cls)

    return step


def _run_config(stage: str, cfg: MAEPConfig, model: MaskedAutoencoderViT, loop: LoopConfig) -> dict:
    # the options beyond the paper enter only when used, so snapshots of plain runs still resume
    attack = {k: v for k, v in asdict(cfg.attack).items() if not (k == "eps_min" and v is None)}
    run = {"stage": stage, "model": model.config, "mask_ratio": cfg.mask_ratio, "w_pur": cfg.w_pur,
           "w_mae": cfg.w_mae, "attack": attack, "lr": loop.lr, "batch_size": loop.batch_size,
           "lora_rank": cfg.lora_rank}
    run.update({k: getattr(cfg, k) for k in ("w_cls", "clean_frac") if getattr(cfg, k)})
    return run


def _check_classifier(dataset, cfg: MAEPConfig, classifier: nn.Module | None) -> None:
    if classifier is not None:
        return
    if cfg.w_cls > 0:
        raise ValueError(f"w_cls={cfg.w_cls} (classifier guidance) needs the classifier, also with precomputed pairs")
    if not isinstance(dataset, AdversarialPairs):
        raise ValueError("classifier is required to make adversarial pairs online (or pass an AdversarialPairs set)")


def train_stage1(model: MaskedAutoencoderViT, dataset, cfg: MAEPConfig, classifier: nn.Module | None = None) -> list[dict]:
    """Masked adversarial-to-clean training. ``dataset``: an ImageDataset (pairs made online
    against ``classifier``) or an AdversarialPairs set (no classifier needed)."""
    _check_classifier(dataset, cfg, classifier)
    model.set_backend(cfg.backend)
    params = [p for p in model.parameters() if p.requires_grad]
    return fit(model, params, dataset, _step_fn(model, classifier, cfg, cfg.mask_ratio), cfg.stage1,
               _run_config("stage1", cfg, model, cfg.stage1))


def train_stage2(model: MaskedAutoencoderViT, dataset, cfg: MAEPConfig, classifier: nn.Module | None = None,
                 merge: bool = True) -> list[dict]:
    """LoRA-finetune the decoder at mask ratio 0. With ``merge`` the adapters are folded
    into the weights and removed afterwards (a plain MaskedAutoencoderViT remains)."""
    _check_classifier(dataset, cfg, classifier)
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
