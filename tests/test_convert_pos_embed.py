"""Fixed absolute position embeddings follow the patchify site's grid (dynopool_convert.pos_embed)."""
from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn

import dynopool_convert as dc
from dynopool_convert.pos_embed import resample_pos_embed


class TinyViT(nn.Module):
    """Patchify conv (stride 4), class token, fixed-length position embedding, one token mixer."""

    def __init__(self, size: int = 32, patch: int = 4, dim: int = 16, classes: int = 5) -> None:
        super().__init__()
        grid = size // patch
        self.proj = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + grid * grid, dim))
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos_embed
        x = x + self.mix(x).mean(dim=1, keepdim=True)
        return self.head(x[:, 0])


class MapPosEmbed(nn.Module):
    """[1, C, H, W] position embeddings added to the patch maps of two stages (visformer-style)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj1 = nn.Conv2d(3, 8, 2, stride=2)
        self.pos_embed1 = nn.Parameter(torch.randn(1, 8, 16, 16))
        self.proj2 = nn.Conv2d(8, 8, 2, stride=2)
        self.pos_embed2 = nn.Parameter(torch.randn(1, 8, 8, 8))
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj1(x) + self.pos_embed1
        x = self.proj2(x) + self.pos_embed2
        return self.head(x.mean(dim=(2, 3)))


def _stride(model: nn.Module) -> nn.Parameter:
    (p,) = dc.scale_parameters(model)
    return p


def _without_pass(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of a converted model with every resampling call replaced by the bare parameter."""
    gm = copy.deepcopy(gm)
    calls = [n for n in gm.graph.nodes if n.target is resample_pos_embed]
    assert calls
    for node in calls:
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)
    gm.recompile()
    return gm


@pytest.mark.parametrize("placement", ["before", "after"])
def test_tiny_vit_converts_exact_at_init_and_learns(placement):
    torch.manual_seed(0)
    model = TinyViT().eval()
    result = dc.convert(model, input_size=(3, 32, 32), placement=placement)
    assert result.plan.summary()["groups"] == 1
    assert any("pos_embed" in n and "proj" in n for n in result.plan.notes)
    gm = result.model.eval()
    plain = _without_pass(gm).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), plain(x), rtol=0, atol=0)  # reference grid: the parameter as is
        _stride(plain).copy_(torch.tensor([5.0, 5.0]))
        with pytest.raises(RuntimeError):  # without the pass, a moved grid breaks the add
            plain(x)
    for stride in ([5.0, 5.0], [3.0, 4.0]):  # grids 6x6 and 11x8
        with torch.no_grad():
            _stride(gm).copy_(torch.tensor(stride))
        gm.zero_grad(set_to_none=True)
        out = gm(x)
        assert out.shape == (2, 5)
        out.square().sum().backward()
        assert torch.isfinite(_stride(gm).grad).all() and _stride(gm).grad.abs().sum() > 0
        assert gm.pos_embed.grad is not None and gm.pos_embed.grad.abs().sum() > 0
    assert [k for k in gm.state_dict() if "pos_embed" in k] == ["pos_embed"]  # the parameter stays


def test_resample_keeps_prefix_tokens_and_reference():
    pos = torch.randn(1, 2 + 16, 4)
    assert resample_pos_embed(pos, torch.empty(1, 1, 4, 4), "nc", (4, 4), 2) is pos
    out = resample_pos_embed(pos, torch.empty(1, 1, 3, 5), "nc", (4, 4), 2)
    assert out.shape == (1, 2 + 15, 4) and torch.equal(out[:, :2], pos[:, :2])
    chw = torch.randn(1, 4, 4, 4)
    assert resample_pos_embed(chw, torch.empty(1, 1, 2, 6), "chw", (4, 4)).shape == (1, 4, 2, 6)
    assert resample_pos_embed(chw, torch.empty(1, 1, 2, 6), "hwc", (4, 4)).shape == (1, 2, 6, 4)


def test_map_position_embeddings_follow_their_grids():
    model = MapPosEmbed().eval()
    result = dc.convert(model, input_size=(3, 32, 32))
    assert result.plan.summary()["groups"] == 2
    assert sorted(n.split()[2] for n in result.plan.notes if "(chw" in n) == ["pos_embed1", "pos_embed2"]
    with torch.no_grad():
        for p, s in zip(dc.scale_parameters(result.model), ([3.0, 1.5], [2.5, 2.0])):  # 11x21, then 4x10
            p.copy_(torch.tensor(s))
        assert result.model(torch.randn(1, 3, 32, 32)).shape == (1, 3)


@pytest.fixture(scope="module")
def cait():
    source, args = "timm:cait_xxs24_224", {"img_size": 64, "depth": 2, "num_classes": 4}
    model = dc.build_model(source, args).eval()
    return source, args, model, dc.convert(model, input_size=(3, 64, 64))


def test_timm_cait_converts(cait):
    _, _, _, result = cait
    assert result.plan.summary()["groups"] >= 1
    assert result.plan.site("patch_embed.proj").status == "converted"
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(result.model.eval()(x), _without_pass(result.model).eval()(x), rtol=0, atol=0)


def test_timm_cait_checkpoint_round_trip(cait, tmp_path):
    source, args, _, result = cait
    with torch.no_grad():
        _stride(result.model).copy_(torch.tensor([18.0, 14.0]))  # a 4x5 grid instead of 4x4
    path = dc.save_checkpoint(tmp_path / "cait.pt", result.model, result.plan, source, args, (3, 64, 64))
    loaded = dc.load_checkpoint(path).model.eval()
    assert set(loaded.state_dict()) == set(result.model.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), result.model.eval()(x), rtol=0, atol=0)
    assert torch.equal(_stride(loaded).detach(), torch.tensor([18.0, 14.0]))


def test_timm_distilled_deit_traces_through_its_own_pos_embed_method():
    # VisionTransformerDistilled._pos_embed lives in timm/models/deit.py, not in the module of
    # the forward it inherits: its resample_abs_pos_embed call must be kept as a leaf call too
    model = timm.create_model("deit_tiny_distilled_patch16_224", dynamic_img_size=True, depth=1).eval()
    result = dc.convert(model, input_size=(3, 64, 64))
    assert result.plan.summary()["groups"] == 1
    (stride,) = dc.scale_parameters(result.model)
    with torch.no_grad():
        stride.copy_(torch.tensor([0.8, 1.3]))  # a 5x3 token grid
        assert result.model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
