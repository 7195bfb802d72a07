"""Standard (non-adversarial) classifier training and accuracy."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from maep_fast._checks import check_int, check_tensor
from maep_fast.train.loop import LoopConfig, fit


def train_classifier(model: nn.Module, dataset, cfg: LoopConfig | None = None) -> list[dict]:
    """Cross-entropy training of ``model`` on ``dataset``; returns per-epoch metrics."""
    cfg = cfg or LoopConfig(desc="classifier")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(cfg, LoopConfig):
        raise TypeError(f"cfg must be a LoopConfig, got {type(cfg).__name__}")

    def step(x: torch.Tensor, y: torch.Tensor):
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        return loss, {"loss": loss.detach(), "acc": (logits.argmax(1) == y).float().mean()}

    params = [p for p in model.parameters() if p.requires_grad]
    return fit(model, params, dataset, step, cfg, run_config={"stage": "classifier", "lr": cfg.lr, "batch_size": cfg.batch_size})


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``model`` on images [N, C, H, W] with labels [N]."""
    check_tensor(images, "images", ndim=4, nonempty=False)
    check_tensor(labels, "labels", ndim=1, dtypes=None, nonempty=False)
    if labels.shape[0] != images.shape[0]:
        raise ValueError(f"labels must have one entry per image ({images.shape[0]}), got {labels.shape[0]}")
    check_int(batch_size, "batch_size", low=1)
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for k in range(0, images.shape[0], batch_size):
        x = images[k:k + batch_size].to(device)
        correct += int((model(x).argmax(1).cpu() == labels[k:k + batch_size]).sum())
    return correct / max(1, images.shape[0])
