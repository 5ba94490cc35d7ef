"""The op registry: one entry per op kind serves the sites, the cost model and the receptive
fields. LPPool2d, timm's BlurPool2d and timm's ``*_pool2d_same`` (functions and modules),
converted or left in place while another site learns: the cost model is exact against fvcore
at moved strides, and the report's receptive field is the exact window."""
from __future__ import annotations

import random

import pytest
import torch
from timm.layers import BlurPool2d
from timm.layers.pool2d_same import MaxPool2dSame, avg_pool2d_same, max_pool2d_same
from torch import nn

from budget_models import randomise_strides
from dynopool_convert import convert, op_registry
from dynopool_convert.cost_model import CostModel
from dynopool_convert.errors import UnsupportedModelError
from dynopool_convert.flops import count_flops
from dynopool_convert.op_registry import OpSpec, spec_for, window_geometry
from dynopool_convert.report.graph import ReportGraph
from dynopool_convert.report.receptive_field import receptive_fields
from dynopool_convert.sites import PoolModuleHandler

SIZE = (3, 29, 29)  # odd: every floor/ceil of the size rules is exercised


class _Net(nn.Module):
    """A strided conv (a site that learns), the op under test (k3 s2), a conv."""

    def __init__(self, op: nn.Module | None = None) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.op = op
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c2(self.pool(self.c1(x)))


class _MaxSameFn(_Net):
    def pool(self, x):
        return max_pool2d_same(x, (3, 3), (2, 2))


class _AvgSameFn(_Net):
    def pool(self, x):
        return avg_pool2d_same(x, (3, 3), (2, 2))


#: op kind -> (model factory, site name, spec name, DynOPool's default aggregate)
OPS = {
    "lp_pool": (lambda: _Net(nn.LPPool2d(2, 3, stride=2)), "op", "lp_pool", "mean"),
    "blur_pool": (lambda: _Net(BlurPool2d(4, filt_size=3, stride=2)), "op", "blur_pool", "mean"),
    "max_pool2d_same": (_MaxSameFn, "max_pool2d_same", "max_pool2d_same", "max"),
    "avg_pool2d_same": (_AvgSameFn, "avg_pool2d_same", "avg_pool2d_same", "mean"),
    "MaxPool2dSame": (lambda: _Net(MaxPool2dSame(3, 2)), "op", "max_pool", "max"),
}


def _exact_at_moved_strides(model: nn.Module) -> None:
    cost = CostModel(model, SIZE)
    assert cost.unattributed == 0 and cost.flops() == cost.reference_flops
    rng = random.Random(3)
    for _ in range(3):
        randomise_strides(model, rng, lo=0.8, hi=3.0)
        assert cost.flops() == count_flops(model, SIZE)


@pytest.mark.parametrize("kind", OPS)
@pytest.mark.parametrize("left_in_place", [False, True])
def test_site_and_cost_model_exact_converted_or_left_in_place(kind, left_in_place):
    torch.manual_seed(0)
    make, site, spec_name, aggregate = OPS[kind]
    result = convert(make(), SIZE, exclude=[site] if left_in_place else [], validate=False)
    sites = {s.name: s for s in result.plan.sites}
    assert sites[site].status == ("skipped" if left_in_place else "converted")
    assert sites["c1"].status == "converted"  # the other site learns either way
    if not left_in_place:
        assert sites[site].aggregate == aggregate
    spec = op_registry.spec_for_node(
        next(n for n in result.model.graph.nodes if n.name == site or n.target == site), result.model)
    if left_in_place:
        assert spec.name == spec_name
    _exact_at_moved_strides(result.model)


def test_issue_net_lppool_left_in_place_keeps_the_budget():
    # the issue's symptom: LPPool2d left in place made the cost model refuse the whole model
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), BlurPool2d(8, 3, 2), nn.LPPool2d(2, 2),
                        nn.Conv2d(8, 8, 3, padding=1), nn.MaxPool2d(2), nn.Conv2d(8, 4, 1))
    result = convert(net, (3, 37, 37), exclude=["2"], validate=False)
    assert [(s.name, s.status) for s in result.plan.sites] == [("1", "converted"), ("2", "skipped"), ("4", "converted")]
    cost = CostModel(result.model, (3, 37, 37))
    randomise_strides(result.model, random.Random(1), lo=0.7, hi=3.0)
    assert cost.flops() == count_flops(result.model, (3, 37, 37))


@pytest.mark.parametrize("kind", OPS)
def test_receptive_field_is_the_registry_window(kind):
    # c1 k3 s2 (rf 3, jump 2) -> op k3 s2 (rf 7, jump 4) -> c2 k3 (rf 15), not approximated
    make, site, _, _ = OPS[kind]
    graph = ReportGraph(make(), SIZE)
    rf = receptive_fields(graph)
    out = [n.name for n in graph.nodes if n.op == "call_module" and n.target == "c2"][0]
    op_node = [n.name for n in graph.nodes if n.name.startswith(site)][0]
    assert rf.fields[op_node].size == (7.0, 7.0) and rf.fields[op_node].jump == (4.0, 4.0)
    assert rf.fields[out].size == (15.0, 15.0)
    assert not rf.approximate
    converted = convert(make(), SIZE, exclude=[site], validate=False).model
    assert not receptive_fields(ReportGraph(converted, SIZE)).approximate


class _EveryOther(nn.Module):
    """Keeps every second row and column: a resize no registry entry knows."""

    kernel_size, stride = 1, 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, ::2, ::2]


def test_adding_an_op_kind_is_one_entry(monkeypatch):
    def net() -> nn.Module:
        return _Net(_EveryOther())

    before = {s.name: s for s in convert(net(), SIZE, validate=False).plan.sites}
    assert "op" not in before  # traced through: a getitem, no site
    entry = OpSpec("every_other", modules=(_EveryOther,), site=PoolModuleHandler("max"),
                   geometry=lambda call: window_geometry(1, 2))
    monkeypatch.setattr(op_registry, "SPECS", (entry, *op_registry.SPECS))
    assert spec_for(module=_EveryOther()) is entry
    result = convert(net(), SIZE, validate=False)
    assert {s.name: s.status for s in result.plan.sites}["op"] == "converted"
    left = convert(net(), SIZE, exclude=["op"], validate=False).model
    _exact_at_moved_strides(left)
    rf = receptive_fields(ReportGraph(net(), SIZE))
    assert rf.fields["c2"].size == (11.0, 11.0) and not rf.approximate  # 3, then jump 4: 3 + 2 * 4


def test_an_op_joining_maps_into_a_new_size_is_still_refused_loudly():
    class Stacked(nn.Module):  # height h + 5 from two maps in the model's own forward: nothing explains it
        def __init__(self) -> None:
            super().__init__()
            self.down, self.conv = nn.Conv2d(3, 4, 3, 2, 1), nn.Conv2d(4, 4, 3)

        def forward(self, x):
            y = self.down(x)
            return self.conv(torch.cat([y, y[:, :, :5]], dim=2))

    converted = convert(Stacked(), SIZE, validate=False).model
    with pytest.raises(UnsupportedModelError, match="cannot follow the size of node 'cat'"):
        CostModel(converted, SIZE)


def test_an_op_without_entry_in_the_models_own_forward_is_probed_alone():
    class Cropped(nn.Module):  # output size h - 3 in the model's own forward: no module holds it
        def __init__(self) -> None:
            super().__init__()
            self.down, self.conv = nn.Conv2d(3, 4, 3, 2, 1), nn.Conv2d(4, 4, 3)

        def forward(self, x):
            return self.conv(self.down(x)[:, :, 3:, 3:] * 1.0)

    converted = convert(Cropped(), SIZE, validate=False).model
    cost = CostModel(converted, SIZE)
    assert cost.regions == ["getitem"]
    rng = random.Random(5)
    for _ in range(4):
        randomise_strides(converted, rng, lo=0.6, hi=1.8)
        assert cost.flops() == count_flops(converted, SIZE)


def test_an_op_without_entry_inside_its_own_module_is_probed_whole():
    # the same crop inside a submodule that takes one map to one map: the cost model runs that
    # module alone at every size (cost_regions.py) and stays exact
    class Crop(nn.Module):
        def forward(self, x):
            return x[:, :, 3:, 3:] * 1.0

    converted = convert(nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), Crop(), nn.Conv2d(4, 4, 3)), SIZE, validate=False).model
    cost = CostModel(converted, SIZE)
    assert cost.regions == ["1"]
    randomise_strides(converted, random.Random(2), lo=0.7, hi=1.6)
    assert cost.flops() == count_flops(converted, SIZE)
