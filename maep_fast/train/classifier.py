"""Standard (non-adversarial) classifier training and accuracy."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from maep_fast.train.loop import LoopConfig, fit


def train_classifier(model: nn.Module, dataset, cfg: LoopConfig | None = None) -> list[dict]:
    """Cross-entropy training of ``model`` on ``dataset``; returns per-epoch metrics."""
    cfg = cfg or LoopConfig(desc="classifier")

    def step(x: torch.Tensor, y: torch.Tensor):
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        return loss, {"loss": loss.detach(), "acc": (logits.argmax(1) == y).float().mean()}

    params = [p for p in model.parameters() if p.requires_grad]
    return fit(model, params, dataset, step, cfg, run_config={"stage": "classifier", "lr": cfg.lr, "batch_size": cfg.batch_size})


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``model`` on images [N, C, H, W] with labels [N]."""
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for k in range(0, images.shape[0], batch_size):
        x = images[k:k + batch_size].to(device)
        correct += int((model(x).argmax(1).cpu() == labels[k:k + batch_size]).sum())
    return correct / max(1, images.shape[0])
