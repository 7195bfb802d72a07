"""One training loop for every stage: AdamW, warmup+cosine, tqdm, AMP on GPU,
resumable snapshots after each epoch, fixed seeds.

``dataset`` is anything with ``loader(batch_size, shuffle, seed, drop_last)``
yielding tuples of tensors; ``step_fn(*batch) -> (loss, {name: value})``
computes one batch's loss. The loop owns the optimizer, schedule, progress
and checkpoints.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from maep_fast.train.common import autocast_for, load_training_state, save_training_state, set_seed, warmup_cosine


@dataclass
class LoopConfig:
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    seed: int = 0
    amp: bool = True  # bf16 autocast, CUDA only
    grad_clip: float | None = 1.0
    state_dir: str | None = None  # resumable snapshots go here
    resume: bool = False
    progress: bool = True
    desc: str = "train"
    history: list = field(default_factory=list)


def fit(
    model: nn.Module,
    params: list[nn.Parameter],
    dataset,
    step_fn: Callable[..., tuple[torch.Tensor, dict]],
    cfg: LoopConfig,
    run_config: dict | None = None,
) -> list[dict]:
    """Train ``params`` of ``model`` on ``dataset``; returns per-epoch mean metrics."""
    if cfg.epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {cfg.epochs}")
    if not params:
        raise ValueError("no trainable parameters")
    set_seed(cfg.seed)
    device = next(model.parameters()).device
    drop_last = len(dataset) > cfg.batch_size

    def epoch_loader(epoch: int):  # a fresh, seeded shuffle per epoch, so a resumed run sees the same order
        return dataset.loader(batch_size=cfg.batch_size, shuffle=True, seed=cfg.seed + epoch, drop_last=drop_last)

    steps_per_epoch = max(1, len(epoch_loader(0)))
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    sched = warmup_cosine(opt, int(cfg.warmup_epochs * steps_per_epoch), cfg.epochs * steps_per_epoch)
    start_epoch, step = 0, 0
    run_config = dict(run_config or {})
    if cfg.resume and cfg.state_dir and (Path(cfg.state_dir) / "state.json").is_file():
        start_epoch, step = load_training_state(cfg.state_dir, model, opt, sched, run_config)
    history = []
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        sums: dict[str, float] = {}
        count = 0
        bar = tqdm(epoch_loader(epoch), desc=f"{cfg.desc} {epoch + 1}/{cfg.epochs}", leave=False, disable=not cfg.progress)
        for batch in bar:
            batch = [b.to(device, non_blocking=True) for b in batch]
            with autocast_for(device, cfg.amp):
                loss, metrics = step_fn(*batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{cfg.desc}: loss became {float(loss)} at epoch {epoch + 1}, step {step}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            sched.step()
            step += 1
            count += 1
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            bar.set_postfix({k: f"{v:.4f}" for k, v in metrics.items()})
        means = {k: v / max(count, 1) for k, v in sums.items()}
        means["epoch"] = epoch + 1
        history.append(means)
        if cfg.state_dir:
            save_training_state(cfg.state_dir, model, opt, sched, epoch + 1, step, run_config)
    model.eval()
    cfg.history.extend(history)
    return history
