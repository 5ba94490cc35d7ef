"""Placement ``exact``: DynResize in front of every kept op; the converted model computes the
original's function at init, at the original's FLOPs, and still learns its sizes."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import dynopool_convert as dc
from dynopool_convert.cost_model import CostModel
from dynopool_convert.dynresize import DynResize, FrozenResize, dynresize2d, resample_bilinear
from dynopool_convert.exactness import check_exact


def test_dynresize_is_the_identity_at_init_bit_for_bit():
    x = torch.randn(2, 5, 7, 9)
    resize = DynResize(2.0, base=2.0)
    assert resize(x) is x or torch.equal(resize(x), x)
    with torch.no_grad():
        assert torch.equal(resize(x), x)
    y = resize(x)  # the gradient path (sample positions carry the stride)
    assert torch.equal(y, x)
    y.sum().backward()
    assert resize.stride.grad is not None and torch.isfinite(resize.stride.grad).all()
    assert isinstance(resize.frozen((7, 9)), torch.nn.Identity)


@pytest.mark.parametrize("stride", [(2.6, 2.6), (1.5, 3.1), (1.3, 1.0)])
def test_dynresize_matches_bilinear_interpolate_at_moved_strides(stride):
    x = torch.randn(2, 3, 20, 18)
    resize = DynResize(torch.nn.Parameter(torch.tensor(stride)), base=2.0)
    out = resize(x)  # gradient path
    h, w = resize.output_size((20, 18))
    assert out.shape[-2:] == (h, w) == (round(20 * 2 / stride[0]), round(18 * 2 / stride[1]))
    expected = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)  # float rounding of two lerp forms
    with torch.no_grad():
        torch.testing.assert_close(resize(x), expected, rtol=0, atol=0)
    frozen = resize.frozen((20, 18))
    assert isinstance(frozen, FrozenResize) and frozen.size == (h, w)
    torch.testing.assert_close(frozen(x), expected, rtol=0, atol=0)


def test_dynresize_gradients_input_position_and_straight_through_stride():
    # the forward is piecewise constant in s; smooth in x and in the cell size (sample positions)
    x = torch.randn(1, 2, 9, 11, dtype=torch.float64, requires_grad=True)
    ch = torch.tensor(1.37, dtype=torch.float64, requires_grad=True)
    cw = torch.tensor(0.83, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, c1, c2: resample_bilinear(a, c1, c2, 6, 12), (x, ch, cw))
    # STE: dL/ds = dL/dc * dc/ds, c = H / H'_ste, H'_ste = H * base / s: dc/ds = H^2 base / (H'^2 s^2)
    xd = x.detach()
    s = torch.tensor([2.37, 1.81], dtype=torch.float64, requires_grad=True)
    dynresize2d(xd, s, (2.0, 2.0)).square().sum().backward()
    oh, ow = round(9 * 2 / 2.37), round(11 * 2 / 1.81)
    c = torch.tensor([9 / oh, 11 / ow], dtype=torch.float64, requires_grad=True)
    resample_bilinear(xd, c[0], c[1], oh, ow).square().sum().backward()
    factor = torch.tensor([9**2 * 2 / (oh**2 * 2.37**2), 11**2 * 2 / (ow**2 * 1.81**2)], dtype=torch.float64)
    torch.testing.assert_close(s.grad, c.grad * factor)
    assert s.grad.abs().min() > 0


def test_antialiased_dynresize_filters_shrinks_and_is_still_the_identity_at_init():
    x = torch.randn(2, 3, 20, 18, requires_grad=True)
    assert torch.equal(DynResize(2.0, base=2.0, antialias=True)(x), x)
    resize = DynResize(torch.nn.Parameter(torch.tensor([2.9, 1.5])), base=2.0, antialias=True)
    h, w = resize.output_size((20, 18))
    assert (h, w) == (14, 24)  # shrinks in height, grows in width: filtered as F.interpolate does
    expected = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    out = resize(x)  # gradient path: the filtered values, the sample positions' stride gradient
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(out, F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False))
    out.square().sum().backward()
    assert resize.stride.grad is not None and (resize.stride.grad != 0).all()
    x_grad = x.grad.clone()
    x.grad = None
    expected.square().sum().backward()  # x's gradient is the filter's alone
    torch.testing.assert_close(x_grad, x.grad)
    frozen = resize.frozen((20, 18))
    assert isinstance(frozen, FrozenResize) and frozen.antialias
    torch.testing.assert_close(frozen(x), expected, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(resize(x), expected, rtol=0, atol=0)


# a representative set: residual (tied groups), depthwise/SE, patchify convs, concat branches
MODELS = ["timm:resnet18", "torchvision:mobilenet_v3_small", "timm:convnext_atto", "torchvision:shufflenet_v2_x0_5"]


@pytest.mark.parametrize("source", MODELS)
def test_converted_model_is_exact_at_init_and_its_cost_model_follows_it(source):
    torch.manual_seed(0)
    model = dc.build_model(source, {"num_classes": 5})
    size = (3, 32, 32)
    result = dc.convert(model, size, placement="exact")
    report = check_exact(model, size, result)
    assert report.groups >= 1 and report.rel_diff <= 1e-5, report
    plan = result.plan
    if not plan.pinned_sites():  # the identity resizes run (and cost) nothing; a pin's adaptive pool does
        assert report.flops_converted == report.flops_original
    assert report.ok
    assert {s.placement for s in plan.converted_sites()} == {"exact"}
    assert all(s.converted_size == s.output_size for s in plan.converted_sites())
    gm = result.model
    assert all(isinstance(m, DynResize) for _, m in dc.dynopool_modules(gm))
    gm.train()  # the identity passes the stride gradient (at 32 px some maps are 1x1: zero there)
    gm(torch.randn(2, *size)).square().mean().backward()
    grads = [p.grad for p in dc.scale_parameters(gm)]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(bool(g.abs().sum() > 0) for g in grads) >= len(grads) // 2
    cost = CostModel(gm, size)
    assert cost.flops() == report.flops_converted
    with torch.no_grad():  # moved strides: one pixel-changing move per group, then all together
        for i, p in enumerate(dc.scale_parameters(gm)):
            p.mul_(1.0 + 0.07 * (i % 3 + 1))
    moved = dc.count_flops(gm, size)
    assert moved < report.flops_converted and cost.flops() == moved


def test_tied_groups_share_one_stride_and_checkpoints_round_trip(tmp_path):
    source = "timm:resnet18"
    model = dc.build_model(source, {"num_classes": 3})
    result = dc.convert(model, (3, 32, 32), placement="exact")
    pools = dict(dc.dynopool_modules(result.model))
    shortcut, main = pools["layer2.0.downsample.0_dynopool"], pools["layer2.0.conv1_dynopool"]
    assert shortcut.stride is main.stride and shortcut.base == (2.0, 2.0)
    with torch.no_grad():
        for p in dc.scale_parameters(result.model):
            p.mul_(1.2)
    path = dc.save_checkpoint(tmp_path / "exact.pt", result.model, result.plan, source, {"num_classes": 3}, (3, 32, 32))
    loaded = dc.load(path).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), result.model.eval()(x), rtol=0, atol=0)


def test_pools_under_exact_keep_their_op():
    """A 3x3/2 max pool with padding (ResNet's stem) is not a DynOPool at s = 2: exact keeps it."""
    model = dc.build_model("timm:resnet18", {"num_classes": 3})
    result = dc.convert(model, (3, 32, 32), placement="exact", include=["kind:pool"])
    gm = result.model
    assert isinstance(gm.get_submodule("maxpool"), torch.nn.MaxPool2d)
    assert [name for name, _ in dc.dynopool_modules(gm)] == ["maxpool_dynopool"]
    assert check_exact(model, (3, 32, 32), result).rel_diff == 0.0



def test_input_site_under_exact_is_the_identity_and_the_budget_can_lower_it_alone():
    """``input_site=True`` with placement exact: a DynResize at stride 1 named ``input_resize``
    (the identity at init), which the budget fit spending the most of the budget lowers alone
    (method ``input``), as it does the DynOPool input site; the default fit keeps more
    resolution at nearly the same cost."""
    torch.manual_seed(0)
    model = dc.build_model("timm:resnet18", {"num_classes": 3}).eval()
    size = (3, 32, 32)
    result = dc.convert(model, size, placement="exact", input_site=True)
    site = dict(dc.dynopool_modules(result.model))["input_resize"]
    assert isinstance(site, DynResize) and site.base == (1.0, 1.0) and site.stride_init == (1.0, 1.0)
    assert check_exact(model, size, result).rel_diff == 0.0
    original = dc.count_flops(model, size)
    budget = int(original * 0.43)
    # 16 px costs 0.42x: under 0.43x the input alone lands within INPUT_FIRST_SLACK of the budget,
    # and the fit that spends the most of the budget takes it
    fit = dc.fit_to_budget(result.model, budget, size, allocation="flops")
    assert fit.method == "input" and 0.41 * original <= fit.final_flops <= budget
    assert CostModel(result.model, size).flops() == fit.final_flops
    assert site.output_size((32, 32))[0] < 32
    # halving every map gives up far more resolution than the allocation the default fit keeps
    # (the input at 32 px, the stem's map lowered): at nearly the same cost
    kept = dc.fit_to_budget(dc.convert(model, size, placement="exact", input_site=True).model, budget, size)
    assert kept.method == "resolution" and fit.final_flops - 0.05 * budget <= kept.final_flops <= budget


def test_finetuning_at_the_initial_sizes_is_the_original_s_fine_tuning(tmp_path):
    """Without stride learning and size search (sizes held at the original's), fine-tuning an
    ``exact`` model gives the weights that fine-tuning the unconverted model gives, bit for bit
    (DynResize is the identity in training too: nothing but the sizes can differ)."""
    from dynopool_convert.training import finetune
    from dynopool_convert.training.zoo import small_cnn

    build = {"num_classes": 4, "in_chans": 3, "width": 4}
    size = (3, 16, 16)
    runs = {}
    for placement, include in (("exact", None), ("before", ["no-site-matches-this"])):
        torch.manual_seed(0)
        result = dc.convert(small_cnn(**build), input_size=size, placement=placement, include=include)
        ckpt = tmp_path / f"{placement}.pt"
        dc.save_checkpoint(ckpt, result.model, result.plan, "dynopool_convert.training.zoo:small_cnn",
                           build_args=build, input_size=size, budget=dc.count_flops(result.model, size))
        finetune(ckpt, tmp_path / placement, trust_source=True, overrides={
            "data": "synthetic:classes=4,train=40,val=8",
            "train": {"steps": 4, "batch_size": 8, "device": "cpu", "size_search": False}})
        runs[placement] = dc.load_checkpoint(tmp_path / placement / "last.pt", trust_source=True).model
    assert len(dc.scale_parameters(runs["exact"])) == 2 and not dc.scale_parameters(runs["before"])
    weights = [[p for p in m.parameters() if not any(p is s for s in dc.scale_parameters(m))] for m in runs.values()]
    assert len(weights[0]) == len(weights[1])
    assert all(torch.equal(a, b) for a, b in zip(*weights))


def test_input_first_fit_does_not_give_up_a_coarse_step_of_the_budget():
    """ResNet-18 at 32 px under 0.7x its FLOPs: the input alone would land at 16 px (0.42x; 17 px
    is just over), so the fit lowers every group by one factor instead (0.67x)."""
    from dynopool_convert.budget import INPUT_FIRST_SLACK

    torch.manual_seed(0)
    model = dc.build_model("timm:resnet18", {"num_classes": 3}).eval()
    size = (3, 32, 32)
    result = dc.convert(model, size, placement="exact", input_site=True)
    budget = int(dc.count_flops(model, size) * 0.7)
    fit = dc.fit_to_budget(result.model, budget, size)
    assert fit.method in ("common", "per-group")
    assert (1 - INPUT_FIRST_SLACK) * budget <= fit.final_flops <= budget
