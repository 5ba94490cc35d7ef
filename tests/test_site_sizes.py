"""Grid sizes computed from a site's input (``site_sizes.py``): PVT's and Twins' patch
embeddings return ``(H // p, W // p)`` of the image they were given, and the blocks after them
reshape tokens with those sizes. Such a site's group was reverted ("breaks the forward"); now
those sizes read the site's output, the group learns, and the cost model follows the window
attention that takes the sizes as an argument (a leaf over the grid's tokens, probed), and
queries of one grid over keys of another (PVT's spatial reduction, attention unfused)."""
from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dynopool_convert import convert, scale_parameters
from dynopool_convert.budget import fit_to_budget
from dynopool_convert.cost_model import CostModel
from dynopool_convert.flops import count_flops


class WindowAttention(nn.Module):
    """Twins' locally grouped attention, short: tokens and their grid's ``(H, W)`` in, padded to
    whole windows (control flow on the sizes: fx keeps the module whole)."""

    def __init__(self, dim: int, ws: int = 3) -> None:
        super().__init__()
        self.ws = ws
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        b, _, c = x.shape
        h, w = size
        ws = self.ws
        x = x.view(b, h, w, c)
        pad_b, pad_r = (-h) % ws, (-w) % ws
        if pad_b or pad_r:
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        hp, wp = x.shape[1:3]
        x = x.reshape(b, hp // ws, ws, wp // ws, ws, c).transpose(2, 3).reshape(-1, ws * ws, c)
        q, k, v = self.qkv(x).chunk(3, -1)
        x = (q @ k.transpose(-2, -1)).softmax(-1) @ v
        x = x.reshape(b, hp // ws, wp // ws, ws, ws, c).transpose(2, 3).reshape(b, hp, wp, c)[:, :h, :w]
        return self.proj(x.reshape(b, h * w, c))


class PatchEmbed(nn.Module):
    """PVT's: the grid's size from the image it was given."""

    def __init__(self, cin: int, dim: int, p: int) -> None:
        super().__init__()
        self.p = p
        self.proj = nn.Conv2d(cin, dim, p, stride=p)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        _, _, h, w = x.shape
        x = self.proj(x).flatten(2).transpose(1, 2)
        return x, (h // self.p, w // self.p)


class TwinsLike(nn.Module):
    """Two stages of patch embedding and window attention; the second embedding's input is
    the first stage's tokens reshaped with the sizes the first embedding computed, and its
    token count ``n`` is computed from its input before it runs."""

    def __init__(self) -> None:
        super().__init__()
        self.embed1, self.attn1 = PatchEmbed(3, 16, 4), WindowAttention(16)
        self.embed2, self.attn2 = PatchEmbed(16, 32, 2), WindowAttention(32)
        self.head = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        x, (h, w) = self.embed1(x)
        x = x + self.attn1(x, (h, w))
        x = x.transpose(1, 2).reshape(b, -1, h, w)
        n = (x.shape[2] // 2) * (x.shape[3] // 2)  # size arithmetic before the site runs
        x, size = self.embed2(x)
        x = x + self.attn2(x, size)
        return self.head(x.reshape(b, n, -1).mean(1))


def _set_strides(model: nn.Module, values: list[tuple[float, float]]) -> None:
    with torch.no_grad():
        for p, v in zip(scale_parameters(model), values):
            p.copy_(torch.tensor(v))


def test_sizes_computed_from_a_sites_input_follow_its_output():
    torch.manual_seed(0)
    original = TwinsLike().eval()
    r = convert(original, (3, 32, 32))
    sites = [r.plan.site("embed1.proj"), r.plan.site("embed2.proj")]
    assert [s.status for s in sites] == ["converted", "converted"]
    assert sum("computed from site embed2.proj's input (size over stride) follows its output" in n for n in r.plan.notes) == 1
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(convert(original, (3, 32, 32), placement="exact").model.eval()(x), original(x))
    hooks = {}
    r.model.get_submodule("embed2.proj").register_forward_hook(lambda m, i, o: hooks.update(out=tuple(o.shape[2:])))
    _set_strides(r.model, [(0.7, 1.3), (1.0, 0.6)])  # a grid of 11 x 6, then 5 x 5
    assert r.model.eval()(x).shape == (2, 5) and hooks["out"] != (4, 4)


@pytest.mark.parametrize("placement", ["before", "after", "exact"])
def test_the_cost_model_probes_window_attention_over_the_moved_grid(placement):
    torch.manual_seed(0)
    original = TwinsLike().eval()
    model = convert(original, (3, 32, 32), placement=placement, validate=False).model
    cost, rng = CostModel(model, (3, 32, 32)), random.Random(1)
    init = [tuple(p.tolist()) for p in scale_parameters(model)]  # (under exact: the op's stride)
    seen = set()
    for _ in range(4):  # windows of 3: padding makes the FLOPs no polynomial of the token count
        _set_strides(model, [(h * rng.uniform(0.6, 1.6), w * rng.uniform(0.6, 1.6)) for h, w in init])
        expected = count_flops(model, (3, 32, 32))
        assert cost.flops() == expected
        seen.add(expected)
    assert len(seen) > 2
    _set_strides(model, init)
    # (after: the convs run at stride 1, their cost grows fastest; 0.6 is below its minimum)
    budget = int((0.9 if placement == "after" else 0.6) * count_flops(model, (3, 32, 32)))
    fit = fit_to_budget(model, budget, (3, 32, 32), CostModel(model, (3, 32, 32)))
    assert fit.final_flops <= budget and fit.final_flops == count_flops(model, (3, 32, 32))


class OtherDivisor(nn.Module):
    """``H // 2`` of a stride-4 conv's input is not its output size: left as it is."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, 8, 4, stride=4)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = x.shape[2] // 2
        y = self.proj(x)
        return self.head(y.mean((2, 3))) + half


def test_sizes_that_are_not_the_sites_output_are_left_alone():
    r = convert(OtherDivisor().eval(), (3, 16, 16))
    assert r.plan.site("proj").status == "converted"
    assert not any("follows its output" in n for n in r.plan.notes)


class ReducedKeys(nn.Module):
    """PVT's spatial-reduction attention, unfused: ``q @ k^T`` is ``(h * w) x (h' * w')``, the
    keys' grid shrunk by a strided conv (a site of its own)."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.embed = PatchEmbed(3, dim, 4)
        self.q, self.kv = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim)
        self.sr = nn.Conv2d(dim, dim, 2, stride=2)
        self.head = nn.Linear(dim, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, (h, w) = self.embed(x)
        b, n, c = x.shape
        keys = self.sr(x.transpose(1, 2).reshape(b, c, h, w)).flatten(2).transpose(1, 2)
        k, v = self.kv(keys).chunk(2, -1)
        attn = (self.q(x) @ k.transpose(1, 2)).softmax(-1)
        return self.head((attn @ v).mean(1))


def test_the_cost_model_follows_queries_over_keys_of_another_grid():
    torch.manual_seed(0)
    model = convert(ReducedKeys().eval(), (3, 32, 32), validate=False).model
    assert len(scale_parameters(model)) == 2
    cost, rng = CostModel(model, (3, 32, 32)), random.Random(2)
    seen = set()
    for _ in range(4):
        _set_strides(model, [(rng.uniform(0.6, 1.6), rng.uniform(0.6, 1.6)) for _ in range(2)])
        expected = count_flops(model, (3, 32, 32))
        assert cost.flops() == expected
        seen.add(expected)
    assert len(seen) > 2


class InputUses(nn.Module):
    """``H // 2`` of one input used three ways: to crop the input (keeps the input's size), to
    reshape a stride-2 pool's tokens (follows the pool), next to a stride-2 conv of the same
    input (another site, its own group), and in an assert on the input (never copied)."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Conv2d(3, 4, 2, stride=2)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        torch._assert((h // 2) * 2 == h, "even sizes only")
        crop = x[:, :, : h // 2, : w // 2].mean((2, 3))
        pooled = self.pool(x).flatten(2).reshape(b, c, h // 2, w // 2)
        return torch.cat([crop, pooled.mean((2, 3)), self.down(x).mean((2, 3))], 1)


def test_only_what_reads_the_sites_output_follows_it():
    torch.manual_seed(0)
    r = convert(InputUses().eval(), (3, 16, 16))
    assert r.plan.site("pool").status == r.plan.site("down").status == "converted"
    assert r.plan.site("pool").group != r.plan.site("down").group
    notes = [n for n in r.plan.notes if "follows its output" in n]
    assert notes == ["the grid size computed from site pool's input (size over stride) follows its output"]
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        scale_parameters(r.model)[r.plan.site("pool").group].copy_(torch.tensor([2.7, 2.7]))  # 16 / 2.7 -> 6
        scale_parameters(r.model)[r.plan.site("down").group].copy_(torch.tensor([1.4, 1.4]))
    out = r.model.eval()(x)
    torch.testing.assert_close(out[:, :3], x[:, :, :8, :8].mean((2, 3)))  # the crop of the input, as before


class CeilGrid(nn.Module):
    """A ceil-mode pool's grid computed as ``math.ceil(H / 2)`` of its input (VOLO's way)."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(2, ceil_mode=True)
        self.head = nn.Linear(3, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.pool(x).flatten(2).transpose(1, 2)
        grid = tokens.transpose(1, 2).reshape(b, c, math.ceil(h / 2), math.ceil(w / 2))
        return self.head(grid.mean((2, 3)))


def test_a_ceil_of_the_input_size_over_the_stride_follows_the_output():
    r = convert(CeilGrid().eval(), (3, 15, 15))
    assert r.plan.site("pool").status == "converted"
    assert any("site pool's input (size over stride) follows its output" in n for n in r.plan.notes)


class TokenBlock(nn.Module):
    """Reads the grid its caller stores on it (``blk.H, blk.W = H, W``), as the Swin code's blocks."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.H = self.W = None
        self.mix = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, x):
        b, n, c = x.shape
        y = self.mix(x.transpose(1, 2).reshape(b, c, self.H, self.W))
        return x + y.flatten(2).transpose(1, 2)


class QuarterMerging(nn.Module):
    """The Swin paper code's patch merging: tokens and their grid in, padded on odd sizes."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim)

    def forward(self, x, H, W):
        b, _, c = x.shape
        x = x.view(b, H, W, c)
        if H % 2 == 1 or W % 2 == 1:
            x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(x.view(b, -1, 4 * c))


class GridPassedOn(nn.Module):
    """A patch embedding whose grid is passed on as ints, merged, and handed to the next stage as
    ``(H + 1) // 2``: the merging's site must read its own output there."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 2, stride=2)
        self.block1, self.merge, self.block2 = TokenBlock(8), QuarterMerging(8), TokenBlock(16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        x = self.embed(x)
        H, W = x.size(2), x.size(3)
        x = x.flatten(2).transpose(1, 2)
        self.block1.H, self.block1.W = H, W
        x = self.merge(self.block1(x), H, W)
        H, W = (H + 1) // 2, (W + 1) // 2
        self.block2.H, self.block2.W = H, W
        return self.head(self.block2(x).mean(1))


def test_a_grid_passed_on_as_ints_follows_the_merging_site():
    torch.manual_seed(0)
    model = GridPassedOn().eval()
    r = convert(model, (3, 32, 32), placement="exact")
    assert [(s.name, s.status) for s in r.plan.sites] == [("embed", "converted"), ("merge.cat_patches", "converted")]
    assert not any(g.reason for g in r.plan.converted_groups())  # nothing rounded
    assert any("site merge.cat_patches's input (size over stride) follows its output" in n for n in r.plan.notes)
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(r.model.eval()(x), model(x), atol=1e-6)
    with torch.no_grad():  # the merging alone, from stride 2 to 2.8: its grid is no longer (H + 1) // 2
        r.model.get_submodule("merge.cat_patches_dynopool").stride.fill_(2.8)
    assert torch.isfinite(r.model(x)).all() and r.model.get_submodule("block2").H == 6
