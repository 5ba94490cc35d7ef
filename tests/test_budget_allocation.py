"""Which groups the budget fit lowers: the allocation that keeps resolution (allocation.py)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import dynopool_convert as dc
from dynopool_convert.allocation import log_resolution, resolution_path_factors, scaled
from dynopool_convert.budget import INPUT_FIRST_SLACK, RESOLUTION_GAIN
from dynopool_convert.cost_model import CostModel
from dynopool_convert.training.group_sizes import GroupGeometry

SIZE = (1, 28, 28)


def toy_vgg(width: int = 8) -> nn.Module:
    """Three VGG stages of two 3x3 convs, a 2x2 max-pool after each (the network of RESULTS §6)."""
    layers: list[nn.Module] = []
    cin = 1
    for cout in (width, 2 * width, 4 * width):
        layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                   nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)]
        cin = cout
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 10))


def converted(placement: str = "before") -> nn.Module:
    torch.manual_seed(0)
    return dc.convert(toy_vgg(), input_size=SIZE, input_site=True, placement=placement).model


def test_the_cost_model_sizes_are_the_forward_pass_sizes():
    """``CostModel.group_sizes`` (no forward pass) against the sizes a forward pass measures,
    at the original strides and at uneven ones."""
    model = converted()
    cost, geo = CostModel(model, SIZE), GroupGeometry(model, SIZE)
    for strides in (geo.strides(), [(1.3, 1.1), (2.4, 1.7), (1.6, 2.9), (1.2, 1.9)]):
        geo.set_strides(strides)
        ins, outs = geo.measure()
        assert [io for io in cost.group_sizes(strides)] == list(zip(ins, outs))


def test_half_budget_keeps_every_map_instead_of_crushing_the_last():
    """At half the toy VGG's FLOPs the most expensive allocation within the budget ends in a 1x1
    map (25 -> 10 -> 3 -> 1); the fit takes one of nearly the same cost that keeps at least
    ``RESOLUTION_GAIN`` more resolution, within the budget by fvcore's count."""
    original = dc.count_flops(toy_vgg(), SIZE)
    budget = original // 2
    by_flops, by_resolution = converted(), converted()
    old = dc.fit_to_budget(by_flops, budget, SIZE, allocation="flops")
    new = dc.fit_to_budget(by_resolution, budget, SIZE)
    cost = CostModel(by_resolution, SIZE)
    assert new.method == "resolution" and new.final_flops == dc.count_flops(by_resolution, SIZE) <= budget
    assert new.final_flops >= old.final_flops - INPUT_FIRST_SLACK * budget
    assert log_resolution(cost, new.strides) >= log_resolution(cost, old.strides) + RESOLUTION_GAIN
    sizes = GroupGeometry(by_resolution, SIZE).measure()[1]
    assert min(h for h, _ in sizes) >= 3 and min(GroupGeometry(by_flops, SIZE).measure()[1])[0] == 1


@pytest.mark.parametrize("placement, frac", [("before", 0.7), ("before", 1.0), ("exact", 0.5), ("exact", 0.7)])
def test_the_fit_keeps_the_most_expensive_allocation_when_resolution_barely_differs(placement, frac):
    """Where no allocation keeps ``RESOLUTION_GAIN`` more resolution, the fit is the one that
    spends the most of the budget, as before (the allocations RESULTS §6.5 measured); with
    ``axis_fill`` the fill after it only adds FLOPs within the budget (no move: the same strides)."""
    budget = int(dc.count_flops(toy_vgg(), SIZE) * frac)
    a, b, c = converted(placement), converted(placement), converted(placement)
    old = dc.fit_to_budget(a, budget, SIZE, allocation="flops")
    new = dc.fit_to_budget(b, budget, SIZE)
    assert new.method == old.method != "resolution" and new.strides == old.strides
    filled = dc.fit_to_budget(c, budget, SIZE, axis_fill=True)
    assert filled.method == new.method and filled.group_factors == new.group_factors
    assert new.axes_raised == 0 and new.final_flops <= filled.final_flops <= budget
    assert (filled.strides == new.strides) == (filled.axes_raised == 0)


def test_the_resolution_path_moves_resolution_without_adding_any():
    """Every allocation the path returns: within the budget, no map above its original size, no
    site that shrank its input enlarging it, and no allocation in the neighbourhood (each group
    one size up, the others as found) that fits and keeps more resolution."""
    model = converted()
    cost = CostModel(model, SIZE)
    base, bounds = cost.clamp(cost.current_strides()), cost.bounds
    original = cost.group_sizes(base)
    for frac in (0.3, 0.5, 0.8):
        budget = int(cost.flops(base) * frac)
        factors = resolution_path_factors(cost, base, bounds, budget, floor=0.01)
        strides = scaled(base, bounds, factors)
        assert cost.flops(strides) <= budget
        for (now_in, now_out), (_, then_out) in zip(cost.group_sizes(strides), original):
            assert now_out[0] <= min(then_out[0], now_in[0]) and now_out[1] <= min(then_out[1], now_in[1])
        kept = log_resolution(cost, strides)
        geo = GroupGeometry(model, SIZE)
        sizes = [io[1] for io in cost.group_sizes(strides)]
        for g in range(len(sizes)):
            wider = [(h + 1, w + 1) if i == g else (h, w) for i, (h, w) in enumerate(sizes)]
            if wider[g][0] > original[g][1][0] or not geo.set_sizes(wider):
                continue
            better = cost.flops(geo.strides()) <= budget and log_resolution(cost, geo.strides()) > kept + 1e-9
            assert not better, (frac, g, wider)


def test_log_resolution_counts_every_map_alike():
    model = converted()
    cost = CostModel(model, SIZE)
    strides = cost.current_strides()
    sizes = [io[1] for io in cost.group_sizes(strides)]
    assert log_resolution(cost, strides) == pytest.approx(sum(math.log(h * w) for h, w in sizes))


def test_no_allocation_empties_a_map():
    """Placement exact keeps the 2x2 max-pools: at 0.3x the toy VGG's FLOPs an allocation feeding
    one a 1x1 map made fvcore's count fail; such strides cost ``INFEASIBLE`` now, and the fit
    lands within the budget on a model that runs."""
    from dynopool_convert.cost_model import INFEASIBLE

    model = converted("exact")
    cost = CostModel(model, SIZE)
    budget = int(dc.count_flops(toy_vgg(), SIZE) * 0.3)
    assert cost.flops([(s_h * 16, s_w * 16) for s_h, s_w in cost.current_strides()]) == INFEASIBLE
    for allocation in ("flops", "resolution"):
        fitted = converted("exact")
        fit = dc.fit_to_budget(fitted, budget, SIZE, allocation=allocation)
        assert fit.final_flops == dc.count_flops(fitted, SIZE) <= budget
        assert fitted(torch.zeros(2, *SIZE)).shape == (2, 10)


def test_a_budget_no_allocation_reaches_is_refused_in_one_line():
    with pytest.raises(dc.UserInputError) as err:
        dc.fit_to_budget(converted("exact"), 1000, SIZE)
    assert "cannot be met" in str(err.value) and "\n" not in str(err.value)


def test_an_unknown_allocation_rule_is_refused():
    with pytest.raises(ValueError, match="allocation must be one of"):
        dc.fit_to_budget(converted(), 10**6, SIZE, allocation="cheapest")
