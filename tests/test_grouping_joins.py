"""Tying through every kind of join (issue 19): each model joins two stride-2 branches with
different kernels, so only the tie keeps their sizes equal once one of them moves."""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import register_notrace_module
from torch import nn

from dynopool_convert import convert, scale_parameters


class _Branches(nn.Module):
    """Two stride-2 branches of different kernel sizes; ``join`` combines them."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.b = nn.Conv2d(3, 8, 5, stride=2, padding=2)
        self.head = nn.Linear(8, 4)

    def join(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x):
        y = self.join(self.a(x), self.b(x))
        return self.head(y.mean((-2, -1)))


class Stack(_Branches):  # timm's SelectiveKernel (skresnet)
    def join(self, a, b):
        return torch.stack([a, b], dim=1).sum(1)


class CatTuple(_Branches):  # timm's MixedConv2d (mixnet), inception blocks
    def join(self, a, b):
        return torch.cat((a, b), 1)[:, :8]


class CatHeight(_Branches):  # concatenated along a spatial axis: the widths must match
    def join(self, a, b):
        return torch.cat([a, b], dim=2)


class Getitem(_Branches):  # res2net / inception_next: split, then one chunk joins another branch
    def join(self, a, b):
        first, second = torch.split(a, 4, dim=1)
        return torch.cat([torch.chunk(b, 2, dim=1)[1] * first, second.relu()], 1)


class Methods(_Branches):
    def join(self, a, b):
        return a.add(b).mul_(b).add_(a)


class ExpandAs(_Branches):  # coordinate attention: an (H, 1) gate from one branch on the other
    def join(self, a, b):
        return a.mean(3, keepdim=True).expand_as(b)


class Where(_Branches):
    def join(self, a, b):
        return torch.where(a > 0, a, b)


class Einsum(_Branches):  # correlation over the spatial axes
    def join(self, a, b):
        return torch.einsum("nchw,nchw->nc", a, b)[:, :, None, None].expand(-1, -1, 2, 2)


class Matmul(_Branches):
    def join(self, a, b):
        return a @ b.transpose(-1, -2)


@register_notrace_module
class _AddLeaf(nn.Module):
    def forward(self, a, b):
        return a + b


class Leaf(_Branches):  # a module fx does not enter, called with both maps
    def __init__(self) -> None:
        super().__init__()
        self.combine = _AddLeaf()

    def join(self, a, b):
        return self.combine(a, b)


@register_notrace_module
class _HalvesLeaf(nn.Module):
    def forward(self, x):
        return x[:, :4], x[:, 4:]


class LeafTuple(_Branches):  # a leaf module's tuple output, taken apart by getitem
    def __init__(self) -> None:
        super().__init__()
        self.halves = _HalvesLeaf()

    def join(self, a, b):
        first, second = self.halves(a)
        return torch.cat([first * b[:, :4], second], 1)


class GridSample(nn.Module):
    """The output of ``grid_sample`` has its grid's size, not its input's: warping a full-size map
    by a flow from one strided branch, then adding another strided branch."""

    def __init__(self) -> None:
        super().__init__()
        self.flow = nn.Conv2d(3, 2, 3, stride=2, padding=1)
        self.b = nn.Conv2d(3, 8, 5, stride=2, padding=2)
        self.feat = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        grid = torch.tanh(self.flow(x)).permute(0, 2, 3, 1)
        warped = F.grid_sample(self.feat(x), grid, align_corners=False)
        return self.head((warped + self.b(x)).mean((-2, -1)))


JOINS = [Stack, CatTuple, CatHeight, Getitem, Methods, ExpandAs, Where, Einsum, Matmul, Leaf, LeafTuple]


def _strided_groups(result) -> list[list[str]]:
    return [sorted(g.sites) for g in result.plan.groups if g.status == "converted"]


def _survives_moves(model: nn.Module, x: torch.Tensor) -> None:
    """Each stride parameter on its own scaled by 1.3 and 1/1.3: forward and backward run."""
    for p in scale_parameters(model):
        for factor in (1.3, 1 / 1.3):
            with torch.no_grad():
                p.mul_(factor)
            try:
                model(x).sum().backward()
            finally:
                with torch.no_grad():
                    p.div_(factor)
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("cls", JOINS, ids=lambda c: c.__name__)
def test_branches_joined_tie(cls):
    r = convert(cls(), input_size=(3, 32, 32))
    assert _strided_groups(r) == [["a", "b"]]
    _survives_moves(r.model, torch.randn(2, 3, 32, 32))


def test_grid_sample_output_is_sized_by_its_grid():
    r = convert(GridSample(), input_size=(3, 32, 32))
    assert _strided_groups(r) == [["b", "flow"]]
    _survives_moves(r.model, torch.randn(2, 3, 32, 32))


def test_broadcast_operands_do_not_tie():
    class Gate(_Branches):
        def join(self, a, b):
            return a * b.mean((2, 3), keepdim=True)

    r = convert(Gate(), input_size=(3, 32, 32))
    assert _strided_groups(r) == [["a"], ["b"]]


def test_timm_selective_kernel_branches_tie():
    """skresnet18's stride-2 SelectiveKernel joins a 3x3 and a dilated 3x3 path by torch.stack."""
    r = convert(timm.create_model("skresnet18"), input_size=(3, 64, 64))
    tied = [sorted(g) for g in _strided_groups(r) if len(g) > 1]
    assert ["layer2.0.conv1.paths.0.conv", "layer2.0.conv1.paths.1.conv", "layer2.0.downsample.0"] in tied
    _survives_moves(r.model.eval(), torch.randn(1, 3, 64, 64))


class _TwoChains(nn.Module):
    """HRNet's fusion in small: two chains of two stride-2 convs from one map, summed. The last
    convs are tied by the add; the first ones size their inputs, so they must move together too."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 1, 1)
        self.a1, self.a2 = nn.Conv2d(8, 8, 3, 2, 1), nn.Conv2d(8, 8, 3, 2, 1)
        self.b1, self.b_mid, self.b2 = nn.Conv2d(8, 8, 3, 2, 1), nn.Conv2d(8, 8, 3, 1, 1), nn.Conv2d(8, 8, 3, 2, 1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        a = self.a2(torch.relu(self.a1(x)))
        b = self.b2(torch.relu(self.b_mid(torch.relu(self.b1(x)))))
        return self.fc((a + b).mean((2, 3)))


def test_the_groups_sizing_a_groups_inputs_are_tied_too():
    r = convert(_TwoChains(), (3, 16, 16))
    group = {s.name: s.group for s in r.plan.sites}
    assert group["a1"] == group["b1"] and group["a2"] == group["b2"] and group["a1"] != group["a2"]
    assert r.plan.summary()["converted"] == 4 and r.plan.summary()["pinned"] == 0
    with torch.no_grad():
        for p, s in zip(scale_parameters(r.model), ([2.7, 1.5], [1.6, 2.9])):
            p.copy_(torch.tensor(s))
    assert r.model(torch.randn(1, 3, 16, 16)).shape == (1, 10)


class TokenAttention(nn.Module):
    """Queries from one strided conv's grid over keys and values of another's, as 4-D head tensors
    (``q @ k^T`` of tokens, not of maps): the grids need not keep one size."""

    def __init__(self) -> None:
        super().__init__()
        self.qconv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.kconv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        q = self.qconv(x).flatten(2).transpose(1, 2).reshape(x.shape[0], -1, 2, 4).transpose(1, 2)
        k = self.kconv(x).flatten(2).transpose(1, 2).reshape(x.shape[0], -1, 2, 4).transpose(1, 2)
        out = (q @ k.transpose(-2, -1)).softmax(-1) @ k
        return self.head(out.transpose(1, 2).flatten(2).mean(1))


def test_attention_between_two_grids_ties_nothing():
    r = convert(TokenAttention(), input_size=(3, 16, 16))
    assert r.plan.site("qconv").group != r.plan.site("kconv").group  # were tied, by q @ k^T read as maps
    assert not any("joins" in note for note in r.plan.notes)
