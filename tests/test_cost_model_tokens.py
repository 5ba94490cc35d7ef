"""The cost model on ViT-style models: token sequences (h*w + class/register tokens) and
attention maps ((h*w + e)^2), exact against fvcore, straight-through gradient, budgets."""
from __future__ import annotations

import random
import re

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from budget_models import finite_difference_signs, randomise_strides
from dynopool_cli.app import main
from dynopool_convert import DynOPool, build_model, convert, scale_parameters
from dynopool_convert.budget import fit_to_budget, project_to_budget
from dynopool_convert.cost_model import TOTAL_TOLERANCE, CostModel
from dynopool_convert.errors import UnsupportedModelError
from dynopool_convert.flops import count_flops, format_flops


class TinyViT(nn.Module):
    """Patch embedding, class token, fixed position embedding, one block with
    ``F.scaled_dot_product_attention`` and one with explicit ``q @ k^T`` attention."""

    def __init__(self, dim: int = 16, grid: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.embed = nn.Conv2d(3, dim, 4, stride=4)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 1 + grid * grid, dim) * 0.02)
        self.qkv = nn.ModuleList(nn.Linear(dim, 3 * dim) for _ in range(2))
        self.proj = nn.ModuleList(nn.Linear(dim, dim) for _ in range(2))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 5)

    def _split(self, x: torch.Tensor, i: int) -> tuple[torch.Tensor, ...]:
        n, length, dim = x.shape
        qkv = self.qkv[i](x).reshape(n, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        return qkv.unbind(0)

    def _merge(self, x: torch.Tensor, i: int) -> torch.Tensor:
        n, heads, length, d = x.shape
        return self.proj[i](x.transpose(1, 2).reshape(n, length, heads * d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        q, k, v = self._split(x, 0)
        x = x + self._merge(F.scaled_dot_product_attention(q, k, v), 0)
        q, k, v = self._split(x, 1)
        attn = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(-1)
        x = self.norm(x + self._merge(attn @ v, 1))
        return self.head(x[:, 0] + x[:, 1:].mean(1))


def _timm_vit() -> nn.Module:
    model = timm.create_model("vit_tiny_patch16_224", dynamic_img_size=True, depth=2)
    model.blocks[1].attn.fused_attn = False  # explicit attention matmuls in the second block
    return model


def _timm_registers() -> nn.Module:
    # class token + 4 register tokens
    return timm.create_model("vit_small_patch14_reg4_dinov2", dynamic_img_size=True, depth=1, embed_dim=32, num_heads=2)


def _torchvision_vit() -> nn.Module:
    # the architecture of vit_b_16, tiny (nn.MultiheadAttention inside)
    return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=32,
                                                mlp_dim=64)


def _timm_swin() -> nn.Module:
    # windows of 3 on an 8x8 grid: padded to whole windows at run time, then patch merging
    return timm.create_model("swin_tiny_patch4_window7_224", dynamic_img_size=True, img_size=32, window_size=3,
                             depths=(1, 1), num_heads=(1, 2), embed_dim=16, num_classes=5)


def _torchvision_swin() -> nn.Module:
    # the architecture of swin_t, tiny (shifted_window_attention: one wrapped call)
    from torchvision.models.swin_transformer import SwinTransformer

    return SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=[3, 3],
                           num_classes=5)


def _torchvision_swin_v2() -> nn.Module:
    # swin_v2_t's blocks: the attention call also takes a bias table larger than the late maps
    from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformer, SwinTransformerBlockV2

    return SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=[8, 8],
                           num_classes=5, block=SwinTransformerBlockV2, downsample_layer=PatchMergingV2)


class GatedAttention(nn.Module):
    """ConViT's gated positional attention, in short: a position table of ``(1, L, L, 3)`` is
    rebuilt when the token count changes (control flow fx cannot trace: the module stays whole),
    projected per pair, and mixed with ``q @ k^T``; FLOPs ``a * L + b * L^2``."""

    def __init__(self, dim: int, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qk = nn.Linear(dim, 2 * dim)
        self.v = nn.Linear(dim, dim)
        self.pos_proj = nn.Linear(3, heads)
        self.register_buffer("rel", torch.zeros(1, 1, 1, 3), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, dim = x.shape
        if self.rel.shape[1] != length:
            i = torch.arange(length, dtype=x.dtype, device=x.device)
            d = i[None, :] - i[:, None]
            self.rel = torch.stack([d, d.abs(), d * d], -1)[None]
        q, k = self.qk(x).reshape(n, length, 2, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        pos = self.pos_proj(self.rel.expand(n, -1, -1, -1)).permute(0, 3, 1, 2).softmax(-1)
        attn = 0.5 * (q @ k.transpose(-2, -1)).softmax(-1) + 0.5 * pos
        v = self.v(x).reshape(n, length, self.heads, dim // self.heads).transpose(1, 2)
        return x + (attn @ v).transpose(1, 2).reshape(n, length, dim)


class GatedViT(nn.Module):
    """Patch embedding, then a leaf of attention over the tokens (no class token)."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 4, stride=4)
        self.attn = GatedAttention(dim)
        self.head = nn.Linear(dim, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(self.embed(x).flatten(2).transpose(1, 2)).mean(1))


# name -> (builder, input size, range of the patch group's stride for random draws). The patch
# embeddings are patchify convs: their DynOPool resizes the image to a multiple of the patch and
# starts at stride 1 (a 4x4 token grid at these sizes); 0.6-1.75 gives 2x2 to 7x7 grids.
MODELS = {
    "tiny_vit": (TinyViT, 32, (0.6, 1.75)),
    "gated_attention_leaf": (GatedViT, 32, (0.6, 1.75)),
    "timm_vit_tiny": (_timm_vit, 64, (0.6, 1.75)),
    "timm_registers": (_timm_registers, 56, (0.6, 1.75)),
    "torchvision_vit": (_torchvision_vit, 32, (0.6, 1.75)),
    "timm_swin": (_timm_swin, 32, (0.6, 1.75)),
    "torchvision_swin": (_torchvision_swin, 32, (0.6, 1.75)),
    "torchvision_swin_v2": (_torchvision_swin_v2, 32, (0.6, 1.75)),
}


#: the Swins' patch merging is a site too: a second group
MERGING_GROUPS = {"timm_swin": 2, "torchvision_swin": 2, "torchvision_swin_v2": 2}


def _converted(name: str) -> tuple[nn.Module, tuple[int, int, int]]:
    torch.manual_seed(0)
    build, size, _ = MODELS[name]
    # the conversion's own validation is tested with it; skipped here for time
    return convert(build(), (3, size, size), validate=False).model, (3, size, size)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_value_equals_fvcore_at_random_strides(name):
    model, input_size = _converted(name)
    assert len(scale_parameters(model)) == MERGING_GROUPS.get(name, 1)  # the patch embedding's group (and merging's)
    cost = CostModel(model, input_size)
    assert cost.unattributed == 0
    assert [id(p) for p in cost.parameters] == [id(p) for p in scale_parameters(model)]
    assert cost.flops() == cost.reference_flops
    rng = random.Random(sum(map(ord, name)))
    lo, hi = MODELS[name][2]
    seen = {cost.reference_flops}
    for _ in range(5):  # five draws: neighbouring strides often round to the same token grid
        randomise_strides(model, rng, lo=lo, hi=hi)
        expected = count_flops(model, input_size)
        assert cost.flops() == expected
        value = cost()
        assert value.requires_grad and abs(value.item() - expected) <= 1e-6 * expected
        seen.add(expected)
    assert len(seen) > 2  # the token count did move


@pytest.mark.parametrize("name", ["tiny_vit", "timm_vit_tiny"])
def test_gradient_sign_matches_finite_difference_of_fvcore(name):
    model, input_size = _converted(name)
    lo, hi = MODELS[name][2]
    randomise_strides(model, random.Random(3), lo=lo * 1.2, hi=hi / 1.2)
    cost = CostModel(model, input_size)
    for directional, fd in finite_difference_signs(model, cost, input_size, eps=1.15):
        assert fd != 0
        assert (directional > 0) == (fd > 0), (directional, fd)


class _AttentionMap(nn.Module):
    """DynOPool, flattened tokens + a class token, a linear layer, ``q @ q^T``: with L = h*w + 1,
    fvcore counts 20*3*h*w (DynOPool) + 3*8*L (linear) + 8*L^2 (matmul)."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = DynOPool((1.9, 2.3))
        self.cls = nn.Parameter(torch.zeros(1, 1, 3))
        self.q = nn.Linear(3, 8, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.pool(x).flatten(2).transpose(1, 2)
        q = self.q(torch.cat([self.cls.expand(x.shape[0], -1, -1), t], dim=1))
        return (q @ q.transpose(1, 2)).softmax(-1)


def test_gradient_is_the_straight_through_one_for_tokens_and_attention_maps():
    net = _AttentionMap()
    cost = CostModel(net, (3, 32, 32))
    h, w = net.pool.output_size((32, 32))
    tokens = h * w + 1
    value = cost()
    assert value.item() == 60 * h * w + 24 * tokens + 8 * tokens**2 == count_flops(net, (3, 32, 32))
    value.backward()
    s_h, s_w = net.pool.stride_value
    per_area = 60 + 24 + 16 * tokens  # d/dA of 60 A + 24 (A + 1) + 8 (A + 1)^2
    expected = torch.tensor([per_area * w * (-32 / s_h**2), per_area * h * (-32 / s_w**2)])
    assert torch.allclose(net.pool.stride.grad, expected, rtol=1e-5)


class _HalfTokens(nn.Module):
    """Keeps about half of its tokens: not h*w plus a constant. Exactly half of an even count
    fits both shape passes (16x16 and 23x20 tokens) by chance."""

    def __init__(self, extra: int) -> None:
        super().__init__()
        self.extra = extra
        self.pool = DynOPool(2.0)
        self.fc = nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.pool(x).flatten(2).transpose(1, 2)
        return self.fc(t[:, : t.shape[1] // 2 + self.extra]).mean(1)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention in one call (fx does not enter it): fvcore counts ``L^2`` FLOPs, out ``(N, L, C)``."""
    return (q @ k.transpose(1, 2)).softmax(-1) @ v


def attend_and_project(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Attention and a projection in one call: FLOPs ``a L + b L^2``, which no one size explains
    (as ``nn.MultiheadAttention``: projections per token, attention per pair)."""
    return attend(q, k, v) @ w


torch.fx.wrap("attend")
torch.fx.wrap("attend_and_project")


class _OneCallAttention(nn.Module):
    """Tokens + a class token through ``attend`` or ``attend_and_project`` (``fn``)."""

    def __init__(self, fn: str) -> None:
        super().__init__()
        self.fn = fn
        self.pool = DynOPool(2.0)
        self.cls = nn.Parameter(torch.zeros(1, 1, 3))
        self.w = nn.Parameter(torch.zeros(3, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.pool(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(x.shape[0], -1, -1), t], dim=1)
        return attend(t, t, t) if self.fn == "attend" else attend_and_project(t, t, t, self.w)


def test_attention_inside_one_call_follows_the_square_of_its_tokens():
    net = _OneCallAttention("attend")
    cost = CostModel(net, (3, 32, 32))
    assert cost.unattributed == 0
    for s in (1.3, 2.0, 3.1):
        with torch.no_grad():
            net.pool.stride.copy_(torch.tensor([s, s * 1.2]))
        assert cost.flops() == count_flops(net, (3, 32, 32))


def test_projection_and_attention_inside_one_call_are_split_between_tokens_and_pairs():
    # a L + b L^2, a and b solved from the two passes (until session 15 this was refused with
    # "follow no size"); checked at a third setting on build, exact at any stride here
    net = _OneCallAttention("attend_and_project")
    cost = CostModel(net, (3, 32, 32))
    assert cost.unattributed == 0
    for s in (0.7, 1.3, 2.0, 3.1, 5.0):
        with torch.no_grad():
            net.pool.stride.copy_(torch.tensor([s, s * 1.2]))
        assert cost.flops() == count_flops(net, (3, 32, 32))


@pytest.mark.parametrize("net, words", [(_HalfTokens(1), "cannot follow the size of node"),
                                        (_HalfTokens(0), "predicts .* FLOPs where fvcore counts")])
def test_what_is_not_understood_is_refused(net, words):
    with pytest.raises(UnsupportedModelError, match=words) as info:
        CostModel(net, (3, 32, 32))
    assert "\n" not in str(info.value) and "without a budget" in str(info.value)


@pytest.mark.parametrize("gap, refused", [(1e-7, False), (1e-5, True)])
def test_total_check_allows_only_rounding(monkeypatch, gap, refused):
    """fvcore's total may differ from the cost model's by its own rounding (MViTv2: 34 FLOPs in
    375M): up to TOTAL_TOLERANCE is accepted, anything larger is a model it does not follow.
    (At 96 px: 2305 tokens, 32M FLOPs, so the added 1 FLOP is far inside the tolerance; at 256 px
    the attention's matrices took 16 GB of memory.)"""
    import dynopool_convert.cost_model as cost_model_module

    real = cost_model_module.count_flops
    monkeypatch.setattr(cost_model_module, "count_flops", lambda m, size: real(m, size) * (1 + gap) + 1)
    net = _OneCallAttention("attend")
    size = (3, 96, 96)
    assert real(net, size) * (TOTAL_TOLERANCE - 1e-7) > 10  # the tolerance is what decides
    if refused:
        with pytest.raises(UnsupportedModelError, match="predicts .* FLOPs where fvcore counts"):
            CostModel(net, size)
    else:
        assert CostModel(net, size).flops() == real(net, size)


def test_a_build_whose_check_fails_is_built_again_from_larger_maps(monkeypatch):
    """A rule that fits two shape passes by chance fails the check at a third setting (PVT-v2-B2
    after a budget fit: keys pooled from a 3x3 grid, 1x1 in both passes); the cost model is then
    built again from another pair of settings, and checked at a third one of its own."""
    import dynopool_convert.cost_model as cost_model_module

    checked: list[tuple[float, float]] = []
    real = CostModel._check_totals

    def first_fails(self, factors):
        checked.append(factors)
        if len(checked) == 1:
            raise UnsupportedModelError("the FLOPs budget does not support this model yet: a rule fitted by chance")
        real(self, factors)

    monkeypatch.setattr(CostModel, "_check_totals", first_fails)
    net = _OneCallAttention("attend")
    size = (3, 64, 64)
    cost = CostModel(net, size)
    first, second = (check for _, check in cost_model_module.PERTURBATIONS)
    assert checked == [first, first, second]  # the rebuild passes the setting that failed, and its own
    assert cost.flops() == count_flops(net, size)
    randomise_strides(net, random.Random(4), lo=1.0, hi=3.0)
    assert cost.flops() == count_flops(net, size)


@pytest.mark.parametrize("name", ["timm_vit_tiny", "torchvision_swin"])
def test_fit_and_project_hold_on_a_vit(name):
    model, input_size = _converted(name)
    cost = CostModel(model, input_size)
    start = cost.reference_flops
    budget = int(start * 0.6)
    out = fit_to_budget(model, budget, input_size, cost_model=cost)
    assert out["method"] != "none" and count_flops(model, input_size) == out["final_flops"] <= budget
    with torch.no_grad():  # as if training had raised the resolution again
        for p in cost.parameters:
            p.mul_(0.8)
    over = count_flops(model, input_size)
    assert over > budget
    out = project_to_budget(model, budget, input_size, cost_model=cost)
    assert out["moved"] and out["flops_before"] == over
    assert count_flops(model, input_size) == out["final_flops"] <= budget


def test_cli_budget_on_a_vit(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    args = ["--build-arg", "dynamic_img_size=true", "--build-arg", "depth=2"]
    original = count_flops(build_model("timm:vit_tiny_patch16_224", {"dynamic_img_size": True, "depth": 2}), (3, 64, 64))
    budget = int(original * 0.6)
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", "timm:vit_tiny_patch16_224", "--input-size", "64", *args, "--budget", str(budget), "--dry-run"])
    out, err = capsys.readouterr()
    assert exit_info.value.code == 0, err
    assert f"original {format_flops(original)} ({original})" in out
    fitted = re.search(rf"budget {format_flops(budget)}: fitted to \S+ \((\d+)\)", out)
    assert fitted is not None, out
    assert original * 0.5 < int(fitted.group(1)) <= budget
    assert "dry run: no checkpoint written" in out


def test_a_leaf_of_several_moving_maps_is_probed_at_all_their_sizes():
    """MobileNetV5's fusion (tests/budget_models.py: FusionNet): the leaf's FLOPs follow the
    first map (a fixed output after it), its input sizes decide whether it runs at all."""
    from budget_models import MODELS
    from dynopool_convert.budget import INFEASIBLE

    model = MODELS["fusion"]()
    size = (3, 32, 32)
    cost = CostModel(model, size)
    assert cost.flops() == count_flops(model, size)
    for strides in ([(1.3, 1.7), (1.1, 1.4)], [(2.6, 3.1), (1.0, 1.2)], [(0.9, 1.6), (2.4, 1.05)]):
        for p, s in zip(cost.parameters, strides):
            p.data.copy_(torch.tensor(s))
        assert cost.flops() == count_flops(model, size), strides
    # the second map larger than the first: the model cannot run there, and the cost model says so
    for p, s in zip(cost.parameters, [(2.0, 2.0), (0.75, 0.75)]):
        p.data.copy_(torch.tensor(s))
    with pytest.raises(RuntimeError):
        model(torch.zeros(1, *size))
    assert cost.flops() == INFEASIBLE and cost.group_sizes() is None
    for p in cost.parameters:
        p.data.fill_(2.0)
    budget = int(0.95 * count_flops(model, size))  # the stem's conv at 32x32 is most of it
    fit = fit_to_budget(model, budget, size, cost_model=cost)
    assert count_flops(model, size) == fit.final_flops <= budget


def test_gcvit_query_repeated_per_window_is_followed():
    """timm's GCViT repeats a global query once per window of the map (``repeat_interleave`` to
    N * windows x 7 x 7 x C, then reshaped with that count): it follows the windows' map, not
    the query's fixed size (refused before), and the budget fit holds by fvcore."""
    size = (3, 64, 64)
    torch.manual_seed(0)
    # validated, as the CLI converts: the groups whose moves break the windows rounded or pinned
    model = convert(timm.create_model("gcvit_xxtiny", img_size=64, num_classes=4), size).model
    cost = CostModel(model, size)
    assert cost.flops() == count_flops(model, size)
    budget = int(0.8 * cost.reference_flops)
    fit = fit_to_budget(model, budget, size, cost_model=cost)
    assert count_flops(model, size) == fit.final_flops <= budget


class _Blocks(nn.Module):
    """Runs on maps whose sides are multiples of its block only (timm's halo attention)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        if x.shape[-2] % 4 or x.shape[-1] % 4:
            raise RuntimeError("the map is not a multiple of the block")
        return self.conv(x)


def test_a_leaf_that_runs_on_multiples_only_gets_proportional_slopes():
    """Its forward differences (one pixel up) cannot run: the cost model took every evaluation
    for infeasible and refused the budget (lamhalobotnet50ts_256). The sizes and FLOPs stay
    fvcore's; the slope where it cannot run one pixel up is the proportional one."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), DynOPool(2.0, multiple=4), _Blocks(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    size = (3, 32, 32)
    cost = CostModel(model, size)
    for stride in ((2.0, 2.0), (1.5, 2.7), (3.1, 1.2)):
        cost.parameters[0].data.copy_(torch.tensor(stride))
        assert cost.flops() == count_flops(model, size), stride
    (g_h, g_w), = cost.gradient([(2.0, 2.0)])
    assert g_h < 0 and g_w < 0  # a larger stride, a smaller map, fewer FLOPs


def test_a_leaf_is_never_run_far_above_its_reference_size():
    # at the lower stride bound a grid may be many times larger; a leaf run there could take all
    # the memory (ConViT at 224 px under placement exact: 448 x 448 tokens, killed at 17 GB)
    from dynopool_convert.cost_model import INFEASIBLE
    from dynopool_convert.cost_probe import MAX_PROBE_TOKENS

    torch.manual_seed(0)
    model = convert(GatedViT(), (3, 64, 64), placement="exact", validate=False).model
    cost = CostModel(model, (3, 64, 64))
    seen = []
    attn = next(m for m in model.modules() if isinstance(m, GatedAttention))
    attn.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1]))
    lo, _ = cost.bounds[0]
    assert lo == 0.5  # the patch conv's stride 4 down to 0.5: a 128 x 128 grid of the 16 x 16 one
    assert cost.flops([(lo, lo)]) == INFEASIBLE
    assert not seen or max(seen) <= MAX_PROBE_TOKENS
    assert cost.flops([(3.0, 3.0)]) == count_flops_at(model, 3.0)


def count_flops_at(model: nn.Module, s: float) -> int:
    with torch.no_grad():
        scale_parameters(model)[0].fill_(s)
    return count_flops(model, (3, 64, 64))
