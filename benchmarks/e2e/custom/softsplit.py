"""T2T-ViT's tokens-to-token module as its paper describes it, small: soft splits (overlapping
patches as tokens: ``nn.Unfold(7, stride=4, padding=2)``, then ``F.unfold(x, 3, stride=2,
padding=1)``), attention over each split's tokens, and the tokens put back into a square map
(``int(math.sqrt(n))``). Written for these benchmarks; 10 classes."""
from __future__ import annotations

import math

import torch.nn.functional as F
from torch import nn


class TokenBlock(nn.Module):
    def __init__(self, dim: int, out: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * out), nn.Linear(out, out)

    def forward(self, x):
        q, k, v = self.qkv(self.norm(x)).chunk(3, -1)
        return self.proj((q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(-1) @ v)


class T2T(nn.Module):
    def __init__(self, num_classes: int = 10, in_chans: int = 3, dim: int = 64) -> None:
        super().__init__()
        self.split0 = nn.Unfold(7, stride=4, padding=2)
        self.t1 = TokenBlock(in_chans * 49, 32)
        self.t2 = TokenBlock(32 * 9, 32)
        self.proj = nn.Linear(32 * 9, dim)
        self.head = nn.Linear(dim, num_classes)

    @staticmethod
    def _as_map(x):
        b, n, c = x.shape
        return x.transpose(1, 2).reshape(b, c, int(math.sqrt(n)), int(math.sqrt(n)))

    def forward(self, x):
        x = self._as_map(self.t1(self.split0(x).transpose(1, 2)))
        x = self._as_map(self.t2(F.unfold(x, 3, stride=2, padding=1).transpose(1, 2)))
        x = self.proj(F.unfold(x, 3, stride=2, padding=1).transpose(1, 2))
        return self.head(x.mean(1))
