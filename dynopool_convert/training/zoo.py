"""Small plain CNNs for the CPU demo and the tests (source ``dynopool_convert.training.zoo:small_cnn``)."""
from __future__ import annotations

from torch import nn

__all__ = ["small_cnn"]


def _block(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def small_cnn(num_classes: int = 10, in_chans: int = 1, width: int = 32, dropout: float = 0.1) -> nn.Sequential:
    """VGG-style CNN: two stages of two 3x3 convs, each closed by a stride-2 max pool, then a head.

    The two ``MaxPool2d(2)`` are what ``dynopool convert`` turns into learnable DynOPool layers.
    """
    w = width
    return nn.Sequential(
        *_block(in_chans, w), *_block(w, w), nn.MaxPool2d(2),
        *_block(w, 2 * w), *_block(2 * w, 2 * w), nn.MaxPool2d(2),
        *_block(2 * w, 4 * w),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(4 * w, num_classes),
    )
