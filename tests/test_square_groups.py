"""Groups whose axes share one stride (``Group.square``, ``DynOPool(square=True)``): where a layer
after a group reads one axis's size for both (akamaster's CIFAR ResNets pool with
``F.avg_pool2d(out, out.size()[3])``; hand-written transformers rebuild a token grid of side
``int(sqrt(N))``), moving one axis alone breaks the forward. Such groups were pinned (their maps
kept at the reference size); they now learn, square."""
from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dynopool_convert import DynOPool, convert, scale_parameters
from dynopool_convert.budget import fit_to_budget
from dynopool_convert.checkpoint import load_checkpoint, save_checkpoint
from dynopool_convert.cost_model import CostModel
from dynopool_convert.flops import count_flops
from dynopool_convert.report import build_report
from test_strided_slice import OptionABlock as Block  # akamaster's option-A block


class SquarePoolResNet(nn.Module):
    """akamaster/pytorch_resnet_cifar10's layout, one block per stage, with its global pool:
    the kernel is the map's width, so a map taller than wide pools to nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 1, 1)
        self.stages = nn.Sequential(Block(8, 8, 1), Block(8, 16, 2), Block(16, 32, 2))
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        out = self.stages(F.relu(self.stem(x)))
        out = F.avg_pool2d(out, out.size()[3])
        return self.fc(out.view(out.size(0), -1))


class ToGrid(nn.Module):
    """Tokens back to a square grid of side ``int(sqrt(N))`` (fx cannot trace ``int`` of a size:
    the module is kept whole, a leaf)."""

    def forward(self, t):
        b, n, c = t.shape
        side = int(math.sqrt(n))
        return t.transpose(1, 2).reshape(b, c, side, side)


class SqrtGridViT(nn.Module):
    """A hand-written hybrid: patchify, one attention layer over the tokens, then the token grid
    rebuilt as a square for a conv."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 16, 4, 4)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.grid = ToGrid()
        self.conv = nn.Conv2d(16, 16, 3, 1, 1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = t + self.attn(t, t, t, need_weights=False)[0]
        return self.fc(F.relu(self.conv(self.grid(t))).mean((2, 3)))


def test_square_dynopool_runs_both_axes_at_the_mean_stride():
    pool = DynOPool((2.0, 3.0), square=True)
    assert pool.stride_value == (2.5, 2.5) and pool.output_size((20, 30)) == (8, 12)
    x = torch.randn(1, 2, 20, 20, requires_grad=True)
    y = pool(x)
    assert y.shape == (1, 2, 8, 8)
    y.sum().backward()
    assert pool.stride.grad is not None and pool.stride.grad[0] == pool.stride.grad[1]
    pool.clamp_()
    assert pool.stride.tolist() == [2.5, 2.5]
    assert "square=True" in repr(pool)
    plain = DynOPool((2.0, 3.0))
    assert plain.stride_value == (2.0, 3.0) and plain(x).shape == (1, 2, 10, 7)


def test_square_only_pool_makes_its_groups_square_instead_of_pinned():
    r = convert(SquarePoolResNet(), (3, 32, 32))
    groups = r.plan.converted_groups()
    assert len(groups) == 2 and all(g.square for g in groups)
    assert not r.plan.pinned_sites()
    assert "both axes share one stride" in groups[-1].reason
    pools = [m for m in r.model.modules() if isinstance(m, DynOPool)]
    assert pools and all(m.square for m in pools)
    rng = random.Random(0)
    x = torch.randn(2, 3, 32, 32)
    for _ in range(6):  # any raw values, unequal axes too: the maps stay square and the pool works
        with torch.no_grad():
            for p in scale_parameters(r.model):
                p.copy_(torch.tensor([rng.uniform(1.2, 3.0), rng.uniform(1.2, 3.0)]))
        assert r.model(x).shape == (2, 10)


def test_square_groups_cost_model_matches_fvcore_and_a_budget_fits():
    torch.manual_seed(0)
    original = SquarePoolResNet().eval()
    r = convert(original, (3, 32, 32), placement="exact")
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(r.model.eval()(x), original(x))  # exact at init
    cost = CostModel(r.model, (3, 32, 32))
    with torch.no_grad():
        for p, s in zip(scale_parameters(r.model), ([2.3, 3.1], [1.7, 2.6])):
            p.copy_(torch.tensor(s))
    assert cost.flops() == count_flops(r.model, (3, 32, 32))
    budget = int(0.6 * count_flops(original, (3, 32, 32)))
    fit = fit_to_budget(r.model, budget, (3, 32, 32), cost)
    assert fit.final_flops <= budget and fit.final_flops == count_flops(r.model, (3, 32, 32))
    for m in r.model.modules():
        if isinstance(m, DynOPool):
            assert m.stride_value[0] == m.stride_value[1]


def test_square_cost_gradient_is_the_mean_of_both_axes():
    r = convert(SquarePoolResNet(), (3, 32, 32))
    cost = CostModel(r.model, (3, 32, 32))
    params = scale_parameters(r.model)
    cost().backward()
    for p in params:
        assert p.grad is not None and p.grad[0] == p.grad[1] and p.grad[0] < 0


def test_square_survives_the_checkpoint_fine_tuning_and_the_report(tmp_path):
    from dynopool_convert.training import finetune

    size = (3, 16, 16)
    r = convert(SquarePoolResNet(), size)
    path = tmp_path / "c.pt"
    budget = int(0.7 * count_flops(r.model, size))
    save_checkpoint(path, r.model, r.plan, f"{__name__}:SquarePoolResNet", input_size=size, budget=budget)
    ck = load_checkpoint(path, trust_source=True)
    assert all(g.square for g in ck.plan.converted_groups())
    assert all(m.square for m in ck.model.modules() if isinstance(m, DynOPool))
    res = finetune(path, tmp_path / "run", trust_source=True, overrides={
        "data": "synthetic:classes=10,train=32,val=8",
        "train": {"steps": 4, "batch_size": 8, "scale_lr": 0.2, "device": "cpu", "size_search": False}})
    assert res.completed
    tuned = load_checkpoint(tmp_path / "run" / "last.pt", trust_source=True).model
    strides = [p.detach().tolist() for p in scale_parameters(tuned)]
    assert all(s_h == s_w for s_h, s_w in strides) and strides != [[2.0, 2.0]] * 2  # learned, square
    assert count_flops(tuned, size) <= budget
    report = build_report(r.model, r.plan.to_dict(), source=None, input_size=(3, 32, 32))
    assert [g["square"] for g in report["groups"]] == [True, True]


def test_sqrt_token_grid_lets_the_patch_embedding_learn_square():
    r = convert(SqrtGridViT(), (3, 32, 32))
    site = r.plan.site("patch")
    assert site.status == "converted"
    assert r.plan.groups[site.group].square
    with torch.no_grad():
        scale_parameters(r.model)[0].copy_(torch.tensor([5.0, 6.0]))
    assert r.model(torch.randn(1, 3, 32, 32)).shape == (1, 10)


@pytest.mark.parametrize("size", [(3, 32, 48)])
def test_non_square_input_is_not_made_square(size):
    """A model that runs at a non-square input reads no single axis for both: its groups stay free."""

    class Free(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, 2, 1)
            self.fc = nn.Linear(8, 10)

        def forward(self, x):
            return self.fc(F.relu(self.conv(x)).mean((2, 3)))

    r = convert(Free(), size)
    assert [g.square for g in r.plan.converted_groups()] == [False]


def test_axis_fill_moves_a_square_group_on_both_axes():
    r = convert(SquarePoolResNet(), (3, 32, 32))
    budget = int(0.5 * count_flops(r.model, (3, 32, 32)))
    fit = fit_to_budget(r.model, budget, (3, 32, 32), axis_fill=True)
    assert fit.final_flops <= budget
    assert all(s_h == s_w for s_h, s_w in (p.detach().tolist() for p in scale_parameters(r.model)))


def test_input_site_of_a_square_only_model_is_square_too():
    r = convert(SquarePoolResNet(), (3, 32, 32), input_site=True)
    assert r.plan.site("input_resize").status == "converted"
    assert all(g.square for g in r.plan.converted_groups())


class SEBlock(nn.Module):
    """kuangliu/pytorch-cifar's SENet block: the gate pools with a kernel read off the height."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False)
        self.fc1, self.fc2 = nn.Conv2d(cout, 4, 1), nn.Conv2d(4, cout, 1)

    def forward(self, x):
        out = F.relu(self.conv(x))
        w = torch.sigmoid(self.fc2(F.relu(self.fc1(F.avg_pool2d(out, out.size(2))))))
        return F.relu(out * w + self.shortcut(x))


class SENet(nn.Module):
    """Two SE stages, then a pool of fixed kernel 4 before a linear layer (kuangliu's
    ``F.avg_pool2d(out, 4)``: larger maps than the reference break it)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 1, 1)
        self.stages = nn.Sequential(SEBlock(8, 16, 2), SEBlock(16, 16, 2))
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        out = F.avg_pool2d(self.stages(F.relu(self.stem(x))), 4)
        return self.fc(out.view(out.size(0), -1))


def test_a_group_that_needs_square_maps_and_a_cap_gets_both():
    r = convert(SENet(), (3, 16, 16))
    groups = {g.sites[0]: g for g in r.plan.groups}
    for site in ("stages.0.conv", "stages.1.conv"):
        g = groups[site]
        assert g.status == "converted" and g.square and g.r_max == 0.5, (site, g)
    assert not r.plan.pinned_sites()
    cost = CostModel(r.model, (3, 16, 16))
    with torch.no_grad():
        for p, s in zip(scale_parameters(r.model), ([2.3, 2.9], [2.5, 3.3])):
            p.copy_(torch.tensor(s))
    assert cost.flops() == count_flops(r.model, (3, 16, 16))


def test_square_sizes_agree_between_the_host_the_forward_and_the_count():
    """The mean of float32 strides, taken in float64, can round a size the other way from the
    mean the forward takes: (1.1, 1.3) in float32 average to 1.19999998 in float64, and 27 px
    over it is 22.5000002 (23), where the float32 mean gives 22."""
    pool = DynOPool((1.1, 1.3), aggregate="mean", square=True)
    out = pool.output_size((27, 27))
    assert tuple(pool(torch.randn(1, 1, 27, 27)).shape[-2:]) == out
    net = nn.Sequential(pool, nn.Conv2d(1, 1, 1, bias=False))
    assert count_flops(net, (1, 27, 27)) == count_flops(nn.Conv2d(1, 1, 1, bias=False), (1, *out)) + 20 * out[0] * out[1]
