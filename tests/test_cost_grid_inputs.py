"""A block kept whole (it branches on sizes) that takes, besides its tokens, a tensor made from
their grid's sizes and reads the grid stored on it (the Swin detection code's blocks and their
shifted-window mask): the cost model probes it with that tensor remade at each grid
(``cost_grid_inputs.py``), so the budget holds; it was refused ("predicts ... where fvcore counts")."""
from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F
from torch import nn

from budget_models import randomise_strides
from dynopool_convert import convert
from dynopool_convert.budget import fit_to_budget
from dynopool_convert.cost_model import CostModel
from dynopool_convert.flops import count_flops

WS = 4


class WindowBlock(nn.Module):
    """Attention within windows of its grid, padded to whole windows, plus the mask."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.H = self.W = None
        self.qkv = nn.Linear(dim, 3 * dim)

    def forward(self, x, mask):
        b, _, c = x.shape
        x = x.view(b, self.H, self.W, c)
        pad_b, pad_r = (WS - self.H % WS) % WS, (WS - self.W % WS) % WS
        if pad_b or pad_r:
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        hp, wp = x.shape[1:3]
        win = x.view(b, hp // WS, WS, wp // WS, WS, c).transpose(2, 3).reshape(-1, WS * WS, c)
        q, k, v = self.qkv(win).chunk(3, -1)
        attn = (q @ k.transpose(-2, -1)).view(b, -1, WS * WS, WS * WS) + mask
        win = (attn.softmax(-1).view(-1, WS * WS, WS * WS) @ v).view(b, hp // WS, wp // WS, WS, WS, c)
        x = win.transpose(2, 3).reshape(b, hp, wp, c)[:, : self.H, : self.W]
        return x.reshape(b, -1, c)


class MaskedWindows(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 2, stride=2)
        self.block = WindowBlock(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.embed(x)
        H, W = x.size(2), x.size(3)
        hp, wp = int(math.ceil(H / WS)) * WS, int(math.ceil(W / WS)) * WS
        img = torch.zeros((1, hp, wp, 1), device=x.device)
        img[:, -2:, :, :] = 1.0  # the last rows apart, as a shifted window's mask sets them
        windows = img.view(1, hp // WS, WS, wp // WS, WS, 1).transpose(2, 3).reshape(-1, WS * WS)
        mask = (windows.unsqueeze(1) - windows.unsqueeze(2)).masked_fill(windows.unsqueeze(1) != windows.unsqueeze(2), -100.0)
        self.block.H, self.block.W = H, W
        return self.head(self.block(x.flatten(2).transpose(1, 2), mask).mean(1))


def test_a_block_taking_a_mask_made_from_its_grid_is_probed_and_the_budget_holds():
    torch.manual_seed(0)
    model = MaskedWindows().eval()
    size = (3, 28, 24)
    r = convert(model, size)
    assert any("traced WindowBlock as a leaf" in n for n in r.plan.notes)
    cost, rng = CostModel(r.model, size), random.Random(0)
    seen = set()
    for _ in range(4):
        randomise_strides(r.model, rng, lo=0.6, hi=1.7)
        expected = count_flops(r.model, size)
        assert cost.flops() == expected
        seen.add(expected)
    assert len(seen) > 2
    budget = int(0.6 * count_flops(model, size))
    fit = fit_to_budget(r.model, budget, size, CostModel(r.model, size))
    assert fit.final_flops <= budget and fit.final_flops == count_flops(r.model, size)
