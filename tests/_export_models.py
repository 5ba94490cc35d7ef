"""A small model for the export tests: a patchify stem, a tied residual group and a pinned group
(importable as ``_export_models:export_net``)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn


class ExportNet(nn.Module):
    """Patchify stem (kernel == stride 2, no padding), a residual block downsampling on both
    branches (their sites tie), then a pool whose output is flattened at a fixed 4x4 (pinned).
    Wide enough for the convolutions to dominate the FLOPs, as in real models."""

    def __init__(self, width: int = 32, num_classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 2, stride=2)
        self.conv = nn.Conv2d(width, width, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.shortcut = nn.Conv2d(width, width, 1, stride=2)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(width * 4 * 4, num_classes)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(self.conv2(F.relu(self.conv(x)))) + self.shortcut(x)
        x = self.pool(x)
        return self.fc(x.reshape(x.shape[0], -1))


def export_net() -> nn.Module:
    return ExportNet()
