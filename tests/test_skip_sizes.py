"""An upsampling joined with a map of its size follows that map's size (``skip_sizes.py``):
octave convolutions, FPN top-down paths and HRNet's fuse layers add an upsampled low-resolution
branch to a high-resolution one; as a site the upsampling could not keep its output equal to a
map on another path, so it and the groups before it were reverted or pinned."""
from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from torch import nn

from dynopool_convert import convert, scale_parameters
from dynopool_convert.cost_model import CostModel
from dynopool_convert.flops import count_flops
from dynopool_convert.skip_sizes import SKIP_REASON


class Octave(nn.Module):
    """A high-frequency branch at full resolution, a low one at half, exchanged both ways."""

    def __init__(self, upsample_module: bool = False) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 1, 1)
        self.h2h, self.l2h, self.l2l = nn.Conv2d(4, 4, 3, 1, 1), nn.Conv2d(4, 4, 3, 1, 1), nn.Conv2d(4, 4, 3, 1, 1)
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False) if upsample_module else None
        self.down = nn.Conv2d(12, 16, 3, 2, 1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu(self.stem(x))
        h, low = x[:, :4], F.avg_pool2d(x[:, 4:], 2)
        up = self.up(self.l2h(low)) if self.up is not None else F.interpolate(self.l2h(low), scale_factor=2, mode="nearest")
        h2 = self.h2h(h) + up if self.up is None else torch.cat([self.h2h(h), up, h], 1)
        if self.up is None:
            h2 = torch.cat([h2, h, F.interpolate(self.l2l(low), size=h2.shape[-2:], mode="bilinear", align_corners=False)], 1)
        return self.fc(F.relu(self.down(h2)).mean((2, 3)))


def test_the_upsampling_follows_the_branch_it_is_added_to_and_the_pool_learns():
    torch.manual_seed(0)
    original = Octave().eval()
    r = convert(original, (3, 16, 16), placement="exact")
    sites = {s.name: s for s in r.plan.sites}
    assert sites["interpolate"].status == "skipped" and sites["interpolate"].reason == SKIP_REASON
    assert sites["avg_pool2d"].status == "converted" and sites["down"].status == "converted"
    assert any("interpolates to that map's size" in n for n in r.plan.notes)
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(r.model.eval()(x), original(x))  # the same op at the reference, bit for bit
    cost = CostModel(r.model, (3, 16, 16))
    rng = random.Random(0)
    for _ in range(4):
        with torch.no_grad():
            for p in scale_parameters(r.model):
                p.copy_(torch.tensor([rng.uniform(1.3, 3.2), rng.uniform(1.3, 3.2)]))
        assert r.model(x).shape == (2, 10)
        assert cost.flops() == count_flops(r.model, (3, 16, 16))


def test_an_upsample_module_concatenated_with_its_branch_follows_it():
    torch.manual_seed(0)
    original = Octave(upsample_module=True).eval()
    r = convert(original, (3, 16, 16), placement="exact")
    assert r.plan.site("up").reason == SKIP_REASON and r.plan.site("avg_pool2d").status == "converted"
    x = torch.randn(1, 3, 16, 16)
    assert torch.equal(r.model.eval()(x), original(x))
    with torch.no_grad():
        for p in scale_parameters(r.model):
            p.copy_(torch.tensor([2.9, 1.7]))
    assert r.model(x).shape == (1, 10)


class Inexact(nn.Module):
    """Upsampling by 1.5 (7 -> 10: not an exact map onto the partner's size), and one whose
    partner is computed from it: neither is rewritten."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, 1, 1)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        y = F.interpolate(self.conv(x), scale_factor=1.5, mode="nearest")
        z = F.interpolate(y, scale_factor=2, mode="nearest")
        z = z + torch.relu(z)
        return self.fc((y.mean((2, 3)) + z.mean((2, 3))))


def test_inexact_factors_and_self_joins_stay_sites():
    r = convert(Inexact(), (3, 7, 7))
    assert all(s.reason != SKIP_REASON for s in r.plan.sites)
