"""Receptive fields through the fx graph, against hand-computed values and the measured support."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from _report_fixtures import TinyConverted
from dynopool_convert import DynOPool
from dynopool_convert.report.graph import ReportGraph
from dynopool_convert.report.receptive_field import dynopool_read_span, receptive_fields


def _fields(model: nn.Module, size: tuple[int, int, int]) -> dict:
    graph = ReportGraph(model, size)
    return {k: f.size for k, f in receptive_fields(graph).fields.items()}


@torch.no_grad()
def _true_support(model: nn.Module, hw: tuple[int, int]) -> tuple[int, int]:
    """Widest extent, per axis, of the input rows/columns one output unit depends on.

    Measured with impulses: a batch in which image ``p`` is 1 on input row ``p`` only (then
    columns). Exact for networks whose weights are all positive (no cancellation), with mean
    pooling, and whose ops act on each axis separately (convs, pools, DynOPool).
    """
    ext = []
    for axis in (0, 1):
        n = hw[axis]
        x = torch.zeros(n, 1, *hw)
        for p in range(n):
            if axis == 0:
                x[p, 0, p, :] = 1.0
            else:
                x[p, 0, :, p] = 1.0
        y = model(x)[:, 0]                       # (n inputs, H', W')
        hit = (y != 0).any(dim=2 - axis)          # (n inputs, outputs along the axis)
        widest = 0
        for o in range(hit.shape[1]):
            rows = hit[:, o].nonzero()[:, 0]
            widest = max(widest, int(rows.max() - rows.min() + 1))
        ext.append(widest)
    return ext[0], ext[1]


def _positive(model: nn.Module) -> nn.Module:
    """Every conv weight set to 1 (the DynOPool strides are left alone)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.constant_(m.weight, 1.0)
    return model


def test_hand_computed_conv_chain():
    # conv3 s1 -> conv3 s2 -> conv3 s1 -> conv3 dilation 2 -> maxpool 2 (jump 2 after the s2 conv): rf 3, 5, 9, 17, 19
    m = nn.Sequential(
        nn.Conv2d(3, 4, 3, 1, 1), nn.Conv2d(4, 4, 3, 2, 1), nn.Conv2d(4, 4, 3, 1, 1),
        nn.Conv2d(4, 4, 3, 1, 2, dilation=2), nn.MaxPool2d(2),
    )
    f = _fields(m, (3, 32, 32))
    assert [f[n][0] for n in ("_0", "_1", "_2", "_3", "_4")] == [3, 5, 9, 17, 19]
    assert f["_4"] == (19, 19)


def test_dynopool_at_stride_2_is_a_2x2_pool():
    pooled = _fields(nn.Sequential(nn.Conv2d(3, 4, 3, 1, 1), DynOPool(2.0), nn.Conv2d(4, 4, 3, 1, 1)), (3, 32, 32))
    maxed = _fields(nn.Sequential(nn.Conv2d(3, 4, 3, 1, 1), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3, 1, 1)), (3, 32, 32))
    assert pooled["_2"] == maxed["_2"] == (8, 8)  # 3, then 3 + 1 = 4 [2], then 4 + 2*2


def test_tiny_converted_network_hand_computed():
    # at 32x32 with every stride 2 (jump in brackets):
    #   stem DynOPool k2 -> 2 [2]; stem conv3 -> 2 + 2*2 = 6; body conv3 -> 10; pool k2 -> 12 [4]
    #   block: DynOPool -> 16 [8]; conv3 -> 32 | shortcut DynOPool -> 16, conv1x1 -> 16; add -> 32
    #   SE gate (global pool) is a broadcast operand: mul stays 32; late conv3 s2 -> 32 + 2*8 = 48
    f = _fields(TinyConverted(), (3, 32, 32))
    assert f["stem_conv"] == (6, 6)
    assert f["pool"] == (12, 12)
    assert f["block_conv1"] == (32, 32)
    assert f["block_down"] == (16, 16)
    assert f["add"] == (32, 32)
    assert f["mul"] == (32, 32)
    assert f["late_conv"] == (48, 48)


@pytest.mark.parametrize("size,stride", [(64, 2.0), (64, 2.5), (61, 1.37), (67, 3.1), (40, 5.3), (33, 0.7)])
def test_dynopool_read_span_matches_true_support(size, stride):
    pool = DynOPool((stride, stride), "mean")
    span = _true_support(pool, (size, 9))[0]
    out = pool.output_size((size, 9))[0]
    assert dynopool_read_span(size, out) == span
    assert _fields(pool, (1, size, 9))["output"][0] == span


@pytest.mark.parametrize("strides", [(2.0, 2.0), (1.6, 2.5), (1.37, 3.1), (3.3, 1.2)])
def test_fractional_strides_close_to_true_support(strides):
    # The rf/jump rule is exact on uniform grids. Fractional cells are spaced unevenly (their
    # starts are rounded to the input grid), so each DynOPool can place a window up to one pixel
    # of its input grid off the uniform position: the bound is the sum of the jumps at the
    # DynOPool inputs (docs/REPORT.md).
    m = _positive(nn.Sequential(
        nn.Conv2d(1, 1, 3, 1, 1, bias=False), DynOPool(strides[0], "mean"),
        nn.Conv2d(1, 1, 3, 1, 1, bias=False), DynOPool(strides[1], "mean"), nn.Conv2d(1, 1, 3, 1, 1, bias=False),
    ))
    for hw in ((48, 48), (45, 51)):
        graph = ReportGraph(m, (1, *hw))
        rf = receptive_fields(graph)
        analytic = rf.fields["output"].size
        true = _true_support(m, hw)
        bound = [sum(rf.fields[n.args[0].name].jump[a] for n in graph.pool_nodes.values()) for a in (0, 1)]
        if strides == (2.0, 2.0) and hw == (48, 48):
            assert analytic == true == (18, 18)  # 3, +1 -> 4 [2], +4 -> 8, +2 -> 10 [4], +8 -> 18
        for a in (0, 1):
            assert abs(analytic[a] - true[a]) <= bound[a], (analytic, true, bound)
            assert analytic[a] > 11  # the pools widen the field (3 convs alone: 7)


def test_functional_ops_and_unknown_resize():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(4, 3, 5, 5))

        def forward(self, x):
            x = nn.functional.conv2d(x, self.w, stride=2, padding=2)    # 5 [2]
            x = nn.functional.max_pool2d(x, 3, 2, 1)                   # 5 + 2*2 = 9 [4]
            x = nn.functional.interpolate(x, scale_factor=2.0, mode="nearest")  # 9 [2]
            x = nn.functional.pixel_unshuffle(x, 2)                    # k 2, t 2 -> 11 [4]
            return x[:, :, 1::2, 1::2]                                 # unknown: k 2, t 2 -> 15 [8]

    graph = ReportGraph(Functional(), (3, 32, 32))
    rf = receptive_fields(graph)
    assert rf.fields["conv2d"].size == (5, 5)
    assert rf.fields["max_pool2d"].size == (9, 9)
    assert rf.fields["interpolate"].size == (9, 9) and rf.fields["interpolate"].jump == (2, 2)
    assert rf.fields["pixel_unshuffle"].size == (11, 11) and rf.fields["pixel_unshuffle"].jump == (4, 4)
    assert rf.fields["getitem"].size == (15, 15) and rf.fields["getitem"].jump == (8, 8)
    assert rf.approximate == ["getitem"]  # an offset slice: read from the sizes


def test_padding_computed_in_the_forward_is_read_from_the_sizes():
    """Swin pads each map to a multiple of its window with amounts computed from the map's size:
    padding keeps the field whatever its amounts (it crashed the report)."""
    class PadToMultiple(nn.Module):
        def forward(self, x):
            x = nn.functional.max_pool2d(x, 3, 2, 1)                  # 3 [2]
            h, w = x.shape[-2:]
            x = nn.functional.pad(x, (0, (4 - w % 4) % 4, 0, (4 - h % 4) % 4))
            return nn.functional.avg_pool2d(x, 4)                    # 3 + 3*2 = 9 [8]

    for size in (30, 32):  # padded by 1, and by 0
        rf = receptive_fields(ReportGraph(PadToMultiple(), (3, size, size)))
        assert rf.fields["max_pool2d"].size == (3, 3) and rf.fields["avg_pool2d"].size == (9, 9)
        assert rf.approximate == []

    class KernelFromSize(nn.Module):
        def forward(self, x):
            return nn.functional.avg_pool2d(x, x.shape[-1] // 4)  # a kernel computed in the forward

    rf = receptive_fields(ReportGraph(KernelFromSize(), (3, 32, 32)))  # no rule can read it: by the sizes
    assert rf.fields["avg_pool2d"].size == (8, 8) and rf.approximate == ["avg_pool2d"]


def test_resnet18_known_receptive_field():
    # torchvision ResNet-18: 7 -> 11 (maxpool) -> 43 (layer1) -> 99 -> 211 -> 435 (layer4)
    import torchvision

    graph = ReportGraph(torchvision.models.resnet18(weights=None), (3, 64, 64))
    rf = receptive_fields(graph)
    assert [rf.fields[n].size[0] for n in ("conv1", "maxpool", "layer1_1_relu_1", "layer2_1_relu_1", "layer3_1_relu_1", "layer4_1_relu_1")] == [7, 11, 43, 99, 211, 435]
    assert rf.fields["layer4_1_relu_1"].jump == (32, 32)
    assert rf.approximate == []


def test_channels_last_block_gate_first_and_reshape():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.dw = nn.Conv2d(4, 4, 7, 1, 3, groups=4)
            self.norm = nn.LayerNorm(4)
            self.fc = nn.Linear(4, 4)
            self.down = nn.Conv2d(4, 4, 2, 2)
            self.gate = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            y = self.dw(x)                                     # 7
            y = self.fc(self.norm(y.permute(0, 2, 3, 1)))      # N H W C: still 7
            y = y.permute(0, 3, 1, 2)                          # back: 7
            y = torch.sigmoid(self.gate(y.mean((2, 3), keepdim=True))) * y   # gate first: 7
            y = self.down(y)                                   # 7 + 1 = 8 [2]
            z = y.flatten(2).transpose(1, 2).reshape(1, 4, 24, 16)  # tokens: layout lost
            return y, z

    graph = ReportGraph(Block(), (4, 32, 48))
    rf = receptive_fields(graph)
    assert rf.fields["permute"].size == (7, 7) and rf.fields["fc"].size == (7, 7)
    assert rf.fields["permute_1"].size == (7, 7)
    assert rf.fields["mul"].size == (7, 7)
    assert rf.fields["down"].size == (8, 8) and rf.fields["down"].jump == (2, 2)
    assert "reshape" in rf.approximate and "down" not in rf.approximate and "mean" not in rf.approximate


def test_model_that_does_not_run_at_the_size_is_a_user_error():
    from dynopool_convert.errors import UserInputError

    class Fixed(nn.Module):
        def forward(self, x):
            return x.reshape(1, 3, 32 * 32)

    with pytest.raises(UserInputError, match=r"does not run at input size \[3, 16, 16\]"):
        ReportGraph(Fixed(), (3, 16, 16))
