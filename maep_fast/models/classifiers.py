"""Classifiers the purifiers defend. Inputs are images in [0, 1] [N, C, H, W];
normalization (mean/std) happens inside the model so attacks work in pixel space.
Outputs are logits [N, num_classes]. ``self.config`` rebuilds the model.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class _Normalize(nn.Module):
    def __init__(self, mean: list[float], std: list[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class SmallCNN(nn.Module):
    """Two conv stages + MLP head; the demo classifier (any square input >= 8)."""

    def __init__(self, in_chans: int = 1, num_classes: int = 10, width: int = 32, mean: float = 0.5, std: float = 0.5):
        super().__init__()
        self.config = dict(in_chans=in_chans, num_classes=num_classes, width=width, mean=mean, std=std)
        self.normalize = _Normalize([mean] * in_chans, [std] * in_chans)
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, width, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8 * width, 128), nn.ReLU(inplace=True), nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(self.normalize(x)))


class _WideBasic(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.shortcut = None if (cin == cout and stride == 1) else nn.Conv2d(cin, cout, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn1(x))
        y = self.conv1(o)
        y = self.conv2(F.relu(self.bn2(y)))
        return y + (x if self.shortcut is None else self.shortcut(o))


class WideResNet(nn.Module):
    """WideResNet-depth-widen (Zagoruyko & Komodakis); WRN-28-10 is the papers' CIFAR classifier."""

    def __init__(self, depth: int = 28, widen: int = 10, in_chans: int = 3, num_classes: int = 10,
                 mean: tuple[float, ...] = (0.4914, 0.4822, 0.4465), std: tuple[float, ...] = (0.2471, 0.2435, 0.2616)):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n + 4, got {depth}")
        if len(mean) != in_chans or len(std) != in_chans:
            raise ValueError(f"mean/std must have {in_chans} entries")
        self.config = dict(depth=depth, widen=widen, in_chans=in_chans, num_classes=num_classes, mean=list(mean), std=list(std))
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.normalize = _Normalize(list(mean), list(std))
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, padding=1, bias=False)
        layers, cin = [], widths[0]
        for i, (w, s) in enumerate(zip(widths[1:], (1, 2, 2))):
            for j in range(n):
                layers.append(_WideBasic(cin, w, s if j == 0 else 1))
                cin = w
        self.blocks = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.conv1(self.normalize(x)))
        x = F.relu(self.bn(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


CLASSIFIERS = {"SmallCNN": SmallCNN, "WideResNet": WideResNet}


def _register_vit_classifier() -> None:
    # imported here (not at the top) so vit_classifier never sees a half-built maep_fast.models
    from maep_fast.models.vit_classifier import ViTClassifier

    CLASSIFIERS["ViTClassifier"] = ViTClassifier


_register_vit_classifier()
