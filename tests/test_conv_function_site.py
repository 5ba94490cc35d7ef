"""Strided functional convolutions (``F.conv2d``/``torch.conv2d`` with a parameter) are sites."""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from budget_models import randomise_strides
from dynopool_convert import DynOPool, DynResize, convert
from dynopool_convert.cost_model import CostModel
from dynopool_convert.flops import count_flops

SIZE = (3, 32, 32)


class FunctionalNet(nn.Module):
    """A strided 3x3 F.conv2d, then a patchify torch.conv2d (kernel == stride, no padding)."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(8, 3, 3, 3) * 0.2)
        self.b1 = nn.Parameter(torch.randn(8) * 0.1)
        self.w2 = nn.Parameter(torch.randn(8, 8, 2, 2) * 0.2)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        y = F.relu(F.conv2d(x, self.w1, self.b1, stride=2, padding=1))
        y = F.relu(torch.conv2d(y, self.w2, None, 2, 0))
        return self.head(y.mean((2, 3)))


def test_exact_placement_computes_what_the_model_did():
    torch.manual_seed(0)
    model = FunctionalNet().eval()
    result = convert(model, SIZE, placement="exact")
    sites = {s.name: s for s in result.plan.sites}
    assert [s.status for s in sites.values()] == ["converted", "converted"]
    assert sum(isinstance(m, DynResize) for m in result.model.modules()) == 2
    x = torch.randn(2, *SIZE)
    assert torch.equal(result.model.eval()(x), model(x))


@pytest.mark.parametrize("placement", ["before", "after"])
def test_strided_call_runs_at_stride_one_next_to_its_dynopool(placement):
    torch.manual_seed(0)
    model = FunctionalNet()
    result = convert(model, SIZE, placement=placement)
    calls = [n for n in result.model.graph.nodes if n.op == "call_function" and n.target in (F.conv2d, torch.conv2d)]
    first, second = calls
    assert first.kwargs["stride"] == 1 and first.kwargs["padding"] == (1, 1)  # the 3x3 call keeps its size
    if placement == "before":  # the patchify call keeps its stride behind a DynOPool resizing to multiples of 2
        assert second.kwargs["stride"] == 2
        assert result.model.get_submodule(second.args[0].target).multiple == (2, 2)
    pools = [m for m in result.model.modules() if isinstance(m, DynOPool)]
    assert len(pools) == 2
    assert result.model(torch.randn(2, *SIZE)).shape == (2, 5)
    cost = CostModel(result.model, SIZE)
    randomise_strides(result.model, random.Random(1), lo=0.8, hi=2.5)
    assert cost.flops() == count_flops(result.model, SIZE)
