"""Groups capped at their reference scale factor (larger maps break the layers after them: the
original U-Net's crop of a skip to the upsampled map), and transposed convolutions in the cost
model."""
from __future__ import annotations

import importlib
import random

import pytest
import torch
from torch import nn

from dynopool_convert import Plan, apply_plan, convert, dynopool_modules, scale_parameters
from dynopool_convert.budget import fit_to_budget
from dynopool_convert.cost_model import CostModel
from dynopool_convert.flops import count_flops
from dynopool_convert.report import build_report
from dynopool_convert.report.graph import ReportGraph
from dynopool_convert.report.receptive_field import receptive_fields
from dynopool_convert.report.schema import check_report

SIZE = (3, 76, 76)


def _block(i: int, o: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(i, o, 3), nn.ReLU(), nn.Conv2d(o, o, 3), nn.ReLU())


class _Up(nn.Module):
    def __init__(self, i: int, o: int) -> None:
        super().__init__()
        self.up, self.conv = nn.ConvTranspose2d(i, o, 2, 2), _block(2 * o, o)

    def forward(self, x, skip):
        x = self.up(x)
        dy, dx = (skip.size(2) - x.size(2)) // 2, (skip.size(3) - x.size(3)) // 2
        return self.conv(torch.cat([skip[:, :, dy:dy + x.size(2), dx:dx + x.size(3)], x], 1))


class CropUNet(nn.Module):
    """The original U-Net in small: unpadded convs, each skip centre-cropped to the upsampled map,
    which must not outgrow it."""

    def __init__(self) -> None:
        super().__init__()
        self.d1, self.d2, self.mid = _block(3, 4), _block(4, 8), _block(8, 8)
        self.pool = nn.MaxPool2d(2)
        self.u2, self.u1 = _Up(8, 8), _Up(8, 4)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        a = self.d1(x)
        b = self.d2(self.pool(a))
        return self.head(self.u1(self.u2(self.mid(self.pool(b)), b), a))


def _set_strides(model: nn.Module, rng: random.Random, lo: float, hi: float) -> None:
    with torch.no_grad():
        for p in scale_parameters(model):
            p.copy_(torch.tensor([rng.uniform(lo, hi), rng.uniform(lo, hi)]))


@pytest.mark.parametrize("placement", ["before", "exact"])
def test_groups_whose_larger_maps_break_are_capped_and_still_learn_smaller_ones(placement):
    result = convert(CropUNet(), SIZE, placement=placement)
    capped = [g for g in result.plan.groups if g.r_max is not None]
    assert capped and all(g.status == "converted" for g in result.plan.groups if g.sites[0].startswith("pool"))
    for g in capped:
        assert g.r_max == pytest.approx(0.5)
        assert g.reason.startswith("scale factor capped at its reference value 0.5") and "larger output" in g.reason
    bounds = {m.group: m.r_bounds for _, m in dynopool_modules(result.model)}
    assert all(bounds[g.id][1] == pytest.approx(0.5) for g in capped)
    x = torch.randn(1, *SIZE)
    reference = result.model(x).shape
    # a smaller stride than the cap allows is held at the cap: the maps do not grow
    with torch.no_grad():
        for p in scale_parameters(result.model):
            p.copy_(torch.tensor([1.2, 1.2]))
    if len(capped) == len(result.plan.converted_groups()):
        assert result.model(x).shape == reference
    # the plan keeps the cap through a checkpoint's replay
    replayed = apply_plan(CropUNet(), Plan.from_dict(result.plan.to_dict()))
    assert {m.group: m.r_bounds for _, m in dynopool_modules(replayed)} == bounds


@pytest.mark.parametrize("placement", ["before", "exact"])
def test_the_cost_model_follows_the_crop_and_the_transposed_convs_exactly(placement):
    result = convert(CropUNet(), SIZE, placement=placement)
    model = result.model
    cost = CostModel(model, SIZE)
    assert cost.regions == []  # followed by rules: no module probed whole
    rng = random.Random(3)
    for _ in range(5):  # inside the caps: maps no larger than the original's, big enough for the convs
        _set_strides(model, rng, 2.0, 2.3)
        assert cost.flops() == count_flops(model, SIZE)
    with torch.no_grad():
        for p in scale_parameters(model):
            p.copy_(torch.tensor([2.0, 2.0]))
    original = count_flops(CropUNet(), SIZE)
    fit = fit_to_budget(model, int(0.6 * original), SIZE)
    assert fit.final_flops <= int(0.6 * original) and fit.final_flops == count_flops(model, SIZE)
    assert fit.final_flops > 0.5 * original  # the capped groups still move down to the budget
    report = build_report(model, result.plan.to_dict(), source=None, input_size=SIZE)
    check_report(report)
    assert [g["r_max"] for g in report["groups"]] == [g.r_max for g in result.plan.groups]


class _Decoder(nn.Module):
    def __init__(self, output_padding: int) -> None:
        super().__init__()
        self.stem, self.pool = nn.Conv2d(3, 6, 3, padding=1), nn.MaxPool2d(2)
        self.up = nn.ConvTranspose2d(6, 4, 3, stride=2, padding=1, output_padding=output_padding)
        self.conv = nn.Conv2d(4, 4, 3)  # unpadded: its FLOPs need the true size after the up-conv

    def forward(self, x):
        return self.conv(self.up(self.pool(self.stem(x))))


@pytest.mark.parametrize("output_padding", [0, 1])
def test_a_transposed_convolution_after_a_site_has_its_own_size_rule(output_padding):
    size = (3, 32, 32)
    model = convert(_Decoder(output_padding), size, validate=False).model
    cost = CostModel(model, size)
    assert cost.regions == [] and not cost._by_proportion
    rng = random.Random(output_padding)
    for _ in range(5):
        _set_strides(model, rng, 0.8, 3.5)
        assert cost.flops() == count_flops(model, size)
    fields = receptive_fields(ReportGraph(model, size))
    assert not fields.approximate


class _SizeCheck(nn.Module):
    """Kept whole by the tracer (a branch on sizes): ``b`` may not outgrow half of ``a``, and once
    ``a`` moves from its reference size, ``b`` must be exactly half of it."""

    def forward(self, a, b):
        if b.size(2) > (a.size(2) + 1) // 2 or b.size(3) > (a.size(3) + 1) // 2:
            raise RuntimeError("b outgrew a")
        if a.size(2) != 16 and (b.size(2) < a.size(2) // 2 or b.size(3) < a.size(3) // 2):
            raise RuntimeError("b no longer half of a")
        return a[:, :, :b.size(2), :b.size(3)] + b


class _CapBreaksJointly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.pool0, self.pool1 = nn.Conv2d(3, 4, 3, padding=1), nn.MaxPool2d(2), nn.MaxPool2d(2)
        self.check, self.head = _SizeCheck(), nn.Linear(4, 2)

    def forward(self, x):
        a = self.pool0(self.stem(x))
        return self.head(self.check(a, self.pool1(a)).mean((2, 3)))


def test_a_cap_that_joint_moves_with_the_groups_before_it_break_is_refused(monkeypatch):
    # pool1 alone: larger outputs break, smaller ones pass (a cap); moved with pool0, smaller ones
    # break too: the audit refuses the cap, and the groups settle as they would without caps
    convert_module = importlib.import_module("dynopool_convert.convert")  # the package's name is the function
    audits = []
    audit = convert_module._audit_caps
    monkeypatch.setattr(convert_module, "_audit_caps", lambda a, p: audits.append(audit(a, p)) or audits[-1])
    result = convert(_CapBreaksJointly(), (3, 32, 32))
    assert audits[0] == {result.plan.site("pool1").group} and audits[-1] == set()
    assert all(g.r_max is None for g in result.plan.groups)
    monkeypatch.setattr(convert_module, "capped_problem", lambda *args: None)
    uncapped = convert(_CapBreaksJointly(), (3, 32, 32))
    assert result.plan.to_dict() == uncapped.plan.to_dict()


class _BroadcastingBranch(nn.Module):
    """pool1's 2x2 map is added to a fixed 2x2 branch: larger breaks the add, smaller (1x1)
    broadcasts into it and runs (timm's HRNet fusing its branches)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.pool0, self.pool1 = nn.Conv2d(3, 4, 3, padding=1), nn.MaxPool2d(2), nn.MaxPool2d(4)
        self.fixed, self.head = nn.AvgPool2d(4), nn.Linear(4, 2)

    def forward(self, x):
        a = self.pool0(self.stem(x))
        return self.head((self.pool1(a) + self.fixed(a)).mean((2, 3)))


def test_a_group_whose_smaller_maps_broadcast_is_not_capped():
    result = convert(_BroadcastingBranch(), (3, 16, 16), exclude=["fixed"])
    pool1 = result.plan.groups[result.plan.site("pool1").group]
    assert pool1.r_max is None and pool1.status in ("pinned", "reverted")


def test_broadcast_problem_compares_operands_call_by_call():
    from dynopool_convert.broadcast_watch import ElementwiseShapes, broadcast_problem

    def run(h: int) -> list:
        with ElementwiseShapes() as watch:
            a, b = torch.ones(1, 2, 2, 2), torch.ones(1, 2, h, h)
            _ = (a * 2) + b
            _ = a.add(torch.ones(1, 2, 1, 1))  # squeeze-excitation style: 1x1 at the reference too
        return watch.calls

    assert broadcast_problem(run(2), run(2)) == ""
    assert broadcast_problem(run(2), run(1)) == "elementwise op 1 broadcasts operands equal at the reference: [1, 2, 2, 2] and [1, 2, 1, 1]"
