"""Strided unfolds as sites (``sites_unfold.py``): T2T-ViT's soft split (overlapping patches as
tokens, ``nn.Unfold(7, stride=4, padding=2)`` and ``F.unfold``) learns its token grid behind a
DynOPool in front, under every placement; the cost model follows the flattened grid. Until
then no unfold was a site, nor listed."""
from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dynopool_convert import convert, scale_parameters
from dynopool_convert.budget import fit_to_budget
from dynopool_convert.cost_model import CostModel
from dynopool_convert.flops import count_flops


class TokenBlock(nn.Module):
    def __init__(self, dim: int, out: int) -> None:
        super().__init__()
        self.qkv, self.proj = nn.Linear(dim, 3 * out), nn.Linear(out, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, -1)
        return self.proj((q @ k.transpose(-2, -1)).softmax(-1) @ v)


class T2T(nn.Module):
    """Soft split, attention over its tokens, the tokens back into a square map
    (``int(math.sqrt(n))``), a second soft split by ``F.unfold``."""

    def __init__(self) -> None:
        super().__init__()
        self.split0 = nn.Unfold(7, stride=4, padding=2)
        self.t1 = TokenBlock(3 * 49, 8)
        self.head = nn.Linear(8 * 9, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.t1(self.split0(x).transpose(1, 2))
        b, n, c = x.shape
        x = x.transpose(1, 2).reshape(b, c, int(math.sqrt(n)), int(math.sqrt(n)))
        return self.head(F.unfold(x, 3, stride=2, padding=1).transpose(1, 2).mean(1))


def _set_strides(model: nn.Module, values: list[tuple[float, float]]) -> None:
    with torch.no_grad():
        for p, v in zip(scale_parameters(model), values):
            p.copy_(torch.tensor(v))


@pytest.mark.parametrize("placement", ["before", "exact"])
def test_soft_splits_learn_their_token_grids_and_the_budget_holds(placement):
    torch.manual_seed(0)
    original = T2T().eval()
    r = convert(original, (3, 32, 32), placement=placement)
    sites = [r.plan.site("split0"), r.plan.site("unfold")]
    assert [s.status for s in sites] == ["converted", "converted"]
    assert sites[0].op == "Unfold(k=7, s=4, p=2)"
    assert r.plan.groups[sites[0].group].square  # its tokens come back as a square map
    x = torch.randn(2, 3, 32, 32)
    if placement == "exact":
        assert torch.equal(r.model.eval()(x), original(x))
    init = [tuple(p.tolist()) for p in scale_parameters(r.model)]
    cost, rng, seen = CostModel(r.model, (3, 32, 32)), random.Random(0), set()
    for _ in range(3):
        factors = [rng.uniform(0.6, 1.5) for _ in init]
        _set_strides(r.model, [(h * f, w * f) for (h, w), f in zip(init, factors)])
        assert r.model(x).shape == (2, 5)
        seen.add(count_flops(r.model, (3, 32, 32)))
        assert cost.flops() == count_flops(r.model, (3, 32, 32))
    assert len(seen) > 1
    _set_strides(r.model, init)
    budget = int(0.6 * count_flops(r.model, (3, 32, 32)))
    fit = fit_to_budget(r.model, budget, (3, 32, 32), CostModel(r.model, (3, 32, 32)))
    assert fit.final_flops <= budget and fit.final_flops == count_flops(r.model, (3, 32, 32))


class StrideOne(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.unfold = nn.Unfold(3, padding=1)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.unfold(self.pool(x)).mean(-1)


def test_an_unfold_at_stride_one_is_listed_not_converted():
    r = convert(StrideOne(), (3, 16, 16))
    assert r.plan.site("pool").status == "converted"
    assert r.plan.site("unfold").status == "skipped" and "stride 1" in r.plan.site("unfold").reason
