"""Swin's patch merging by a channels-last reshape (``(N, H/2, 2, W/2, 2, C)``, then the 2x2
blocks become ``4C`` features: timm's Swin, Swin v2 and Swin v2-cr) is a site, so each stage's
token grid learns (only the patch embedding did). A window partition (the windows become the
batch), of the features or of a one-channel attention mask, is not; nor does a window's
relative-position bias follow the grid where a window is as large as the grid at the reference."""
from __future__ import annotations

import random

import pytest
import timm
import torch
from torch import nn

from budget_models import randomise_strides
from dynopool_convert import convert
from dynopool_convert.budget import fit_to_budget
from dynopool_convert.cost_model import CostModel
from dynopool_convert.flops import count_flops
from dynopool_convert.report import build_report, to_markdown

SIZE = (3, 32, 32)


def _cost_model_is_fvcore(model: nn.Module, rng: random.Random, x: torch.Tensor) -> CostModel:
    """The cost model equals fvcore, and the model runs, at three random stride settings."""
    cost = CostModel(model, SIZE)
    for _ in range(3):
        randomise_strides(model, rng, lo=0.55, hi=1.6)
        assert cost.flops() == count_flops(model, SIZE)
        assert torch.isfinite(model(x)).all()
    return cost


def _swin(name: str, window: int):
    torch.manual_seed(0)
    return timm.create_model(name, img_size=32, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1),
                             window_size=window, dynamic_img_size=True, num_classes=3).eval()


@pytest.mark.parametrize("name,window", [("swin_tiny_patch4_window7_224", 2), ("swinv2_tiny_window8_256", 4)])
def test_swin_patch_merging_learns_each_stage_exactly_at_init_the_cost_model_is_fvcore_and_the_budget_holds(name, window):
    model = _swin(name, window)
    r = convert(model, SIZE, placement="exact")
    merged = [s for s in r.plan.sites if s.name.endswith("downsample.reshape_patches")]
    assert len(merged) == 3 and all(s.status == "converted" for s in merged)
    assert all("channels-last reshape" in s.op for s in merged)
    assert len({s.group for s in r.plan.sites if s.status == "converted"}) == 4
    assert not [n for n in r.plan.notes if "relative-position bias" in n]  # window biases stay per window
    x = torch.randn(2, *SIZE)
    assert torch.allclose(r.model.eval()(x), model(x), atol=1e-5)
    cost = _cost_model_is_fvcore(r.model, random.Random(0), x)
    budget = int(0.6 * count_flops(model, SIZE))
    fit = fit_to_budget(r.model, budget, SIZE, cost)
    assert fit.final_flops <= budget and fit.final_flops == count_flops(r.model, SIZE)


class Focus(nn.Module):
    """YOLOv5's Focus: the image's four quarters (every other row and column) as channels."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(12, 8, 3, padding=1)
        self.down = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = torch.cat([x[..., ::2, ::2], x[..., 1::2, ::2], x[..., ::2, 1::2], x[..., 1::2, 1::2]], 1)
        return self.fc(self.down(self.conv(x)).mean((2, 3)))


class QuarterMerge(nn.Module):
    """The Swin paper code's patch merging: channels last, four quarters, cat, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 2, stride=2)
        self.reduction = nn.Linear(32, 16)
        self.fc = nn.Linear(16, 3)

    def quarters(self, x):
        return x[:, 0::2, 0::2, :], x[:, 1::2, 0::2, :], x[:, 0::2, 1::2, :], x[:, 1::2, 1::2, :]

    def forward(self, x):
        x = self.embed(x).permute(0, 2, 3, 1)
        return self.fc(self.reduction(torch.cat(self.quarters(x), -1)).mean((1, 2)))


class QuarterMergeShort(QuarterMerge):
    """The same, the channels' index left out (``x[:, 0::2, 0::2]``, as the Swin paper code)."""

    def quarters(self, x):
        return x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]


@pytest.mark.parametrize("model_class", [Focus, QuarterMerge, QuarterMergeShort])
def test_four_quarters_by_slicing_are_one_site_exact_at_init(model_class):
    torch.manual_seed(0)
    model = model_class().eval()
    r = convert(model, SIZE, placement="exact")
    assert [s.status for s in r.plan.sites] == ["converted", "converted"]
    assert [s.op for s in r.plan.sites if s.name == "cat_patches"] == ["patches of 2x2 by slices"]
    assert len({s.group for s in r.plan.sites}) == 2 and not any(s.name.startswith("getitem") for s in r.plan.sites)
    x = torch.randn(2, *SIZE)
    assert torch.allclose(r.model.eval()(x), model(x), atol=1e-6)
    _cost_model_is_fvcore(r.model, random.Random(1), x)


def test_torchvision_swin_merges_patches_through_its_wrapped_function_and_reports_briefly():
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.swin_transformer.SwinTransformer(
        patch_size=[2, 2], embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=[2, 2], num_classes=3).eval()
    r = convert(model, SIZE, placement="exact")
    merged = [s for s in r.plan.sites if s.name.endswith("cat_patches")]
    assert len(merged) == 3 and all(s.status == "converted" for s in merged)
    x = torch.randn(2, *SIZE)
    assert torch.allclose(r.model.eval()(x), model(x), atol=1e-5)
    report = build_report(r.model, r.plan.to_dict(), source=None, input_size=SIZE)
    line = next(line for line in to_markdown(report).splitlines() if line.startswith("Receptive fields through"))
    assert len(report["approximate_receptive_fields"]) > 8
    assert line.count(",") == 7 and line.endswith(f"and {len(report['approximate_receptive_fields']) - 8} more (all in the JSON report)")
