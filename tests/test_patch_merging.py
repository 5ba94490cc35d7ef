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

from dynopool_convert import convert, scale_parameters
from dynopool_convert.budget import fit_to_budget
from dynopool_convert.cost_model import CostModel
from dynopool_convert.flops import count_flops

SIZE = (3, 32, 32)


def _swin(name: str, window: int):
    torch.manual_seed(0)
    return timm.create_model(name, img_size=32, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1),
                             window_size=window, dynamic_img_size=True, num_classes=3).eval()


@pytest.mark.parametrize("name,window", [("swin_tiny_patch4_window7_224", 2), ("swinv2_tiny_window8_256", 4)])
def test_swin_patch_merging_learns_each_stage_exactly_at_init_and_the_cost_model_is_fvcore(name, window):
    model = _swin(name, window)
    r = convert(model, SIZE, placement="exact")
    merged = [s for s in r.plan.sites if s.name.endswith("downsample.reshape_patches")]
    assert len(merged) == 3 and all(s.status == "converted" for s in merged)
    assert all("channels-last reshape" in s.op for s in merged)
    assert len({s.group for s in r.plan.sites if s.status == "converted"}) == 4
    assert not [n for n in r.plan.notes if "relative-position bias" in n]  # window biases stay per window
    x = torch.randn(2, *SIZE)
    assert torch.allclose(r.model.eval()(x), model(x), atol=1e-5)
    cost, rng = CostModel(r.model, SIZE), random.Random(0)
    for _ in range(3):
        with torch.no_grad():
            for p in scale_parameters(r.model):
                p.copy_(torch.tensor([rng.uniform(0.55, 1.6), rng.uniform(0.55, 1.6)]))
        assert cost.flops() == count_flops(r.model, SIZE)
        assert torch.isfinite(r.model(x)).all()


def test_swin_budget_holds():
    model = _swin("swin_tiny_patch4_window7_224", 2)
    r = convert(model, SIZE)
    budget = int(0.6 * count_flops(model, SIZE))
    fit = fit_to_budget(r.model, budget, SIZE, CostModel(r.model, SIZE))
    assert fit.final_flops <= budget and fit.final_flops == count_flops(r.model, SIZE)
