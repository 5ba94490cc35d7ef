"""The budget: parsing, the penalty, fitting at convert time, the final projection."""
from __future__ import annotations

import json
import random

import pytest
import torch
from torch import nn

from budget_models import MODELS, randomise_strides
from dynopool_convert import build_model, convert
from dynopool_convert.budget import (
    BudgetFit, BudgetProjection, budget_fraction, budget_penalty, check_budget, check_reachable, fit_to_budget, parse_budget,
    project_to_budget,
)
from dynopool_convert.cost_model import CostModel
from dynopool_convert.errors import UnsupportedModelError, UserInputError
from dynopool_convert.flops import count_flops


@pytest.mark.parametrize(
    "text, flops",
    [("4G", 4_000_000_000), ("4.1G", 4_100_000_000), ("500M", 500_000_000), ("750k", 750_000),
     ("4.1e9", 4_100_000_000), ("3000000", 3_000_000), ("4GFLOPs", 4_000_000_000),
     ("4gflops", 4_000_000_000), ("2.5mflop", 2_500_000), ("750K", 750_000), (" 4G ", 4_000_000_000),
     ("1e3k", 1_000_000), (".5G", 500_000_000), ("1T", 10**12), ("4FLOPs", 4)],
)
def test_parse_budget_accepts(text, flops):
    assert parse_budget(text) == flops


@pytest.mark.parametrize(
    "text", ["4X", "-1G", "nanG", "nan", "inf", "infG", "4 G", "", "0", "0G", "0.0000000001G", "4GG", "G",
             "4e", "1,000", "4G FLOPs", "+4G", "4GFLOPss"],
)
def test_parse_budget_refuses(text):
    with pytest.raises(UserInputError) as err:
        parse_budget(text)
    message = str(err.value)
    assert "\n" not in message
    assert "4G, 4.1G, 500M, 750k, 4.1e9, 3000000, 4GFLOPs" in message


@pytest.mark.parametrize("text, flops", [("0.7x", 700_000), ("70%", 700_000), ("1.5x", 1_500_000), (" .5x ", 500_000),
                                         ("12.5%", 125_000), ("1x", 1_000_000)])
def test_a_share_of_the_original_is_read_against_its_flops(text, flops):
    assert parse_budget(text, original=1_000_000) == flops
    check_budget(text)  # its form is fine before the count


@pytest.mark.parametrize("text", ["0x", "0%", "0.0x"])
def test_a_zero_share_is_refused_before_the_count(text):
    with pytest.raises(UserInputError, match="share must be above 0"):
        check_budget(text)


def test_a_share_without_the_original_flops_is_refused():
    with pytest.raises(UserInputError, match="share of the original model's FLOPs, which are not known"):
        parse_budget("0.7x")
    assert budget_fraction("4G") is None and budget_fraction("x") is None and budget_fraction("-1x") is None
    with pytest.raises(UserInputError, match="at least 1 FLOP"):
        parse_budget("0.1x", original=4)  # 0.4 FLOPs


def test_penalty_is_zero_inside_and_smooth_outside():
    budget = 1000.0
    flops = torch.tensor([500.0, 1000.0, 1050.0, 1500.0], requires_grad=True)
    pen = budget_penalty(flops, budget)
    assert pen[0] == 0 and pen[1] == 0
    assert 0 < pen[2] < pen[3]
    assert torch.isclose(pen[2], torch.tensor(0.05**2))
    pen.sum().backward()
    assert flops.grad[0] == 0 and flops.grad[1] == 0  # C1 at the boundary
    assert 0 < flops.grad[2] < flops.grad[3]


def test_target_penalty_also_pulls_up_to_the_budget():
    flops = torch.tensor([500.0, 1000.0, 1050.0], requires_grad=True)
    pen = budget_penalty(flops, 1000.0, mode="target")
    assert torch.allclose(pen, torch.tensor([0.25, 0.0, 0.05**2]))
    pen.sum().backward()
    assert flops.grad[0] < 0 and flops.grad[1] == 0 and flops.grad[2] > 0  # towards the budget from both sides
    with pytest.raises(UserInputError, match="ceiling, target"):
        budget_penalty(flops, 1000.0, mode="floor")


def test_fit_leaves_a_model_within_budget_alone():
    model = MODELS["resnet18"]()
    cost = CostModel(model, (3, 32, 32))
    before = [p.detach().clone() for p in cost.parameters]
    out = fit_to_budget(model, 10**12, (3, 32, 32), cost_model=cost)
    assert out["method"] == "none" and out["final_flops"] == out["converted_flops"] == cost.reference_flops
    assert all(torch.equal(a, p) for a, p in zip(before, cost.parameters))


def test_fit_refuses_an_impossible_budget_with_the_minimum_and_keeps_strides():
    model = MODELS["vgg_like"]()
    cost = CostModel(model, (3, 32, 32))
    before = [p.detach().clone() for p in cost.parameters]
    with pytest.raises(UserInputError) as err:
        fit_to_budget(model, 1000, (3, 32, 32), cost_model=cost)
    lowest = [p.detach().clone() for p in cost.parameters]
    assert all(torch.equal(a, b) for a, b in zip(before, lowest))
    with torch.no_grad():
        for p in cost.parameters:
            p.fill_(16.0)  # every r at r_min = 1/16: the minimum
    minimum = count_flops(model, (3, 32, 32))
    assert f"({minimum})" in str(err.value) and "minimum achievable" in str(err.value)
    assert "\n" not in str(err.value)


def test_resnet50_at_224_fits_4g_within_3_88_and_4_00():
    # the original counts 4.11G (test_flops); converted, it counts a little more
    model = convert(build_model("resnet50"), (3, 224, 224), validate=False).model
    out = fit_to_budget(model, parse_budget("4G"), (3, 224, 224))
    assert 4.11e9 < out["converted_flops"] < 4.2e9
    assert 3.88e9 <= out["final_flops"] <= 4.0e9
    assert out["final_flops"] == count_flops(model, (3, 224, 224))
    # a typed result, also read as a mapping, and plain data for checkpoints
    assert isinstance(out, BudgetFit) and out.method != "none" and out.final_flops == out["final_flops"]
    data = out.as_dict()
    assert json.loads(json.dumps(data)) == data and data["converted_flops"] == out.converted_flops
    with pytest.raises(KeyError):
        out["no_such_field"]


def test_the_per_group_fit_does_not_stop_at_a_cliff():
    """RegNetY-200MF at 64 px under 0.8x: the first move that fits took its last 2x2 map to 1x1
    (0.65x); its stem map alone lowered reaches 0.79x, and so does the fit now."""
    original = count_flops(build_model("timm:regnety_002"), (3, 64, 64))
    model = convert(build_model("timm:regnety_002"), (3, 64, 64), placement="exact", validate=False).model
    budget = int(0.8 * original)
    out = fit_to_budget(model, budget, (3, 64, 64))
    assert 0.78 * original <= out["final_flops"] <= budget
    assert out["final_flops"] == count_flops(model, (3, 64, 64))


# the projection must never leave a model over budget: random strides, several models,
# budgets just below the current count (one FLOP, 0.1%, 1%, 10%, 40% below)
BREAK = [("resnet18", 0), ("vgg_like", 1), ("two_branch", 2), ("tv_mobilenet_v3_small", 3)]


@pytest.mark.parametrize("name, seed", BREAK)
def test_projection_always_ends_within_budget(name, seed):
    rng = random.Random(seed)
    model = MODELS[name]()
    input_size = (3, 40, 40)
    cost = CostModel(model, input_size)
    for cut in rng.sample([1, 1e-3, 1e-2, 0.1, 0.4], 3):
        randomise_strides(model, rng, lo=0.55, hi=4.0)
        current = cost.flops()  # = fvcore's count (test_cost_model); the result is checked by fvcore
        budget = current - 1 if cut == 1 else int(current * (1 - cut))
        try:
            out = project_to_budget(model, budget, input_size, cost_model=cost)
        except UserInputError as err:  # only when even the minimum does not fit
            assert "minimum achievable" in str(err)
            continue
        assert isinstance(out, BudgetProjection) and out.moved and out["moved"]
        assert out["flops_before"] == current
        assert out["final_flops"] <= budget  # fvcore's count after the projection


class _TokenNet(torch.nn.Module):
    """Patch embedding, then half the tokens kept: a token count that is not h*w plus a constant,
    which the cost model does not follow."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Conv2d(3, 8, 4, stride=4)
        self.head = torch.nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        tokens = tokens[:, : tokens.shape[1] // 2 + 1]
        return self.head(tokens.mean(1))


def test_unsupported_model_is_refused_with_one_line():
    model = convert(_TokenNet(), input_size=(3, 32, 32)).model
    with pytest.raises(UnsupportedModelError) as info:
        CostModel(model, (3, 32, 32))
    assert isinstance(info.value, UserInputError)
    assert "\n" not in str(info.value) and "without a budget" in str(info.value)


def test_a_model_with_no_learned_group_is_refused_in_one_line():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1))  # nothing to resize
    model = convert(net, (3, 16, 16), validate=False).model
    flops = count_flops(model, (3, 16, 16))
    with pytest.raises(UserInputError, match="has no learned group .* cannot move"):
        fit_to_budget(model, flops // 2, (3, 16, 16))
    assert fit_to_budget(model, flops, (3, 16, 16)).method == "none"
    # the check before fine-tuning says the same (not "every scale factor at its lower bound")
    with pytest.raises(UserInputError, match=f"has no learned group .* \\({flops}\\) at 16x16 cannot move"):
        check_reachable(model, flops // 2, (3, 16, 16), CostModel(model, (3, 16, 16)))
