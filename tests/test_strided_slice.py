"""Subsampling by slicing (``x[:, :, ::2, ::2]``) is a site: the CIFAR ResNets' option-A
shortcut, the most copied CIFAR model, converted to nothing while it was not (its add ties the
strided conv to a shortcut that could not move, so every move broke the forward)."""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dynopool_convert import convert, scale_parameters
from dynopool_convert.budget import fit_to_budget
from dynopool_convert.cost_model import CostModel
from dynopool_convert.flops import count_flops
from dynopool_convert.report import build_report
from dynopool_convert.sites import slice_steps


class OptionABlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.pad = (cout - cin) // 2

    def forward(self, x):
        shortcut = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad)) if self.pad else x
        return F.relu(self.conv2(F.relu(self.conv1(x))) + shortcut)


class CifarResNet(nn.Module):
    """akamaster/pytorch_resnet_cifar10's layout, one block per stage (its global pool reads the
    kernel off the map's width: square maps only; a mean here, so both axes move)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 1, 1)
        self.stages = nn.Sequential(OptionABlock(8, 8, 1), OptionABlock(8, 16, 2), OptionABlock(16, 32, 2))
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        return self.fc(self.stages(F.relu(self.stem(x))).mean((2, 3)))


@pytest.mark.parametrize("index, steps", [
    ((slice(None), slice(None), slice(None, None, 2), slice(None, None, 2)), (2, 2)),
    ((Ellipsis, slice(None, None, 2), slice(None, None, 3)), (2, 3)),
    ((slice(None), slice(None), slice(0, None, 2), slice(None, None, 2)), (2, 2)),
])
def test_slice_steps_reads_subsampling_of_the_last_two_axes(index, steps):
    assert slice_steps(index) == steps


@pytest.mark.parametrize("index", [
    (slice(None), slice(None), slice(1, None, 2), slice(None, None, 2)),  # an offset: not a plain step
    (slice(None), slice(None), slice(None, 8, 2), slice(None, None, 2)),  # a crop too
    (slice(None), slice(None, None, 2), slice(None), slice(None)),  # channels
    (slice(None), slice(None), slice(None), slice(None)),  # nothing
    (Ellipsis, slice(None, None, 2)),  # one axis: rotary embeddings' channel split of (N, heads, L, C)
    (slice(None), slice(None), slice(None, None, 2), slice(None)),
    (0, slice(None, None, 2)),  # an integer index
    (Ellipsis, Ellipsis),
    slice(None, None, 2),  # the batch
])
def test_slice_steps_refuses_anything_else(index):
    assert slice_steps(index) is None


def test_option_a_shortcut_is_tied_to_its_strided_conv_and_learns():
    r = convert(CifarResNet(), (3, 32, 32))
    sites = {s.name: s for s in r.plan.sites}
    for stage in ("1", "2"):
        conv, cut = sites[f"stages.{stage}.conv1"], sites[f"stages.{stage}.getitem"]
        assert conv.status == cut.status == "converted" and conv.group == cut.group
    assert sites["stages.1.getitem"].group != sites["stages.2.getitem"].group
    rng = random.Random(0)
    x = torch.randn(2, 3, 32, 32)
    for _ in range(5):  # any strides: both branches of every add keep one size
        with torch.no_grad():
            for p in scale_parameters(r.model):
                p.copy_(torch.tensor([rng.uniform(0.7, 3.0), rng.uniform(0.7, 3.0)]))
        assert r.model(x).shape == (2, 10)


def test_option_a_is_exact_at_init_and_follows_the_budget():
    torch.manual_seed(0)
    original = CifarResNet().eval()
    r = convert(original, (3, 32, 32), placement="exact")
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(r.model.eval()(x), original(x))
    cost = CostModel(r.model, (3, 32, 32))
    with torch.no_grad():
        for p, s in zip(scale_parameters(r.model), ([2.6, 3.1], [1.7, 2.4])):
            p.copy_(torch.tensor(s))
    assert cost.flops() == count_flops(r.model, (3, 32, 32))
    budget = int(0.6 * count_flops(original, (3, 32, 32)))
    fit = fit_to_budget(r.model, budget, (3, 32, 32), cost)
    assert fit.final_flops <= budget and fit.final_flops == count_flops(r.model, (3, 32, 32))
    report = build_report(r.model, r.plan.to_dict(), source=None, input_size=(3, 32, 32))
    assert {s["name"] for s in report["sites"]} >= {"stages.1.getitem", "stages.2.getitem"}
