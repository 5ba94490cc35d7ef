"""The cost model: exact (fvcore at the rounded sizes), straight-through gradient, fast."""
from __future__ import annotations

import random
import time

import pytest
import torch
from torch import nn

from budget_models import MODELS, TwoBranch, finite_difference_signs, randomise_strides
from dynopool_convert import DynOPool, build_model, convert, scale_parameters
from dynopool_convert.cost_model import CostModel
from dynopool_convert.errors import UnsupportedModelError
from dynopool_convert.flops import count_flops

# diverse models: convert() outputs -- residual (resnet18, regnet), depthwise + SE
# (efficientnet, mobilenetv3), NHWC linear MLPs + 2x2 stride convs (convnext) -- and hand-made
# ones: a VGG-like net with max and avg pools, tied concat/residual branches + upsample +
# unpadded conv (two_branch), timm's data-dependent VGG ConvMlp head (a probed leaf), timm's
# StdConv2d + explicit padding + upsampling to the input's size (stdconv_seg), a channels-last
# leaf block with several counted ops, run alone by the cost model (channels_last: Swin's case),
# Swin's window attention over a map padded at run time and its patch merging, traced through
# (windows) or inside one wrapped function (windows_wrapped: torchvision's), attention of one
# map's tokens over another's (pooled_keys: PVT's; pooled_keys_fixed: Twins' first blocks, fixed
# queries reshaped back into a map and pooled; pooled_keys_1d: Next-ViT's, the tokens pooled as a
# sequence by AvgPool1d), pools whose kernel the forward reads off the map (shape_kernel_pool), pixel (un)shuffle (shuffle),
# a crop to even sizes by slicing with bounds read off the map (crop_even)
EXACTNESS = [
    ("two_branch", 32), ("vgg_like", 32), ("resnet18", 32), ("efficientnet_b0", 32),
    ("mobilenetv3_small_100", 32), ("regnetx_002", 32), ("convnext_atto", 64), ("convmlp_head", 12),
    ("stdconv_seg", 32), ("channels_last", 32), ("windows", 32), ("windows_wrapped", 32),
    ("pooled_keys", 32), ("pooled_keys_fixed", 32), ("pooled_keys_1d", 32), ("shape_kernel_pool", 32),
    ("shuffle", 32), ("crop_even", 32),
]


def _model(name: str, size: int) -> nn.Module:
    if name in MODELS:
        return MODELS[name]()
    # the conversion's own validation is tested with it; skipped here for time
    return convert(build_model(name), (3, size, size), validate=False).model


@pytest.mark.parametrize("name, size", EXACTNESS)
def test_value_equals_fvcore_at_random_strides(name, size):
    torch.manual_seed(0)
    model = _model(name, size)
    input_size = (3, size, size)
    cost = CostModel(model, input_size)
    assert cost.unattributed == 0
    assert [id(p) for p in cost.parameters] == [id(p) for p in scale_parameters(model)]
    assert cost.flops() == cost.reference_flops
    randomise_strides(model, random.Random(sum(map(ord, name))), lo=0.7, hi=3.0)  # str hash is salted: not that
    expected = count_flops(model, input_size)
    got = cost.flops()
    assert abs(got - expected) <= 0.01 * expected, (got, expected)  # the specification
    assert abs(got - expected) <= 1e-6 * expected, (got, expected)  # what the design gives: exact
    value = cost()
    assert value.requires_grad and value.dtype == torch.float32
    assert abs(value.item() - got) <= 1e-6 * got


@pytest.mark.parametrize("name", ["two_branch", "vgg_like"])
def test_gradient_sign_matches_finite_difference_of_fvcore(name):
    model = MODELS[name]()
    randomise_strides(model, random.Random(7), lo=1.2, hi=2.4)
    input_size = (3, 48, 48)
    cost = CostModel(model, input_size)
    for directional, fd in finite_difference_signs(model, cost, input_size):
        assert fd != 0
        assert (directional > 0) == (fd > 0), (directional, fd)


def test_gradient_matches_the_continuous_surrogate():
    # one DynOPool then a conv: F = 20*3*h*w + 8*27*h*w with h = round(32/s_h), dh/ds_h = -32/s_h^2
    pool = DynOPool((1.9, 2.3))
    net = nn.Sequential(pool, nn.Conv2d(3, 8, 3, padding=1))
    cost = CostModel(net, (3, 32, 32))
    h, w = pool.output_size((32, 32))
    per_pixel = 20 * 3 + 8 * 27
    value = cost()
    assert value.item() == per_pixel * h * w
    value.backward()
    s_h, s_w = pool.stride_value
    expected = torch.tensor([per_pixel * w * (-32 / s_h**2), per_pixel * h * (-32 / s_w**2)])
    assert torch.allclose(pool.stride.grad, expected, rtol=1e-5)


def test_tied_sites_share_one_parameter_and_outside_bounds_no_gradient():
    model = TwoBranch()
    cost = CostModel(model, (3, 64, 64))
    assert len(cost.parameters) == 2  # pool_a and pool_b share one
    with torch.no_grad():
        cost.parameters[0].copy_(torch.tensor([20.0, 2.0]))  # s_h beyond 1/r_min = 16
    cost().backward()
    grad = cost.parameters[0].grad
    assert grad[0] == 0 and grad[1] < 0
    assert cost.flops() == count_flops(model, (3, 64, 64))


def test_unexplained_size_change_fails_loudly():
    class Crop(nn.Module):
        def __init__(self):
            super().__init__()
            self.pool = DynOPool(2.0)
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            x = self.pool(x)
            return self.conv(x[:, :, : x.shape[2] // 2 + 1])

    with pytest.raises(UnsupportedModelError, match="cannot follow the size of node"):
        CostModel(Crop(), (3, 32, 32))


def test_one_evaluation_is_fast():
    model = convert(build_model("resnet50"), (3, 32, 32), validate=False).model
    cost = CostModel(model, (3, 32, 32))  # the evaluation cost does not depend on the size
    cost()
    times = []
    for _ in range(50):
        t = time.perf_counter()
        cost().backward()
        times.append(time.perf_counter() - t)
    times.sort()
    assert times[len(times) // 2] < 5e-3  # median; the benchmark measures ~0.1 ms


def test_pool_with_a_kernel_read_off_the_map_follows_smaller_maps():
    # the reference pass reads F.avg_pool2d(x, x.shape[2:]) as a 17-pixel window: taken as a
    # fixed window it fits the smaller-stride pass too (24 pixels, one output), then empties
    # every map below 17 pixels, so no budget under the converted count could be met
    model = MODELS["shape_kernel_pool"]()
    cost = CostModel(model, (3, 32, 32))
    for strides in ([(3.0, 3.0)], [(2.5, 3.5)], [(2.0, 4.0)]):
        with torch.no_grad():
            for p, s in zip(scale_parameters(model), strides):
                p.copy_(torch.tensor(s))
        assert cost.flops() == count_flops(model, (3, 32, 32)) < cost.reference_flops
