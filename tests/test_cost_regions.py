"""The cost model's fallback: a module it cannot follow node by node is probed whole."""
from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from budget_models import randomise_strides
from dynopool_convert import convert
from dynopool_convert.budget import fit_to_budget
from dynopool_convert.cost_model import CostModel
from dynopool_convert.errors import UnsupportedModelError
from dynopool_convert.flops import count_flops

SIZE = (3, 32, 32)


class RowRNN(nn.Module):
    """An LSTM along every row of a map (timm's Sequencer2d): its output is a tuple the cost
    model follows no rule for; N x C x H x W in and out."""

    def __init__(self, channels: int, pre: str = "") -> None:
        super().__init__()
        strided = {"conv": nn.Conv2d(channels, channels, 3, stride=2, padding=1), "pool": nn.MaxPool2d(2)}
        self.pre = strided.get(pre) or nn.Conv2d(channels, channels, 3, padding=1)
        self.rnn = nn.LSTM(channels, channels // 2, batch_first=True, bidirectional=True)
        self.fc = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        x = self.pre(x)
        n, c, h, w = x.shape
        rows, _ = self.rnn(x.permute(0, 2, 3, 1).reshape(n * h, w, c))
        return x + self.fc(rows.reshape(n, h, w, c).permute(0, 3, 1, 2))


class RNNNet(nn.Module):
    """Two row-LSTM blocks, the first one's output added to its input at the top level (so the
    list of blocks is not one module with one map in), a strided conv, another block."""

    def __init__(self, inner: str = "") -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.blocks = nn.ModuleList([RowRNN(8), RowRNN(8, inner)])
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.last = RowRNN(16)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        y = self.blocks[1](self.blocks[0](x) + x)
        return self.head(self.last(self.down(y)).mean((2, 3)))


@pytest.fixture(scope="module")
def converted() -> nn.Module:
    torch.manual_seed(0)
    return convert(RNNNet(), SIZE, validate=False).model


def test_modules_it_cannot_follow_are_probed_whole_and_it_stays_exact(converted):
    cost = CostModel(converted, SIZE)
    assert cost.regions == ["blocks.0", "blocks.1", "last"]  # the failing block, its sibling, then the other one
    assert len(cost._region_memos) == 2  # the two equal blocks share one probe's counts
    assert cost.unattributed == 0 and cost.flops() == cost.reference_flops
    rng = random.Random(3)
    for _ in range(3):
        randomise_strides(converted, rng, lo=0.7, hi=3.0)
        assert cost.flops() == count_flops(converted, SIZE)


def test_a_budget_holds_by_fvcore_on_such_a_model(converted):
    cost = CostModel(converted, SIZE)
    original = cost.flops()
    fit = fit_to_budget(converted, int(0.6 * original), SIZE, cost_model=cost)
    counted = count_flops(converted, SIZE)
    assert counted <= int(0.6 * original) and counted == fit.final_flops


def test_a_site_inside_a_module_is_never_probed_over():
    # the second block's strided conv is a site: its DynOPool (or, kept exact, its resize) runs
    # before the conv, as the block's input, outside the region: probed from there, exact
    for placement in ("before", "exact"):
        model = convert(RNNNet("conv"), SIZE, placement=placement, validate=False).model
        cost = CostModel(model, SIZE)
        assert cost.regions == ["blocks.0", "blocks.1", "last"]
        randomise_strides(model, random.Random(5), lo=0.7, hi=3.0)
        assert cost.flops() == count_flops(model, SIZE)
    # a max pool becomes a DynOPool in place, inside the block: a probe would keep its first
    # stride's counts, so that block is not cut out, and the model is refused in one line
    model = convert(RNNNet("pool"), SIZE, validate=False).model
    with pytest.raises(UnsupportedModelError, match="cannot follow the size of node 'blocks_1_rnn'"):
        CostModel(model, SIZE)


def test_the_outermost_module_that_can_be_cut_out_is_probed():
    # a stage of two blocks takes one map to one map: probed as one region (the more of the model a
    # probe runs as it is, the less is left to rules read off two shape passes)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.Sequential(RowRNN(8), RowRNN(8)),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    model = convert(net, SIZE, validate=False).model
    cost = CostModel(model, SIZE)
    assert cost.regions == ["1"]
    randomise_strides(model, random.Random(4), lo=0.7, hi=3.0)
    assert cost.flops() == count_flops(model, SIZE)
