"""MAEP two-stage training (Chen & Lu, arXiv 2501.16904).

Stage 1: the masked autoencoder P sees the adversarial image x_adv with mask
ratio r (default 0.5) and is trained with

    L = w_pur * l1(unpatchify(P(x_adv)), x) + w_mae * MSE on removed patches

(the purification loss of DISCO plus MAE's masked reconstruction loss, here
reconstructing the *clean* image; the paper does not publish the weights,
both are parameters). Adversarial pairs come from PGD against a frozen
classifier, made online per batch, or from a precomputed tensor set.

Four options beyond the paper, all off by default (``w_cls = 0``,
``clean_frac = 0``, ``AttackConfig.eps_min = None``,
``AttackConfig.target = "classifier"`` is the published recipe):

* ``w_cls``: classifier guidance, ``+ w_cls * KL(f(x) || f(clamp(P(x_adv))))``
  with the frozen classifier f (the high-level guided loss of HGD, Liao et
  al. 2018). It trains the purifier for that classifier; on the digits it
  is what brings the oblivious accuracy near clean (docs/results.md, recipes).
* ``clean_frac``: that fraction of each batch is purified from the clean
  image (x -> x pairs), so clean inputs stay as they were.
* ``AttackConfig.eps_min``: each batch's training eps is drawn from
  [eps_min, eps], so the purifier undoes perturbations of every size in it.
* ``AttackConfig.target = "defended"``: each batch's pairs are made by PGD on
  classifier(purifier(x)) with the purifier's current weights, as it runs at
  test time (AToP, Lin et al. 2024: adversarial training of the purifier
  against the attacker who sees it). The guidance term is then the
  classification loss on the purified output, so it needs ``w_cls > 0``.
  Pairs made against the classifier alone only teach the purifier to undo
  *those* perturbations; an attacker who differentiates through the purifier
  finds others (docs/results.md).

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


ATTACK_TARGETS = ("classifier", "defended")


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")


def _check_int(v, name: str, low: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ValueError(f"{name} must be an int >= {low}, got {v!r}")


@dataclass
class AttackConfig:
    """PGD used to make training pairs (default: L-inf 8/255, step 2/255, 10 steps, against the classifier).

    With ``eps_min`` each batch draws its eps uniformly from [eps_min, eps] (CPU generator)
    and scales the step size with it: a purifier trained at one eps only learns to undo
    perturbations of that size.

    ``target`` says what the PGD attacks:

    * ``"classifier"`` (the paper's setting): the frozen classifier alone.
    * ``"defended"``: classifier(purifier(x)) with the purifier's current weights, as it runs
      at test time (mask ratio ``purifier_mask_ratio``, 0 = one pass of MAEP; above 0 the mean
      of ``purifier_masks`` reconstructions under fresh random masks, as ``RandomizedMAEP``;
      output clamped to [0, 1]), with the gradient averaged over ``eot`` draws. This is
      adversarial training of the purifier against the attacker who sees it (AToP). A share
      ``classifier_frac`` of the batches still gets classifier-only pairs. ``purifier_noise`` > 0:
      the purifier the attack sees adds Gaussian noise of that std to its input first (as
      ``RandomizedMAEP(noise_std=...)`` at test time), a fresh draw per reconstruction.
    """

    norm: str = "linf"
    eps: float = 8 / 255
    step_size: float = 2 / 255
    steps: int = 10
    eps_min: float | None = None
    target: str = "classifier"
    classifier_frac: float = 0.0
    purifier_mask_ratio: float = 0.0
    purifier_masks: int = 1
    eot: int = 1
    purifier_noise: float = 0.0

    def __post_init__(self):
        if self.norm not in ("linf", "l2"):
            raise ValueError(f"norm must be 'linf' or 'l2', got {self.norm!r}")
        for name in ("eps", "step_size"):
            v = getattr(self, name)
            if not (_is_number(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        _check_int(self.steps, "steps", 0)
        if self.eps_min is not None and not (_is_number(self.eps_min) and 0 <= self.eps_min <= self.eps):
            raise ValueError(f"eps_min must be in [0, eps={self.eps:g}], got {self.eps_min!r}")
        if self.target not in ATTACK_TARGETS:
            raise ValueError(f"target must be one of {ATTACK_TARGETS}, got {self.target!r}")
        if not (_is_number(self.classifier_frac) and 0 <= self.classifier_frac <= 1):
            raise ValueError(f"classifier_frac must be in [0, 1], got {self.classifier_frac!r}")
        if not (_is_number(self.purifier_mask_ratio) and 0 <= self.purifier_mask_ratio < 1):
            raise ValueError(f"purifier_mask_ratio must be in [0, 1), got {self.purifier_mask_ratio!r}")
        _check_int(self.purifier_masks, "purifier_masks", 1)
        _check_int(self.eot, "eot", 1)
        if not (_is_number(self.purifier_noise) and self.purifier_noise >= 0):
            raise ValueError(f"purifier_noise must be a finite number >= 0, got {self.purifier_noise!r}")

    def draw(self) -> tuple[float, float]:
        """(eps, step_size) for one batch."""
        if self.eps_min is None or self.eps_min == self.eps:
            return self.eps, self.step_size
        eps = self.eps_min + (self.eps - self.eps_min) * torch.rand(()).item()
        return eps, self.step_size * eps / self.eps

    def run_config(self) -> dict:
        """The fields that define the pairs; options left at their defaults are omitted, so
        snapshots written before an option existed still resume."""
        defaults = AttackConfig.__dataclass_fields__
        keep = ("norm", "eps", "step_size", "steps")
        return {k: v for k, v in asdict(self).items() if k in keep or v != defaults[k].default}


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
    input_noise: float = 0.0  # std of Gaussian noise added to every training input (a noisy purifier's training)

    def __post_init__(self):
        if not (_is_number(self.mask_ratio) and 0 <= self.mask_ratio < 1):
            raise ValueError(f"mask_ratio must be in [0, 1), got {self.mask_ratio!r}")
        for name in ("w_pur", "w_mae", "w_cls", "lora_alpha", "input_noise"):
            v = getattr(self, name)
            if not (_is_number(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if not (_is_number(self.clean_frac) and 0 <= self.clean_frac < 1):
            raise ValueError(f"clean_frac must be in [0, 1), got {self.clean_frac!r}")
        _check_int(self.lora_rank, "lora_rank", 1)
        if not isinstance(self.fused, bool):
            raise ValueError(f"fused must be a bool, got {self.fused!r}")
        for name, cls in (("attack", AttackConfig), ("stage1", LoopConfig), ("stage2", LoopConfig)):
            if not isinstance(getattr(self, name), cls):
                raise ValueError(f"{name} must be a {cls.__name__}, got {type(getattr(self, name)).__name__}")
        if self.attack.target == "defended" and self.w_cls == 0:
            raise ValueError("attack.target='defended' trains against the attacker who sees the purifier: it needs "
                             "the classification loss on the purified output, w_cls > 0")

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
                     backend: str = "auto", purifier: MaskedAutoencoderViT | None = None) -> torch.Tensor:
    """PGD examples [N, C, H, W] against the frozen ``classifier`` (fp32, outside any autocast), or,
    with ``attack.target == "defended"`` and a ``purifier``, against classifier(purifier(x))."""
    eps, step_size = attack.draw()
    through = attack.target == "defended" and purifier is not None
    if through and attack.classifier_frac > 0:
        through = torch.rand(()).item() >= attack.classifier_frac
    model = defended_model(purifier, classifier, attack) if through else classifier
    with torch.autocast(x.device.type, enabled=False):
        return pgd_attack(model, x, y, eps=eps, step_size=step_size, steps=attack.steps, norm=attack.norm,
                          eot=attack.eot if through else 1, backend=backend)


def defended_model(purifier: MaskedAutoencoderViT, classifier: nn.Module, attack: AttackConfig):
    """x [N, C, H, W] -> logits of classifier(clamp(P(x))), P as it runs at test time: one pass at mask
    ratio 0, or the mean of ``attack.purifier_masks`` reconstructions under fresh random masks and/or
    fresh input noise (``attack.purifier_noise``)."""
    r, sigma = attack.purifier_mask_ratio, attack.purifier_noise
    k = attack.purifier_masks if (r > 0 or sigma > 0) else 1

    def logits(x: torch.Tensor) -> torch.Tensor:
        outs = [purifier.reconstruct(x + sigma * torch.randn_like(x) if sigma > 0 else x, mask_ratio=r)
                for _ in range(k)]
        purified = outs[0] if k == 1 else torch.stack(outs).mean(0)
        return classifier(purified.float().clamp(0.0, 1.0))

    return logits


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
            x_adv = make_adversarial(classifier, x, y, cfg.attack, backend=cfg.backend, purifier=model)
        if cfg.clean_frac > 0:
            x_adv = _with_clean_inputs(x_adv, x, cfg.clean_frac)
        if cfg.input_noise > 0:
            x_adv = x_adv + cfg.input_noise * torch.randn_like(x_adv)
        return maep_loss(model, x_adv, x, mask_ratio, cfg.w_pur, cfg.w_mae, classifier, cfg.w_cls)

    return step


def _run_config(stage: str, cfg: MAEPConfig, model: MaskedAutoencoderViT, loop: LoopConfig) -> dict:
    # the options beyond the paper enter only when used, so snapshots of plain runs still resume
    run = {"stage": stage, "model": model.config, "mask_ratio": cfg.mask_ratio, "w_pur": cfg.w_pur,
           "w_mae": cfg.w_mae, "attack": cfg.attack.run_config(), "lr": loop.lr, "batch_size": loop.batch_size,
           "lora_rank": cfg.lora_rank}
    run.update({k: getattr(cfg, k) for k in ("w_cls", "clean_frac", "input_noise") if getattr(cfg, k)})
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
