"""RMAE-Pure: adversarial finetuning of MAE-Pure's MAE through the purifier (two stages, following AToP).

MAE-Pure (``maep_fast.purify.mae_pure.MAEPure``) purifies at test time by S
steps of

    x_{s+1} = clip(x_s - lambda_s * sign(g_s)),   g_s = grad_x L_rec(x_s; theta)

(clipped to the eta-ball around the input and to [0, 1]). The MAE-Pure paper's
robust variant, RMAE-Pure, finetunes the MAE weights theta with a
classification loss, in the two-stage recipe of AToP (Lin et al. 2024):

* **Stage I** (adversarial examples against the whole system): PGD with the
  exact gradient through MAE-Pure(theta) followed by the frozen classifier,
  at the *training* purification schedule (``train_steps`` S_train, small),
  with fresh random masks per forward pass (``eot`` samples per PGD step).
  ``MAEPure.forward`` on an input that requires grad is that gradient (the
  sign direction is a constant of the outer graph, see its docstring). The
  pairs (x, x_adv, y) are made for the whole training set, in batches, with
  the weights at the start of every ``regenerate_every``-th epoch.
* **Stage II** (finetune theta): per batch,

      loss = w_cls * CE(f(P_theta(x_adv)), y) + w_rec * L_MAE(x; theta)

  with f the frozen classifier, P_theta the training-schedule purification
  below, and L_MAE the plain masked-reconstruction loss of the MAE on the
  clean batch at ``rec_mask_ratio`` (MAE's 0.75 by default), which keeps the
  MAE a masked autoencoder (its reconstruction loss is what MAE-Pure descends).
  A share ``clean_frac`` of each batch is purified from the clean image.

**Why a surrogate.** P_theta(x) depends on theta only through
sign(grad_x L_rec(x; theta)), and d sign(g) / dg = 0 almost everywhere, so the
exact gradient of the classification loss with respect to theta is zero: the
plain loss cannot train the MAE (``tests/test_rmae_pure.py`` checks this).
Stage II therefore differentiates the purification with a straight-through
sign:

* the first S_train - K steps run exactly as ``MAEPure`` runs them, without a
  graph (their dependence on theta is truncated);
* the last K = ``unroll`` steps compute g = grad_x L_rec(x; theta) with
  ``create_graph=True`` (pure-PyTorch loss, explicit softmax attention: both
  support double backward) and step with

      d = sign(g) + (s(g) - stop_grad(s(g))),   s(g) = tanh(g / (tau * mean|g|))

  where mean|g| is the per-sample mean absolute gradient, detached, and tau
  is ``surrogate_temperature``. The *forward value* of d is exactly sign(g),
  so the purified output is bit-for-bit MAE-Pure's for the same masks; the
  *backward* uses ds/dg = sech^2(g / (tau mean|g|)) / (tau mean|g|), a smooth
  stand-in for the sign's derivative, through the mixed second derivative
  d g / d theta (double backward through the MAE) and through x_s.

  Small tau makes the surrogate closer to the sign (sharper, larger and
  noisier gradients near g = 0); large tau spreads it. The last K steps
  carry the gradient; K steps of double backward cost roughly 3 K forward-
  backward passes of the MAE per batch.

Defaults: stage-I PGD L-inf eps 8/255, step 2/255, 10 steps, EOT 1; training
purification S_train = 10 steps of MAE-Pure's published lambda 1/255 (halved
after S_train / 2), eta 8/255, mask ratio 0.25, 1 mask; K = 2, tau = 1;
w_cls = w_rec = 1; pairs regenerated every epoch; AdamW lr 1e-4, 5 epochs.
At test time run ``MAEPure`` with the finetuned MAE at its own (longer)
schedule. Nothing here is a published hyperparameter of RMAE-Pure except the
structure of the recipe.

Runs on ``maep_fast.train.loop.fit`` (AdamW, warmup + cosine, tqdm, seeded):
two runs with the same ``loop.seed`` end with identical weights. Stage I
draws its randomness (PGD start, masks) from a private stream seeded by
``loop.seed`` and the regeneration index, outside the training stream.
Resumable (``loop.state_dir`` / ``loop.resume``): the current pairs are saved
next to the snapshots (``rmae_pairs.safetensors``), so a run resumed inside a
regeneration period trains on the pairs the uninterrupted run had. Stage II
runs in full precision (autocast off: double backward). Single process: under
torchrun every rank would make the whole stage I itself.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from maep_fast._checks import check_bool, check_int, check_real
from maep_fast.attacks.pgd import pgd_attack
from maep_fast.models.mae import MaskedAutoencoderViT
from maep_fast.ops.pgd_step import pgd_step_
from maep_fast.purify.mae_pure import MAEPure
from maep_fast.train.loop import LoopConfig, fit

NORMS = ("linf", "l2")
PAIRS_FILE = "rmae_pairs.safetensors"


@dataclass
class RMAEPureConfig:
    """RMAE-Pure recipe (see the module docstring). Every field is checked on construction and
    again by ``train_rmae_pure``; a bad value raises ValueError naming the field."""

    # stage I: PGD through MAE-Pure(theta) + classifier
    norm: str = "linf"
    eps: float = 8 / 255
    attack_step_size: float = 2 / 255
    attack_steps: int = 10
    eot: int = 1
    # the purification schedule used in training (MAEPure's defaults, S_train small)
    train_steps: int = 10
    step_size: float = 1 / 255
    halve_step: bool = True
    eta: float = 8 / 255
    mask_ratio: float = 0.25
    n_masks: int = 1
    mask_seed: int | None = None  # None: fresh masks per call (MAE-Pure at test time); int: MAEPure(seed=...)
    # stage II: straight-through sign on the last `unroll` steps
    unroll: int = 2
    surrogate_temperature: float = 1.0
    w_cls: float = 1.0
    w_rec: float = 1.0
    rec_mask_ratio: float = 0.75  # MAE's pretraining mask ratio, for the plain reconstruction term
    clean_frac: float = 0.0
    regenerate_every: int = 1
    fused: bool = True  # False: pure-PyTorch ops also in the no-graph steps and the attack
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(epochs=5, lr=1e-4, warmup_epochs=0.5,
                                                                desc="RMAE-Pure"))

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        for name in ("eps", "attack_step_size", "step_size", "eta", "w_cls", "w_rec"):
            check_real(getattr(self, name), name, low=0)
        check_int(self.attack_steps, "attack_steps", low=0)
        check_int(self.eot, "eot", low=1)
        check_int(self.train_steps, "train_steps", low=1)
        check_bool(self.halve_step, "halve_step")
        for name in ("mask_ratio", "rec_mask_ratio"):
            check_real(getattr(self, name), name, low=0, high=1, low_open=True, high_open=True)
        check_int(self.n_masks, "n_masks", low=1)
        if self.mask_seed is not None:
            check_int(self.mask_seed, "mask_seed", low=0)
        check_int(self.unroll, "unroll", low=1)
        if self.unroll > self.train_steps:
            raise ValueError(f"unroll must be <= train_steps ({self.train_steps}): it counts the final "
                             f"purification steps differentiated w.r.t. the MAE, got {self.unroll!r}")
        check_real(self.surrogate_temperature, "surrogate_temperature", low=0, low_open=True)
        if self.w_cls == 0 and self.w_rec == 0:
            raise ValueError("w_cls and w_rec are both 0: nothing to train (w_cls > 0 is the point of RMAE-Pure)")
        check_real(self.clean_frac, "clean_frac", low=0, high=1, high_open=True)
        check_int(self.regenerate_every, "regenerate_every", low=1)
        check_bool(self.fused, "fused")
        if not isinstance(self.loop, LoopConfig):
            raise ValueError(f"loop must be a LoopConfig, got {type(self.loop).__name__}")
        self.loop.validate()

    @property
    def backend(self) -> str:
        return "auto" if self.fused else "torch"

    def run_config(self) -> dict:
        """The settings a resumed run must share with the snapshot (all but the loop's bookkeeping)."""
        run = {k: v for k, v in asdict(self).items() if k != "loop"}
        run.update(lr=self.loop.lr, batch_size=self.loop.batch_size, weight_decay=self.loop.weight_decay,
                   warmup_epochs=self.loop.warmup_epochs, grad_clip=self.loop.grad_clip, seed=self.loop.seed)
        return run


def training_purifier(model: MaskedAutoencoderViT, cfg: RMAEPureConfig) -> MAEPure:
    """MAE-Pure at the training schedule: fp32 (the graph reaches the MAE's own weights), fresh masks
    per call unless ``cfg.mask_seed`` fixes them."""
    return MAEPure(model, steps=cfg.train_steps, step_size=cfg.step_size, halve_step=cfg.halve_step, eta=cfg.eta,
                   mask_ratio=cfg.mask_ratio, n_masks=cfg.n_masks, seed=cfg.mask_seed, backend=cfg.backend,
                   precision="fp32", cast_weights=False)


def straight_through_purify(pur: MAEPure, x: torch.Tensor, unroll: int = 2,
                            temperature: float = 1.0) -> torch.Tensor:
    """MAE-Pure's output for ``x`` [N, C, H, W] whose last ``unroll`` steps are differentiable in
    the MAE's weights (and in the iterate) through a straight-through sign.

    Forward value: ``pur.purify(x)`` for the same masks (the same seed, or the same global RNG
    state with ``seed=None``): the first ``pur.steps - unroll`` steps are MAE-Pure's no-graph
    steps, the last ones take sign(g) as well. The MAE runs in its own weights' dtype, autocast
    off (as ``pur`` does at precision "fp32" for an fp32 MAE). Bit-identical on the CPU (tested);
    where the fused attention of ``purify`` rounds differently from the explicit one used here
    (CUDA kernels), a gradient component within rounding of zero may take the other sign.

    Backward: the sign's derivative is replaced by that of tanh(g / (temperature * mean|g|))
    (per-sample mean, detached), and g = grad_x L_rec is built with ``create_graph=True``
    (pure-PyTorch loss, explicit softmax attention while the graph is built). No gradient flows
    into ``x`` itself (a constant input).
    """
    if not isinstance(pur, MAEPure):
        raise ValueError(f"pur must be a MAEPure, got {type(pur).__name__}")
    check_int(unroll, "unroll", low=0)
    if unroll > pur.steps:
        raise ValueError(f"unroll must be <= the purifier's steps ({pur.steps}), got {unroll}")
    check_real(temperature, "temperature", low=0, low_open=True)
    if pur.early_stop is not None:
        raise ValueError("straight_through_purify runs every step: use a MAEPure with early_stop=None")
    pur._check(x)
    model = pur.model
    amp = next(model.parameters()).dtype  # the MAE's own weights, autocast off: the graph must reach them
    gen = pur._generator(x.device)
    x0 = x.detach().float().clone() if x.dtype != torch.float64 else x.detach().clone()
    xs = x0.clone()
    first = pur.steps - unroll
    for s in range(first):  # MAEPure._purify_chunk's steps, without early stop
        with torch.enable_grad():
            xg = xs.detach().requires_grad_(True)
            loss = pur.recon_loss(xg, gen, amp_dtype=amp, model=model)
            grad = torch.autograd.grad(loss.sum(), xg)[0]
        with torch.no_grad():
            pgd_step_(xs, grad, x0, pur.step_size_at(s), pur.eta, norm="linf", direction=-1, clamp=(0.0, 1.0),
                      backend=pur.backend)
    if unroll == 0:
        return xs.to(x.dtype)
    blocks = list(model.blocks) + list(model.decoder_blocks)
    old = [b.attn.fused_attn for b in blocks]
    model.set_fused_attn(False)  # fused attention need not support double backward
    try:
        with torch.enable_grad(), torch.autocast(x.device.type, enabled=False):
            xs = xs.detach().requires_grad_(True)
            eta = torch.full((), pur.eta, dtype=xs.dtype, device=xs.device)
            lo, hi = x0 - eta, x0 + eta
            for s in range(first, pur.steps):
                loss = pur.recon_loss(xs, gen, loss_backend="torch", amp_dtype=amp, model=model)
                g = torch.autograd.grad(loss.sum(), xs, create_graph=True)[0]
                d = _straight_through_sign(g, temperature)
                # pgd_step_reference's linf step with direction -1, written out so the surrogate's
                # derivative is kept (pgd_step takes the sign itself): same ops, same values
                xn = xs + (-1 * pur.step_size_at(s)) * d
                xs = torch.minimum(torch.maximum(xn, lo), hi).clamp(0.0, 1.0)
    finally:
        for b, f in zip(blocks, old):
            b.attn.fused_attn = f
    return xs.to(x.dtype)


def _straight_through_sign(g: torch.Tensor, temperature: float) -> torch.Tensor:
    """Forward: sign(g) exactly. Backward: d tanh(g / (temperature * mean|g|)) / dg (per sample,
    scale detached; a sample whose gradient is all zero gets no surrogate gradient)."""
    scale = g.detach().abs().flatten(1).mean(1).view(-1, *([1] * (g.dim() - 1)))
    live = scale > 0
    soft = torch.tanh(g / (temperature * torch.where(live, scale, torch.ones_like(scale)))) * live
    return torch.sign(g).detach() + (soft - soft.detach())


# ----------------------------------------------------------------- stage I
class _StageOnePairs:
    """The data set ``fit`` trains on: ``loader(seed=loop.seed + epoch)`` (how ``fit`` asks for an
    epoch) returns that epoch's batches (x, x_adv, y, stage-I correct), making the stage-I pairs
    first when the epoch starts a regeneration period."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, make_pairs, cfg: RMAEPureConfig,
                 resuming: bool):
        self.images, self.labels, self.make_pairs, self.cfg = images, labels, make_pairs, cfg
        self.block: int | None = None
        self.pairs: tuple[torch.Tensor, torch.Tensor] | None = None
        self.regenerated_at: list[int] = []
        self.path = Path(cfg.loop.state_dir) / PAIRS_FILE if cfg.loop.state_dir else None
        self.tag = json.dumps(cfg.run_config(), sort_keys=True, default=str)
        if self.path is not None and not resuming and self.path.exists():
            self.path.unlink()  # a fresh run never reads an older run's pairs

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def loader(self, batch_size: int, shuffle: bool, seed: int, drop_last: bool = False) -> "_EpochBatches":
        epoch = int(seed) - self.cfg.loop.seed
        if epoch < 0:
            raise ValueError(f"loader seed {seed} is below loop.seed {self.cfg.loop.seed}: not an epoch of fit")
        return _EpochBatches(self, epoch, batch_size, shuffle, seed, drop_last)

    def pairs_for(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        block = epoch // self.cfg.regenerate_every
        if self.block == block and self.pairs is not None:
            return self.pairs
        pairs = self._load(block)
        if pairs is None:
            pairs = self.make_pairs(block)
            self.regenerated_at.append(epoch + 1)
            self._save(block, pairs)
        self.block, self.pairs = block, pairs
        return pairs

    def _load(self, block: int):
        if self.path is None or not self.path.is_file():
            return None
        try:
            from safetensors import safe_open

            with safe_open(str(self.path), "pt") as f:
                meta = f.metadata() or {}
            if meta.get("block") != str(block) or meta.get("run") != self.tag:
                return None
            t = load_file(str(self.path))
        except (SafetensorError, OSError, ValueError):
            return None
        if t["adversarial"].shape != self.images.shape or t["correct"].shape != self.labels.shape:
            return None
        return t["adversarial"], t["correct"]

    def _save(self, block: int, pairs) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        save_file({"adversarial": pairs[0].contiguous(), "correct": pairs[1].contiguous()}, str(tmp),
                  metadata={"block": str(block), "run": self.tag})
        os.replace(tmp, self.path)


class _EpochBatches:
    """One epoch's batches in a seeded order (no global RNG draw); the pairs are made on ``iter``."""

    def __init__(self, owner: _StageOnePairs, epoch: int, batch_size: int, shuffle: bool, seed: int,
                 drop_last: bool):
        self.owner, self.epoch, self.batch_size = owner, epoch, batch_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last

    def __len__(self) -> int:
        n = len(self.owner)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self):
        adv, correct = self.owner.pairs_for(self.epoch)
        x, y = self.owner.images, self.owner.labels
        n = x.shape[0]
        order = (torch.randperm(n, generator=torch.Generator().manual_seed(int(self.seed))) if self.shuffle
                 else torch.arange(n))
        batches = [order[k:k + self.batch_size] for k in range(0, len(self) * self.batch_size, self.batch_size)]
        return iter([(x[i], adv[i], y[i], correct[i]) for i in batches])


def _stage_one(pur: MAEPure, classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor,
               cfg: RMAEPureConfig, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PGD pairs for the whole set against classifier(MAE-Pure(x)) with the current weights; returns
    (x_adv [N, C, H, W] on the CPU, correct [N] float: the system's prediction on x_adv, one more
    random-mask purification). Randomness: a private stream seeded by loop.seed and ``block``."""
    model = pur.model
    device = next(model.parameters()).device
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    system = nn.Sequential(pur, classifier)
    adv, correct = [], []
    bs = cfg.loop.batch_size
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(cfg.loop.seed * 1_000_003 + 7919 * (block + 1))
        try:
            model.eval()
            for p in model.parameters():  # only the input gradient is needed
                p.requires_grad_(False)
            bar = tqdm(range(0, images.shape[0], bs), desc=f"RMAE-Pure stage I ({block + 1})", leave=False,
                       disable=not cfg.loop.progress)
            with torch.autocast(device.type, enabled=False):
                for k in bar:
                    x = images[k:k + bs].to(device)
                    y = labels[k:k + bs].to(device)
                    xa = pgd_attack(system, x, y, eps=cfg.eps, step_size=cfg.attack_step_size, steps=cfg.attack_steps,
                                    norm=cfg.norm, eot=cfg.eot, backend=cfg.backend)
                    with torch.no_grad():
                        ok = (system(xa).argmax(1) == y).float()
                    adv.append(xa.cpu())
                    correct.append(ok.cpu())
                    bar.set_postfix(acc=f"{float(torch.cat(correct).mean()):.3f}")
        finally:
            for p, f in flags:
                p.requires_grad_(f)
            model.train(was_training)
    return torch.cat(adv), torch.cat(correct)


# ---------------------------------------------------------------- stage II
def rmae_pure_loss(pur: MAEPure, classifier: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor,
                   cfg: RMAEPureConfig) -> tuple[torch.Tensor, dict]:
    """w_cls * CE(classifier(straight-through MAE-Pure(x_adv)), y) + w_rec * masked MSE of the MAE on the
    clean x at ``rec_mask_ratio``; returns (loss, detached metrics). Full precision (autocast off)."""
    model = pur.model
    with torch.autocast(x.device.type, enabled=False):
        if cfg.clean_frac > 0:  # drawn from the CPU generator, which fit's snapshots restore
            pick = (torch.rand(x.shape[0]) < cfg.clean_frac).to(x.device).view(-1, 1, 1, 1)
            x_adv = torch.where(pick, x, x_adv)
        if cfg.w_cls > 0:
            x_pur = straight_through_purify(pur, x_adv, cfg.unroll, cfg.surrogate_temperature)
        else:  # nothing to differentiate: the plain purification, for the metrics
            x_pur = pur.purify(x_adv, validate=False)
        logits = classifier(x_pur.float())
        l_cls = F.cross_entropy(logits, y)
        l_rec = model(x, mask_ratio=cfg.rec_mask_ratio)[0] if cfg.w_rec > 0 else torch.zeros((), device=x.device)
        loss = cfg.w_cls * l_cls + cfg.w_rec * l_rec
    metrics = {"loss": loss.detach(), "ce_cls": l_cls.detach(), "mae_rec": l_rec.detach(),
               "purified_acc": (logits.detach().argmax(1) == y).float().mean()}
    return loss, metrics


# ------------------------------------------------------------------- entry
def _gather(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """All (images, labels) of ``dataset`` in order: its tensors, or one pass of its loader."""
    images, labels = getattr(dataset, "images", None), getattr(dataset, "labels", None)
    if isinstance(images, torch.Tensor) and isinstance(labels, torch.Tensor):
        return images, labels
    xs, ys = [], []
    for batch in dataset.loader(batch_size=256, shuffle=False, seed=0, drop_last=False):
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise ValueError("dataset's loader must yield (images, labels) batches")
        xs.append(batch[0])
        ys.append(batch[1])
    return torch.cat(xs), torch.cat(ys)


def _check_inputs(model, dataset, classifier, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(model, MaskedAutoencoderViT):
        raise ValueError(f"model must be a MaskedAutoencoderViT, got {type(model).__name__}")
    if classifier is None:
        raise ValueError("classifier is required: stage I attacks classifier(MAE-Pure(x)) and stage II "
                         "trains on its classification loss")
    if not isinstance(classifier, nn.Module):
        raise ValueError(f"classifier must be an nn.Module mapping images to logits, got {type(classifier).__name__}")
    if not isinstance(cfg, RMAEPureConfig):
        raise ValueError(f"cfg must be a RMAEPureConfig, got {type(cfg).__name__}")
    cfg.validate()
    if dataset is None or not hasattr(dataset, "loader") or not hasattr(dataset, "__len__"):
        raise ValueError("dataset must be an ImageDataset (or have loader() and __len__), "
                         f"got {type(dataset).__name__}")
    if len(dataset) == 0:
        raise ValueError("dataset is empty")
    images, labels = _gather(dataset)
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        raise ValueError("dataset images must be a floating-point tensor [N, C, H, W]")
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.is_floating_point() \
            or labels.shape[0] != images.shape[0]:
        raise ValueError(f"dataset labels must be an int tensor [N={images.shape[0]}]")
    model.check_input(images, "dataset images")
    if float(images.min()) < 0 or float(images.max()) > 1:
        raise ValueError("dataset images must lie in [0, 1]")
    device = next(model.parameters()).device
    try:
        cdev = next(classifier.parameters()).device
    except StopIteration:
        cdev = device
    if cdev != device:
        raise ValueError(f"classifier is on {cdev} but the MAE is on {device}")
    with torch.no_grad():
        logits = classifier(images[:2].to(device))
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != min(2, images.shape[0]):
        raise ValueError("classifier must map images [N, C, H, W] to logits [N, num_classes]")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= logits.shape[1]:
        raise ValueError(f"dataset labels must be class indices in [0, {logits.shape[1] - 1}] (the classifier "
                         f"outputs {logits.shape[1]} classes), got labels in [{lo}, {hi}]")
    return images.float().contiguous(), labels.long().contiguous()


def train_rmae_pure(model: MaskedAutoencoderViT, dataset, classifier: nn.Module,
                    cfg: RMAEPureConfig | None = None) -> dict:
    """Finetune ``model`` (the MAE MAE-Pure purifies with) into RMAE-Pure; see the module docstring.

    ``dataset``: an ImageDataset (or anything with ``loader(batch_size, shuffle, seed, drop_last)``
    yielding (images, labels) and ``__len__``); ``classifier``: the frozen classifier to defend
    (eval mode, gradients off during the call, restored afterwards). Returns
    ``{"history": [per-epoch means of loss, ce_cls, mae_rec, purified_acc, stage1_acc, epoch],
    "regenerated_at": [epochs whose start made stage-I pairs, 1-based], "seconds": wall time}``.
    ``stage1_acc`` is the accuracy of the system (MAE-Pure at the training schedule + classifier)
    on its own stage-I pairs, with the weights that made them; ``purified_acc`` the classifier's
    accuracy on the stage-II purified batch (weights before the update).
    """
    cfg = cfg if cfg is not None else RMAEPureConfig()
    images, labels = _check_inputs(model, dataset, classifier, cfg)
    loop = cfg.loop
    resuming = bool(loop.resume and loop.state_dir and (Path(loop.state_dir) / "state.json").is_file())
    pur = training_purifier(model, cfg)  # sets the MAE's ops backend
    clf_flags = [(p, p.requires_grad) for p in classifier.parameters()]
    clf_training = classifier.training
    classifier.eval()
    for p in classifier.parameters():
        p.requires_grad_(False)
    data = _StageOnePairs(images, labels, lambda block: _stage_one(pur, classifier, images, labels, cfg, block),
                          cfg, resuming)

    def step(x, x_adv, y, correct):
        loss, metrics = rmae_pure_loss(pur, classifier, x, x_adv, y, cfg)
        metrics["stage1_acc"] = correct.mean()
        return loss, metrics

    params = [p for p in model.parameters() if p.requires_grad]
    run = {"stage": "rmae_pure", "model": model.config, **cfg.run_config()}
    start = time.perf_counter()
    try:
        history = fit(model, params, data, step, loop, run)
    finally:
        for p, f in clf_flags:
            p.requires_grad_(f)
        classifier.train(clf_training)
    return {"history": history, "regenerated_at": data.regenerated_at, "seconds": time.perf_counter() - start}
