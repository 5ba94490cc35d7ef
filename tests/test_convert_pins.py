"""Groups that cannot move freely: output sizes rounded to a multiple, and pinned groups."""
from __future__ import annotations

import random

import pytest
import timm
import torch
from torch import nn

import dynopool_convert as dc
from _convert_models import HardCodedFlatten, WindowNet
from dynopool_convert import DynOPool, Plan, apply_plan, convert, dynopool_modules, scale_parameters
from dynopool_convert.cost_model import CostModel
from dynopool_convert.flops import count_flops
from dynopool_convert.plan import PLAN_FORMAT_VERSION
from dynopool_convert.report import build_report
from dynopool_convert.report.schema import check_report


def _random_strides(model: nn.Module, rng: random.Random) -> None:
    with torch.no_grad():
        for p in scale_parameters(model):
            p.copy_(torch.tensor([rng.uniform(0.7, 3.0), rng.uniform(0.7, 3.0)]))


def test_window_sizes_round_the_pool_to_a_multiple_and_the_conv_stays_free():
    r = convert(WindowNet(), input_size=(3, 32, 32))
    conv, pool = r.plan.groups[r.plan.site("conv").group], r.plan.groups[r.plan.site("pool").group]
    assert (conv.status, conv.multiple) == ("converted", None)
    # a one-pixel move breaks the 4x4 windows; 2 does too; 4 is the smallest multiple that works
    assert (pool.status, pool.multiple) == ("converted", [4, 4])
    assert pool.reason.startswith("output sizes rounded to multiples of 4x4: without that, smaller output")
    assert r.plan.site("pool").reason == pool.reason and not conv.reason
    assert r.model.get_submodule("pool").multiple == (4, 4)
    rng = random.Random(0)
    x = torch.randn(2, 3, 32, 32)
    for _ in range(10):  # any strides of both groups: the pool's output stays a multiple of 4
        _random_strides(r.model, rng)
        assert r.model(x).shape == (2, 3)
    replayed = Plan.from_dict(r.plan.to_dict())
    assert replayed.groups[pool.id].multiple == [4, 4]
    model = apply_plan(WindowNet(), replayed)
    assert model.get_submodule("pool").multiple == (4, 4) and model.get_submodule("conv_dynopool").multiple == (1, 1)


def test_without_the_multiple_the_same_moves_break():
    r = convert(WindowNet(), input_size=(3, 32, 32))
    pool = r.model.get_submodule("pool")
    pool.multiple = (1, 1)
    with torch.no_grad():
        pool.stride.copy_(torch.tensor([16 / 7, 16 / 7]))  # 7x7: not divisible by 4
    with pytest.raises(RuntimeError):
        r.model(torch.randn(1, 3, 32, 32))


def test_multiple_keeps_the_straight_through_gradient():
    x = torch.randn(1, 2, 30, 30)
    for s in (1.7, 2.0, 2.6, 3.3):
        pool = DynOPool(s, multiple=(4, 2))
        y = pool(x)
        assert y.shape[-2] % 4 == 0 and y.shape[-1] % 2 == 0
        assert tuple(y.shape[-2:]) == pool.output_size((30, 30))
        y.sum().backward()
        assert torch.isfinite(pool.stride.grad).all() and (pool.stride.grad != 0).all()
    assert dc.dynopool_output_size(30, 2.6, 4) == 12 and dc.dynopool_output_size(30, 9.0, 4) == 4


def test_pinned_and_rounded_models_round_trip_through_a_checkpoint(tmp_path):
    for factory, size in (("window_net", 32), ("hard_coded_flatten", 16)):
        source = f"_convert_models:{factory}"
        result = convert(dc.build_model(source, {}), input_size=(3, size, size))
        with torch.no_grad():
            for p in scale_parameters(result.model):
                p.mul_(1.2)
        path = dc.save(tmp_path / f"{factory}.pt", result.model, result.plan, source, {}, (3, size, size))
        loaded = dc.load_checkpoint(path, trust_source=True)
        assert loaded.plan.to_dict() == result.plan.to_dict()
        x = torch.randn(2, 3, 40, 28)  # another input size: the pin absorbs it
        with torch.no_grad():
            torch.testing.assert_close(loaded.model.eval()(x), result.model.eval()(x), rtol=0, atol=0)


@pytest.mark.parametrize("model_cls, size", [(WindowNet, 32), (HardCodedFlatten, 16)])
def test_cost_model_equals_fvcore_with_pins_and_multiples(model_cls, size):
    model = convert(model_cls(), input_size=(3, size, size)).model
    assert any(isinstance(m, nn.AdaptiveAvgPool2d) for m in model.modules()) or any(
        m.multiple != (1, 1) for _, m in dynopool_modules(model))
    cost = CostModel(model, (3, size, size))
    assert cost.unattributed == 0
    rng = random.Random(1)
    for _ in range(5):
        _random_strides(model, rng)
        assert cost.flops() == count_flops(model, (3, size, size))


def test_report_gives_the_size_step_of_a_rounded_group():
    r = convert(WindowNet(), input_size=(3, 32, 32))
    report = build_report(r.model, r.plan.to_dict(), source="tests:window", input_size=(3, 32, 32))
    assert check_report(report) == []
    assert [g["multiple"] for g in report["groups"]] == [None, [4, 4]]


def test_report_of_a_pinned_model():
    model = HardCodedFlatten()
    r = convert(model, input_size=(3, 16, 16))
    report = build_report(r.model, r.plan.to_dict(), source="tests:flatten", input_size=(3, 16, 16))
    assert check_report(report) == []
    sites = {s["name"]: s for s in report["sites"]}
    assert sites["pool"]["status"] == "pinned" and sites["pool"]["input_size"] == [8, 8]
    assert sites["conv"]["status"] == "converted"
    assert [g["status"] for g in report["groups"]] == ["converted", "pinned"]


def test_levit_pins_its_last_stem_conv_and_learns_the_first_three():
    # LeViT's attention biases are sized for a 14x14 token grid: the last stem conv is pinned,
    # the three before it learn (their maps are resized back to 28x28 before it)
    model = timm.create_model("levit_128s", num_classes=5).eval()
    r = convert(model, input_size=(3, 224, 224))
    assert [g.status for g in r.plan.groups] == ["converted", "converted", "converted", "pinned"]
    assert r.model.get_submodule("stem.conv4.linear_pin").output_size == (28, 28)
    _random_strides(r.model, random.Random(2))
    x = torch.randn(1, 3, 224, 224)
    assert r.model(x).shape == (1, 5)
    cost = CostModel(r.model, (3, 224, 224))
    assert cost.flops() == count_flops(r.model, (3, 224, 224))


def test_format_1_plans_still_load():
    r = convert(WindowNet(), input_size=(3, 32, 32))
    old = r.plan.to_dict()
    old["format_version"] = 1  # before pins and multiples: no ``multiple`` field
    for group in old["groups"]:
        group.pop("multiple")
    plan = Plan.from_dict(old)
    assert plan.format_version == 1 and all(g.multiple is None for g in plan.groups)
    assert apply_plan(WindowNet(), plan)(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    newer = dict(old, format_version=PLAN_FORMAT_VERSION + 1)
    with pytest.raises(dc.UserInputError, match=f"format version {PLAN_FORMAT_VERSION + 1}"):
        Plan.from_dict(newer)
