"""The conversion pass on small hand-made models and ResNets (CPU, small inputs)."""
from __future__ import annotations

import json

import pytest
import timm
import torch
from torch import nn

from _convert_models import HardCodedFlatten, NeedsAutoLeaf, OneBranchHardCoded, PoolOnly, SharedPool, TimmLayersNet, TinyNet, UNetLike, Untraceable
from dynopool_convert import (
    DynOPool,
    Plan,
    UserInputError,
    apply_plan,
    convert,
    dynopool_modules,
    scale_parameters,
)
from dynopool_convert.skip_sizes import SKIP_REASON


def _groups_of(result) -> dict[str, int]:
    return {s.name: s.group for s in result.plan.sites if s.status == "converted"}


def _modules_by_site(result) -> dict[str, DynOPool]:
    return {name: result.model.get_submodule(path) for name, path in result.site_modules().items()}


def _move_all(model: nn.Module, factor: float) -> None:
    with torch.no_grad():
        for p in scale_parameters(model):
            p.mul_(factor)


def _backprop_reaches_every_group(model: nn.Module, x: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    out = model(x)
    out = out["out"] if isinstance(out, dict) else out
    (out * torch.randn_like(out)).sum().backward()
    params = scale_parameters(model)
    assert params, "no learned group"
    for p in params:
        assert p.grad is not None and torch.isfinite(p.grad).all()


@pytest.fixture(scope="module")
def resnet18_result():
    torch.manual_seed(0)
    return convert(timm.create_model("resnet18", num_classes=10), input_size=(3, 64, 64))


def test_resnet18_sites_groups_and_ties(resnet18_result):
    r = resnet18_result
    groups = _groups_of(r)
    assert set(groups) == {
        "conv1", "maxpool", "layer2.0.conv1", "layer2.0.downsample.0",
        "layer3.0.conv1", "layer3.0.downsample.0", "layer4.0.conv1", "layer4.0.downsample.0",
    }
    # residual downsampling branches tie, stages do not
    for stage in (2, 3, 4):
        assert groups[f"layer{stage}.0.conv1"] == groups[f"layer{stage}.0.downsample.0"]
    assert len(set(groups.values())) == 5
    mods = _modules_by_site(r)
    assert mods["layer3.0.conv1"].stride is mods["layer3.0.downsample.0"].stride
    assert mods["layer3.0.conv1"].stride is not mods["layer2.0.conv1"].stride
    assert mods["layer3.0.conv1"].group == groups["layer3.0.conv1"]
    assert len(scale_parameters(r.model)) == 5
    # the strided conv keeps its weights and class, now at stride 1 with same padding
    conv = r.model.get_submodule("layer2.0.conv1")
    assert type(conv) is nn.Conv2d and conv.stride == (1, 1) and conv.padding == (1, 1)
    assert r.plan.site("global_pool.pool").status == "skipped"
    assert r.plan.site("layer2.0.conv1").converted_size == [8, 8]


def test_resnet18_moved_scales_and_backprop(resnet18_result):
    model = resnet18_result.model.eval()
    x = torch.randn(2, 3, 64, 64)
    for factor in (0.7, 1.45):
        _move_all(model, factor)
        try:
            assert model(x).shape == (2, 10)
        finally:
            _move_all(model, 1.0 / factor)
    _backprop_reaches_every_group(model, x)


@pytest.mark.parametrize("validate", [False, True])
def test_user_model_is_left_untouched(validate):
    model = timm.create_model("resnet18")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r = convert(model, input_size=(3, 32, 32), validate=validate)
    assert model.conv1.stride == (2, 2) and not dynopool_modules(model)
    assert model.training and all(m.training for m in model.modules())
    # the converted model owns its weights (validation's models shared them)
    own = {id(p) for p in r.model.parameters()}
    assert not own & {id(p) for p in model.parameters()}
    with torch.no_grad():
        for p in r.model.parameters():
            p.add_(1.0)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_pinning_leaves_the_user_model_untouched():
    model = HardCodedFlatten()
    r = convert(model, input_size=(3, 16, 16))
    assert r.plan.site("pool").status == "pinned"
    assert not any(isinstance(m, (DynOPool, nn.AdaptiveAvgPool2d)) for m in model.modules())
    assert model.conv.stride == (2, 2) and model.conv.padding == (1, 1)


def test_placement_after_and_plan_replay():
    torch.manual_seed(0)
    r = convert(timm.create_model("resnet18"), input_size=(3, 32, 32), placement="after")
    assert r.plan.summary()["groups"] == 5
    assert r.plan.site("layer2.0.conv1").placement == "after"
    # placement after: the DynOPool consumes the stride-1 conv's output
    node = next(n for n in r.model.graph.nodes if n.op == "call_module" and n.target == r.site_modules()["layer2.0.conv1"])
    assert node.args[0].target == "layer2.0.conv1"
    plan = Plan.from_dict(json.loads(json.dumps(r.plan.to_dict())))
    assert plan.to_dict() == r.plan.to_dict()
    torch.manual_seed(1)
    replayed = apply_plan(timm.create_model("resnet18"), plan)
    assert replayed.state_dict().keys() == r.model.state_dict().keys()
    replayed.load_state_dict(r.model.state_dict(), strict=True)
    x = torch.randn(1, 3, 32, 32)
    r.model.eval(), replayed.eval()
    with torch.no_grad():
        torch.testing.assert_close(replayed(x), r.model(x), rtol=0, atol=0)
    assert len(scale_parameters(replayed)) == 5


def test_custom_model_functional_pools_se_and_interpolation():
    r = convert(TinyNet(), input_size=(3, 32, 32))
    plan = r.plan
    groups = _groups_of(r)
    assert groups["down.conv"] == groups["down.shortcut"]  # residual branches tie
    assert groups["max_pool2d"] != groups["down.conv"]  # the SE gate's pool is a broadcast branch
    assert plan.site("avg_pool2d").aggregate == "mean" and plan.site("max_pool2d").aggregate == "max"
    assert plan.site("up").kind == "interpolate" and plan.site("up").stride_init == [0.5, 0.5]
    assert plan.site("up").converted_size == [8, 8]
    assert plan.site("adaptive_avg_pool2d").status == "skipped"
    assert all(s.status == "converted" for s in plan.sites if s.kind != "pool" or "adaptive" not in s.op)
    _backprop_reaches_every_group(r.model, torch.randn(2, 3, 32, 32))


def test_timm_pool_layers_and_functional_interpolate():
    r = convert(TimmLayersNet(), input_size=(3, 64, 64))
    ops = {s.name: (s.op.split("(")[0], s.status, s.aggregate, s.stride_init) for s in r.plan.sites}
    assert ops == {
        "conv": ("Conv2dSame", "converted", "max", [2.0, 2.0]),
        "pool": ("MaxPool2dSame", "converted", "max", [2.0, 2.0]),
        "blur": ("BlurPool2d", "converted", "mean", [2.0, 2.0]),
        "interpolate": ("F.interpolate", "converted", "mean", [0.5, 0.5]),
        "avg": ("AvgPool2dSame", "converted", "mean", [2.0, 2.0]),
    }
    assert [r.plan.site(n).converted_size for n in ("conv", "pool", "blur", "interpolate", "avg")] == [
        [32, 32], [16, 16], [8, 8], [16, 16], [8, 8]]
    _backprop_reaches_every_group(r.model, torch.randn(2, 3, 64, 64))


def test_exact_where_the_conversion_is_exact():
    torch.manual_seed(0)
    model = PoolOnly().eval()
    r = convert(model, input_size=(3, 32, 32), include=["kind:pool"])
    assert r.plan.summary()["converted"] == 3
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(r.model.eval()(x), model(x), rtol=1e-6, atol=1e-6)


def test_hard_coded_shape_pins_the_last_group_and_the_earlier_one_learns():
    torch.manual_seed(0)
    model = HardCodedFlatten().eval()
    r = convert(model, input_size=(3, 16, 16))
    pool, conv = r.plan.site("pool"), r.plan.site("conv")
    # moving the pool changes the flattened size: it is pinned (its input held at 8x8), with the reason
    assert pool.status == "pinned" and "breaks the forward" in pool.reason
    assert r.plan.groups[pool.group].status == "pinned"
    assert conv.status == "converted" and r.plan.summary() == {
        "converted": 1, "pinned": 1, "reverted": 0, "skipped": 0, "groups": 1}
    assert type(r.model.get_submodule("pool_pin")) is nn.AdaptiveAvgPool2d
    assert r.model.get_submodule("pool_pin").output_size == (8, 8)
    x = torch.randn(2, 3, 16, 16)
    seen = []
    pin = r.model.get_submodule("pool_pin")
    handle = pin.register_forward_hook(lambda m, args, out: seen.append(torch.equal(args[0], out)))
    with torch.no_grad():
        r.model.eval()(x)
    handle.remove()
    assert seen == [True]  # at the reference size the pin is an exact identity
    (stride,) = scale_parameters(r.model)
    with torch.no_grad():
        stride.copy_(torch.tensor([3.0, 1.5]))  # conv output 5x11: the pin brings it back to 8x8
    assert r.model(x).shape == (2, 3)
    _backprop_reaches_every_group(r.model, x)


def test_a_pin_that_nothing_moves_is_reverted():
    torch.manual_seed(0)
    model = HardCodedFlatten().eval()
    r = convert(model, input_size=(3, 16, 16), include=["pool"])
    pool = r.plan.site("pool")
    assert pool.status == "reverted" and "breaks the forward" in pool.reason
    assert not dynopool_modules(r.model)
    assert not any(isinstance(m, nn.AdaptiveAvgPool2d) for m in r.model.modules())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(r.model.eval()(x), model(x))


def test_only_the_breaking_group_is_reverted():
    r = convert(OneBranchHardCoded(), input_size=(3, 16, 16))
    assert r.plan.site("free").status == "converted"
    fixed = r.plan.site("fixed")
    assert fixed.status == "reverted" and "breaks the forward" in fixed.reason and "64" in fixed.reason
    assert r.plan.groups[fixed.group].status == "reverted"
    assert [type(m).__name__ for m in (r.model.get_submodule("free"), r.model.get_submodule("fixed"))] == ["DynOPool", "AvgPool2d"]


def test_shared_pool_module_gives_two_independent_sites():
    r = convert(SharedPool(), input_size=(3, 16, 16))
    groups = _groups_of(r)
    assert set(groups) == {"pool", "pool_1"} and groups["pool"] != groups["pool_1"]
    assert r.model(torch.randn(1, 3, 16, 16)).shape == (1, 4, 4, 4)


def test_include_exclude_and_aggregate():
    model = timm.create_model("resnet18")
    r = convert(model, input_size=(3, 32, 32), exclude=["layer*"], aggregate="mean", validate=False)
    assert set(_groups_of(r)) == {"conv1", "maxpool"}
    assert r.plan.site("layer2.0.conv1").reason == "matched by --exclude"
    assert {m.aggregate for _, m in dynopool_modules(r.model)} == {"mean"}
    r = convert(model, input_size=(3, 32, 32), include=["kind:pool"], validate=False)
    assert set(_groups_of(r)) == {"maxpool"}


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"placement": "middle"}, "placement"),
        ({"aggregate": "sum"}, "aggregate"),
        ({"input_size": (64, 64)}, "input size"),
    ],
)
def test_bad_arguments_raise_user_input_error(kwargs, words):
    with pytest.raises(UserInputError, match=words):
        convert(PoolOnly(), **{"input_size": (3, 16, 16), **kwargs})


def test_untraceable_model_names_the_culprit():
    with pytest.raises(UserInputError, match=r"cannot trace Untraceable.*Untraceable\.forward.*the model's own forward: "
                                             r"move code that branches .* into a submodule"):
        convert(Untraceable(), input_size=(3, 16, 16))


def test_untraceable_submodule_without_sites_becomes_a_leaf():
    r = convert(NeedsAutoLeaf(), input_size=(3, 16, 16))
    assert r.plan.site("conv").status == "converted"
    assert any("traced ShapeBranch as a leaf: tracing into it failed at _convert_models.ShapeBranch.forward()"
               in note for note in r.plan.notes)
    assert not any("stay as they are" in note for note in r.plan.notes)
    replayed = apply_plan(NeedsAutoLeaf(), r.plan)
    assert replayed(torch.randn(1, 3, 14, 14)).shape == (1, 4)


def test_down_up_skip_the_up_follows_the_skip_and_the_down_learns():
    r = convert(UNetLike(), input_size=(3, 16, 16))
    down, up = r.plan.site("down"), r.plan.site("up")
    # the up's output is concatenated with the input: it interpolates to the input's size
    # (skip_sizes.py) rather than being a site whose stride (1/2 of the down's) nothing could tie
    # to the skip; it was pinned, its input brought back to 8x8, before
    assert up.status == "skipped" and up.reason == SKIP_REASON
    assert down.status == "converted" and not r.plan.pinned_sites()
    (stride,) = scale_parameters(r.model)
    with torch.no_grad():
        stride.copy_(torch.tensor([3.0, 1.6]))
    assert r.model(torch.randn(1, 3, 16, 16)).shape == (1, 2, 16, 16)


class _ChannelBranch(nn.Module):
    """PyramidNet's block: zero channels appended where the counts differ, decided in forward."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride, 1)
        self.down = nn.AvgPool2d(2) if stride > 1 else nn.Identity()

    def forward(self, x):
        out, short = self.conv(x), self.down(x)
        if out.size(1) != short.size(1):
            short = torch.cat([short, torch.zeros_like(out[:, : out.size(1) - short.size(1)])], 1)
        return out + short


def test_a_class_kept_as_a_leaf_keeps_its_instances_with_strided_ops_traced():
    # the first block (no strided op) fails to trace and is kept whole; the second, of the same
    # class, holds a strided conv and pool: it stays traced, its branch on channel counts taken
    # as at the reference (until session 21 the whole class was a leaf and its ops no sites)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), _ChannelBranch(4, 6, 1), _ChannelBranch(6, 8, 2)).eval()
    r = convert(model, input_size=(3, 16, 16))
    assert any("traced _ChannelBranch as a leaf" in note for note in r.plan.notes)
    assert any("branch on sizes fixed" in note and "out.size(1) != short.size(1)" in note for note in r.plan.notes)
    assert r.plan.site("2.conv").status == r.plan.site("2.down").status == "converted"
    x = torch.randn(1, 3, 16, 16)
    assert torch.equal(convert(model, (3, 16, 16), placement="exact").model.eval()(x), model(x))
