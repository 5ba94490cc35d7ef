"""Space to depth and patchify-by-reshape models learn their grids (``sites_unshuffle.py``,
``patch_reshape.py``): a ``PixelUnshuffle`` is a patchify site, and a hand-written ViT that
cuts patches with ``reshape`` or einops' ``Rearrange`` gets one in front of that reshape, with
its position embedding (a parameter, a buffer or a constant, sliced or cast) following the grid.
Until then such models had no site at all ("no learned group")."""
from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from einops.layers.torch import Rearrange
from torch import nn

from dynopool_convert import convert, scale_parameters
from dynopool_convert.budget import fit_to_budget
from dynopool_convert.cost_model import CostModel
from dynopool_convert.flops import count_flops


class SpaceToDepth(nn.Module):
    """Downsampling only by ``nn.PixelUnshuffle`` and by ``F.pixel_unshuffle``."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.s2d = nn.PixelUnshuffle(2)
        self.c2 = nn.Conv2d(16, 8, 3, padding=1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = F.pixel_unshuffle(F.relu(self.c2(self.s2d(F.relu(self.c1(x))))), 2)
        return self.fc(x.mean((2, 3)))


class ReshapeViT(nn.Module):
    """MAE's patchify (reshape, einsum, reshape), a learned embedding of the grid's tokens and
    a ``TransformerEncoderLayer`` (attention over them in one leaf)."""

    def __init__(self, size: int = 16, p: int = 4, dim: int = 16) -> None:
        super().__init__()
        self.p = p
        self.proj = nn.Linear(3 * p * p, dim)
        self.pos = nn.Parameter(torch.randn(1, (size // p) ** 2, dim))
        self.block = nn.TransformerEncoderLayer(dim, 2, 32, batch_first=True, dropout=0.0)
        self.fc = nn.Linear(dim, 10)

    def forward(self, x):
        b, c, h, w = x.shape
        p = self.p
        x = torch.einsum("nchpwq->nhwpqc", x.reshape(b, c, h // p, p, w // p, p)).reshape(b, (h // p) * (w // p), p * p * c)
        return self.fc(self.block(self.proj(x) + self.pos).mean(1))


class RearrangeViT(nn.Module):
    """lucidrains/vit-pytorch's layout: ``Rearrange`` patches, a class token, ``x +=
    pos_embedding[:, :(n + 1)]``; or (``table``) simple_vit's fixed 2-D table, a plain tensor
    attribute added through ``.to(device, dtype)``."""

    def __init__(self, size: int = 16, p: int = 4, dim: int = 16, table: bool = False) -> None:
        super().__init__()
        self.table = table
        self.patches = nn.Sequential(Rearrange("b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=p, p2=p),
                                     nn.LayerNorm(3 * p * p), nn.Linear(3 * p * p, dim))
        n = (size // p) ** 2
        if table:
            self.pos_embedding = torch.randn(n, dim)
        else:
            self.pos_embedding = nn.Parameter(torch.randn(1, n + 1, dim))
            self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.mix = nn.Linear(dim, dim)
        self.fc = nn.Linear(dim, 10)

    def forward(self, img):
        x = self.patches(img)
        if self.table:
            x = x + self.pos_embedding.to(img.device, dtype=x.dtype)
        else:
            b, n, _ = x.shape
            x = torch.cat((repeat(self.cls_token, "1 1 d -> b 1 d", b=b), x), dim=1)
            x += self.pos_embedding[:, :(n + 1)]
        attn = (x @ x.transpose(1, 2)).softmax(-1)
        return self.fc(self.mix(attn @ x)[:, 0])


class FixedReshape(ReshapeViT):
    """Patches by a reshape with its sizes written in: cannot move."""

    def forward(self, x):
        x = x.reshape(x.shape[0], 3, 4, 4, 4, 4).permute(0, 2, 4, 3, 5, 1).reshape(x.shape[0], 16, 48)
        return self.fc(self.block(self.proj(x) + self.pos).mean(1))


def _set_strides(model: nn.Module, values: list[tuple[float, float]]) -> None:
    with torch.no_grad():
        for p, v in zip(scale_parameters(model), values):
            p.copy_(torch.tensor(v))


def _cost_model_is_fvcore(model: nn.Module, size: tuple[int, int, int], seed: int = 0) -> None:
    cost, rng = CostModel(model, size), random.Random(seed)
    for _ in range(3):
        _set_strides(model, [(rng.uniform(0.55, 1.6), rng.uniform(0.55, 1.6)) for _ in scale_parameters(model)])
        assert cost.flops() == count_flops(model, size)


@pytest.mark.parametrize("placement", ["before", "after", "exact"])
def test_pixel_unshuffle_is_a_patchify_site_under_every_placement(placement):
    torch.manual_seed(0)
    original = SpaceToDepth().eval()
    r = convert(original, (3, 16, 16), placement=placement)
    sites = [r.plan.site("s2d"), r.plan.site("pixel_unshuffle")]
    assert [s.status for s in sites] == ["converted", "converted"]
    assert all(r.plan.groups[s.group].multiple == [2, 2] for s in sites)
    x = torch.randn(2, 3, 16, 16)
    if placement == "exact":  # a resize that is the identity at init (DynOPool at stride 1 is a slight blur)
        assert torch.equal(r.model.eval()(x), original(x))
    else:
        assert all(s.placement == "patchify" for s in sites)
        _set_strides(r.model, [(1.5, 1.2), (0.6, 1.0)])  # 16x16 -> 10x14 (multiples of 2) -> 5x7 -> 8x6
        hooks = {}
        r.model.get_submodule("s2d").register_forward_hook(lambda m, i, o: hooks.update(s2d=tuple(o.shape[2:])))
        assert r.model(x).shape == (2, 10) and hooks["s2d"] == (5, 7)
        _cost_model_is_fvcore(r.model, (3, 16, 16))


def test_a_reshape_patchify_vit_learns_its_grid_and_its_budget_holds():
    torch.manual_seed(0)
    original = ReshapeViT().eval()
    r = convert(original, (3, 16, 16))
    site = r.plan.site("reshape_patches")
    assert site.status == "converted" and r.plan.groups[site.group].multiple == [4, 4]
    assert site.op == "patches of 4x4 by reshape"
    assert any("patchify by reshape (patch 4)" in n for n in r.plan.notes)
    assert any("position embedding pos [1, 16, 16] follows the grid of site reshape_patches" in n for n in r.plan.notes)
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(convert(original, (3, 16, 16), placement="exact").model.eval()(x), original(x))
    _set_strides(r.model, [(0.7, 1.3)])  # 16 / 0.7 = 22.9 -> 24 (6 patches), 16 / 1.3 = 12.3 -> 12 (3)
    assert r.model(x).shape == (2, 10)
    _cost_model_is_fvcore(r.model, (3, 16, 16))
    _set_strides(r.model, [(1.0, 1.0)])
    budget = int(0.6 * count_flops(original, (3, 16, 16)))
    fit = fit_to_budget(r.model, budget, (3, 16, 16), CostModel(r.model, (3, 16, 16)))
    assert fit.final_flops <= budget and fit.final_flops == count_flops(r.model, (3, 16, 16))


@pytest.mark.parametrize("table", [False, True])
def test_a_rearrange_vit_learns_with_its_sliced_or_cast_position_table(table):
    torch.manual_seed(0)
    original = RearrangeViT(table=table).eval()
    r = convert(original, (3, 16, 16))
    site = r.plan.site("patches.0_patches")
    assert site.status == "converted" and site.op == "patches of 4x4 by rearrange"
    prefix = 0 if table else 1
    assert any(f"follows the grid of site patches.0_patches (nc, {prefix} prefix tokens, 4x4" in n for n in r.plan.notes)
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(convert(original, (3, 16, 16), placement="exact").model.eval()(x), original(x))
    _set_strides(r.model, [(0.75, 0.75)])  # 16 / 0.75 = 21.3 -> 20 (5x5 patches): the table resampled to 25
    assert r.model(x).shape == (2, 10)
    _cost_model_is_fvcore(r.model, (3, 16, 16))


def test_a_reshape_with_its_sizes_written_in_is_reverted_with_the_reason():
    r = convert(FixedReshape().eval(), (3, 16, 16))
    site = r.plan.site("reshape_patches")
    assert site.status == "reverted" and "breaks the forward" in site.reason
    x = torch.randn(1, 3, 16, 16)
    assert r.model(x).shape == (1, 10)


class EinopsWindows(nn.Module):
    """A strided conv, then 4x4 windows by ``Rearrange`` (windows the batch, pixels the tokens):
    a window partition, not patches."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, 2, 1)
        self.windows = Rearrange("b c (h p1) (w p2) -> (b h w) (p1 p2) c", p1=4, p2=4)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(self.windows(self.conv(x)).mean(1)).mean(0, keepdim=True)


def test_window_partitions_by_reshape_are_not_taken_for_patches():
    from _convert_models import WindowNet

    for model in (WindowNet(), EinopsWindows()):
        r = convert(model, (3, 32, 32))
        assert not [s.name for s in r.plan.sites if s.name.endswith("_patches")]
        assert not [n for n in r.plan.notes if "patchify by" in n]


class UnfoldViT(nn.Module):
    """Patches by im2col: ``F.unfold(x, p, stride=p)`` (or ``nn.Unfold``), tokens by a transpose."""

    def __init__(self, module: bool = False, size: int = 16, p: int = 4, dim: int = 16) -> None:
        super().__init__()
        self.unfold = nn.Unfold(p, stride=p) if module else None
        self.p = p
        self.proj = nn.Linear(3 * p * p, dim)
        self.pos = nn.Parameter(torch.randn(1, (size // p) ** 2, dim))
        self.fc = nn.Linear(dim, 10)

    def forward(self, x):
        patches = self.unfold(x) if self.unfold is not None else F.unfold(x, self.p, stride=self.p)
        t = self.proj(patches.transpose(1, 2)) + self.pos
        return self.fc(((t @ t.transpose(1, 2)).softmax(-1) @ t).mean(1))


@pytest.mark.parametrize("module", [False, True])
def test_an_unfold_patchify_vit_learns_its_grid(module):
    torch.manual_seed(0)
    original = UnfoldViT(module).eval()
    r = convert(original, (3, 16, 16))
    site = next(s for s in r.plan.sites if s.name.endswith("_patches"))
    assert site.status == "converted" and r.plan.groups[site.group].multiple == [4, 4]
    assert site.op == "patches of 4x4 by unfold"
    assert any("position embedding pos [1, 16, 16] follows the grid" in n for n in r.plan.notes)
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(convert(original, (3, 16, 16), placement="exact").model.eval()(x), original(x))
    _set_strides(r.model, [(0.7, 1.3)])
    assert r.model(x).shape == (2, 10)
    _cost_model_is_fvcore(r.model, (3, 16, 16))


class SquareGridPool(nn.Module):
    """vit-pytorch's PiT pooling: the patch tokens back to a square map of side
    ``int(sqrt(n))`` (fx refused ``int`` of a traced value), a strided depthwise conv, tokens."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.down = nn.Conv2d(dim, dim, 3, stride=2, padding=1, groups=dim)

    def forward(self, x):
        cls_token, tokens = x[:, :1], x[:, 1:]
        grid = rearrange(tokens, "b (h w) c -> b c h w", h=int(math.sqrt(tokens.shape[1])))
        return torch.cat((cls_token, self.down(grid).flatten(2).transpose(1, 2)), dim=1)


class PiTLike(RearrangeViT):
    def __init__(self) -> None:
        super().__init__(size=32)
        self.pool = SquareGridPool()

    def forward(self, img):
        x = self.patches(img)
        b, n, _ = x.shape
        x = torch.cat((repeat(self.cls_token, "1 1 d -> b 1 d", b=b), x), dim=1)
        x = self.pool(x + self.pos_embedding[:, :(n + 1)])
        attn = (x @ x.transpose(1, 2)).softmax(-1)
        return self.fc(self.mix(attn @ x)[:, 0])


def test_a_token_grid_rebuilt_by_int_sqrt_traces_learns_square_and_keeps_its_budget():
    torch.manual_seed(0)
    r = convert(PiTLike().eval(), (3, 32, 32))
    patches, down = r.plan.site("patches.0_patches"), r.plan.site("pool.down")
    assert patches.status == down.status == "converted"
    assert r.plan.groups[patches.group].square  # one axis alone breaks it: 11 x 8 tokens read as 9 rows
    assert r.model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    _cost_model_is_fvcore(r.model, (3, 32, 32))
    budget = int(0.6 * count_flops(PiTLike(), (3, 32, 32)))
    _set_strides(r.model, [(1.0, 1.0), (2.0, 2.0)])
    fit = fit_to_budget(r.model, budget, (3, 32, 32), CostModel(r.model, (3, 32, 32)))
    assert fit.final_flops <= budget and fit.final_flops == count_flops(r.model, (3, 32, 32))


class DenseReshapeViT(ReshapeViT):
    """Patches by reshape, then a dense head upsampled back to the input's size (SETR-style),
    read off the input again or (``shared``) from the one ``B, C, H, W = x.shape`` read that also
    feeds the patches and the tokens back to a map: only the reshapes follow the moved grid."""

    def __init__(self, shared: bool) -> None:
        super().__init__()
        self.shared = shared

    def forward(self, x):
        b, c, h, w = x.shape
        p = self.p
        t = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)
        t = self.proj(t) + self.pos
        grid = t.transpose(1, 2).reshape(b, t.shape[2], h // p, w // p)
        return F.interpolate(grid, size=(h, w) if self.shared else x.shape[-2:], mode="bilinear")


@pytest.mark.parametrize("shared", [False, True])
def test_only_the_size_reads_that_feed_the_patches_follow_the_moved_grid(shared):
    r = convert(DenseReshapeViT(shared).eval(), (3, 16, 16))
    assert r.plan.site("reshape_patches").status == "converted"
    _set_strides(r.model, [(0.7, 1.3)])  # patches of a 24 x 12 image: a 6 x 3 grid, upsampled to 16 x 16
    assert r.model(torch.randn(2, 3, 16, 16)).shape == (2, 16, 16, 16)


def test_an_unfold_that_drops_pixels_is_not_taken_for_patches():
    r = convert(UnfoldViT(size=16).eval(), (3, 18, 18))  # 4x4 patches of an 18 px image: 2 px dropped
    assert not [s for s in r.plan.sites if s.name.endswith("_patches")]
