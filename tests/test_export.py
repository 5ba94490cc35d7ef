"""Freezing the learned sizes and exporting (dynopool_convert.freeze / .export, ``dynopool export``)."""
from __future__ import annotations

import random
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dynopool_convert as dc
from _convert_models import TinyNet
from _export_models import ExportNet
from dynopool_convert import DynOPool, UserInputError, convert, freeze, scale_parameters
from dynopool_convert.export import FORMATS, ONNX_OPSET, export
from dynopool_convert.flops import count_flops
from dynopool_convert.frozen import FrozenAdaptiveAvg, FrozenResample, frozen_adaptive_avg
from dynopool_convert.freeze import frozen_parts
from dynopool_cli.app import main

SIZE = (3, 32, 32)


def _moved(width: int = 32, factor: float = 1.15) -> nn.Module:
    """ExportNet converted at 32x32 with every learned stride moved by ``factor``."""
    model = convert(ExportNet(width), input_size=SIZE).model.eval()
    with torch.no_grad():
        for p in scale_parameters(model):
            p.mul_(factor)
    return model


@pytest.fixture(scope="module")
def moved() -> nn.Module:
    return _moved()


def _plain_fvcore(model: nn.Module, x: torch.Tensor) -> float:
    from fvcore.nn import FlopCountAnalysis

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fa = FlopCountAnalysis(model, x)
        fa.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        return fa.total()


@pytest.mark.parametrize("stride, aggregate, multiple, size", [
    (2.0, "max", 1, (16, 16)), (2.0, "mean", 1, (12, 20)), (1.7, "max", 1, (15, 16)), (2.6, "mean", 1, (30, 22)),
    (0.5, "mean", 1, (7, 9)), (1.2, "max", (4, 2), (30, 30)), ((1.4, 3.1), "max", 1, (17, 40)),
])
def test_frozen_site_computes_dynopool_at_its_input_size(stride, aggregate, multiple, size):
    pool = DynOPool(stride, aggregate=aggregate, multiple=multiple)
    static = pool.frozen(size)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        want, got = pool(x), static(x)
    assert got.shape == want.shape and tuple(got.shape[-2:]) == pool.output_size(size)
    if size[0] == 2 * got.shape[-2] and size[1] == 2 * got.shape[-1]:  # an exact 2x: the standard op, bit-exact
        assert isinstance(static, nn.MaxPool2d if aggregate == "max" else nn.AvgPool2d)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    else:
        assert isinstance(static, FrozenResample) and not list(static.parameters())
        # float rounding of the read positions only: DynOPool's cell H / H' comes out of the
        # straight-through sum in float32, a few ulps from interpolate's own H / 2H'
        torch.testing.assert_close(got, want, rtol=0, atol=2e-5)


@pytest.mark.parametrize("in_size, out_size, kind", [
    ((6, 6), (6, 6), nn.Identity), ((8, 12), (4, 3), nn.AvgPool2d), ((6, 7), (4, 4), FrozenAdaptiveAvg), ((3, 5), (4, 4), FrozenAdaptiveAvg),
])
def test_frozen_adaptive_avg_is_the_adaptive_pool(in_size, out_size, kind):
    static = frozen_adaptive_avg(in_size, out_size)
    x = torch.randn(2, 3, *in_size)
    assert isinstance(static, kind)
    torch.testing.assert_close(static(x), F.adaptive_avg_pool2d(x, out_size), rtol=0, atol=1e-6)


def test_freeze_at_init_is_standard_pools_only_and_exact():
    model = convert(TinyNet(), input_size=SIZE).model.eval()
    frozen = freeze(model)
    assert not any(isinstance(m, DynOPool) for m in frozen.modules())
    kinds = {type(static).__name__ for _, static in frozen_parts(model).values()}
    assert kinds == {"MaxPool2d", "AvgPool2d", "FrozenResample"}  # the 2x upsampling site is the one resize
    assert {n for n, _ in frozen.named_parameters()} == {n for n, _ in model.named_parameters() if not n.endswith(".stride")}
    x = torch.randn(2, *SIZE)
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), model(x), rtol=0, atol=1e-6)
    assert model.training is False and any(isinstance(m, DynOPool) for m in model.modules())  # left untouched


def test_freeze_keeps_the_tied_group_the_pin_and_the_patchify_site(moved):
    parts = frozen_parts(moved)
    (stem_in, stem), (conv_in, conv), (short_in, short) = (parts[f"{n}_dynopool"] for n in ("stem", "conv", "shortcut"))
    assert isinstance(stem, FrozenResample) and stem.aggregate == "mean" and stem_in == (32, 32)
    assert all(v % 2 == 0 for v in stem.out_size)  # the patchify site keeps a multiple of the 2x2 patch
    assert conv_in == short_in and conv.out_size == short.out_size != (7, 7)  # the tied branches stay equal
    pin_in, pin = parts["pool_pin"]
    assert pin_in == (conv.out_size[0], conv.out_size[1]) and isinstance(pin, FrozenAdaptiveAvg)
    frozen = freeze(moved)
    assert not [n for n, _ in frozen.named_parameters() if n.endswith("stride")]
    x = torch.randn(3, *SIZE)
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), moved(x), rtol=0, atol=1e-5)


def test_live_model_traces_and_plain_fvcore_counts_it_and_the_frozen_one(tmp_path):
    model = _moved(width=128)  # convolutions dominate, as in real models: resizes are counted differently
    x = torch.randn(1, *SIZE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(model, x).save(str(tmp_path / "live.ts"))  # standard ops only: it serialises
        traced = torch.jit.load(str(tmp_path / "live.ts"))
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x), rtol=0, atol=1e-5)
    reported = count_flops(model, SIZE)  # what 'dynopool report' prints as the current FLOPs
    live, frozen = _plain_fvcore(model, x), _plain_fvcore(freeze(model), x)
    assert abs(live - reported) <= 0.01 * reported and abs(frozen - reported) <= 0.01 * reported, (live, frozen, reported)
    assert model.get_submodule("conv_dynopool").stride.requires_grad  # tracing changed nothing


@pytest.mark.parametrize("fmt", FORMATS)
def test_export_each_format_loads_back_and_matches(moved, fmt, tmp_path):
    if fmt == "onnx":  # the optional extra '[export]' (installed by .ci/run)
        pytest.importorskip("onnxruntime")
        pytest.importorskip("onnxscript")
    result = export(moved, fmt, tmp_path / f"model.{fmt}")
    assert result.path.is_file() and result.input_size == SIZE
    assert result.max_abs_diff < 1e-5 and result.frozen_max_abs_diff < 1e-5
    assert 0 < result.float32_max_abs_diff < 1e-5 and result.float64_max_abs_diff < 1e-5 and result.passes(1e-4, 1e-5)
    if fmt == "onnx":
        import onnx

        proto = onnx.load(str(result.path))
        ops = {n.op_type for n in proto.graph.node}
        assert {"Resize", "MaxPool", "Conv"} <= ops and {d.version for d in proto.opset_import if d.domain in ("", "ai.onnx")} == {ONNX_OPSET}
        assert all(d.domain in ("", "ai.onnx") for d in proto.opset_import if d.version)  # standard ops only
        assert not [n.op_type for n in proto.graph.node if n.domain not in ("", "ai.onnx")]


class _Numpy(nn.Module):
    def forward(self, x):
        return torch.from_numpy(x.detach().numpy()[..., ::2, ::2].copy())


class _OpaqueSite(nn.Module):
    """A learnable site whose static form cannot be traced (it leaves torch for numpy)."""

    def frozen(self, in_size):
        return _Numpy()

    def forward(self, x):
        return x[..., ::2, ::2]


def test_the_check_forgives_float32_rounding_only_as_far_as_pytorch_itself_rounds():
    """A deep network differs from itself in float32 by more than atol + rtol x max|output|
    (timm's Inception-v3 at 160 px: 3e-4 at outputs of 5, its ONNX file 5e-4 from PyTorch but
    2e-4 from float64); the check then reads the distance from the float64 run instead."""
    from dynopool_convert.export import ExportResult

    def result(diff, diff64, own64):
        return ExportResult(SIZE, "onnx", SIZE, diff, 0.0, 5.0, ONNX_OPSET, diff64, own64)

    tolerance = 1e-4 + 1e-5 * 5.0
    assert result(1e-4, None, None).passes(1e-4, 1e-5)  # within the plain tolerance
    assert not result(5e-4, None, None).passes(1e-4, 1e-5)  # no float64 reading: the plain tolerance alone
    assert result(5e-4, 2e-4, 3e-4).passes(1e-4, 1e-5)  # as exact as PyTorch float32 is
    assert result(5e-4, tolerance + 6e-4, 3e-4).passes(1e-4, 1e-5)
    assert not result(5e-4, tolerance + 6.1e-4, 3e-4).passes(1e-4, 1e-5)  # over twice PyTorch's own rounding
    assert not result(1e-2, 1e-2, 1e-6).passes(1e-4, 1e-5)  # a real difference stays one


class _Float32Only(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3)

    def forward(self, x):
        return self.conv(x).float() @ torch.ones(30, 4)  # a float32 constant: no float64 run


def test_export_of_a_model_without_a_float64_run_keeps_the_plain_check(tmp_path):
    result = export(_Float32Only().eval(), "torchscript", tmp_path / "m.ts", SIZE)
    assert result.float64_max_abs_diff is None and result.float32_max_abs_diff is None
    assert result.max_abs_diff < 1e-5 and result.passes(1e-4, 1e-5)


class _SPP(nn.Module):
    """A spatial-pyramid head: adaptive max and average pools to 4x4, 2x2 and 1x1, flattened
    (the 4x4 pools of a learned 13x13 map do not divide: ONNX refused them)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.pool = nn.AdaptiveMaxPool2d(4)
        self.fc = nn.Linear(4 * (16 + 16 + 4 + 1), 10)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        feats = [self.pool(x), F.adaptive_avg_pool2d(x, 4), F.adaptive_max_pool2d(x, (2, 2)), F.adaptive_max_pool2d(x, 1)]
        return self.fc(torch.cat([f.flatten(1) for f in feats], 1))


@pytest.mark.parametrize("in_size, out_size", [((7, 9), (4, 2)), ((13, 6), (4, 4)), ((8, 8), (4, 4)), ((3, 3), (4, 4))])
def test_frozen_adaptive_max_is_the_adaptive_pool(in_size, out_size):
    from dynopool_convert.frozen import frozen_adaptive_max

    x = torch.randn(2, 3, *in_size)
    assert torch.equal(frozen_adaptive_max(in_size, out_size)(x), F.adaptive_max_pool2d(x, out_size))


def test_the_models_own_adaptive_pools_are_frozen_and_export(tmp_path):
    pytest.importorskip("onnxruntime")
    model = convert(_SPP(), input_size=SIZE).model.eval()
    with torch.no_grad():
        scale_parameters(model)[0].copy_(torch.tensor([2.4, 2.4]))  # 32 -> 13x13: 4x4 bins do not divide
    frozen = freeze(model, SIZE)
    assert not any(isinstance(m, (nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool2d)) for m in frozen.modules())
    x = torch.randn(2, *SIZE)
    torch.testing.assert_close(frozen(x), model(x), rtol=1e-5, atol=1e-6)
    result = export(model, "onnx", tmp_path / "spp.onnx", SIZE)
    assert result.passes(1e-4, 1e-5)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_a_float16_model_is_checked_against_its_own_rounding(fmt, tmp_path):
    """A model saved in half precision differs from its export by float16 rounding (1e-4 at
    outputs of 0.2: over the default tolerance, which is float32's); it passes where the file is
    as close to the model run in float64 as the model itself is."""
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = _moved().half()
    result = export(model, fmt, tmp_path / f"m.{fmt}", SIZE)
    assert result.precision == "float16" and result.float32_max_abs_diff is not None
    assert result.float32_max_abs_diff > 1e-5 and result.passes(1e-4, 1e-5)


def test_export_refuses_naming_the_site(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), _OpaqueSite(), nn.Conv2d(4, 2, 1))
    with pytest.raises(UserInputError, match=r"cannot export to pt2: site '1' \(_Numpy\) cannot be exported"):
        export(model, "pt2", tmp_path / "m.pt2", SIZE)
    assert not list(tmp_path.iterdir())
    with pytest.raises(UserInputError, match="reference input size"):
        freeze(model)  # a plain module does not record its reference size


def test_onnx_refusal_names_the_op_without_dumping_the_graph(tmp_path, capfd):
    pytest.importorskip("onnxscript")
    # ONNX has no fractional max pool: both exporters fail; the TorchScript one also logged its
    # whole graph from C++ onto the terminal, and the message was the dynamo exporter's wrapper
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.FractionalMaxPool2d(2, output_ratio=0.7)).eval()
    with pytest.raises(UserInputError) as caught:
        export(model, "onnx", tmp_path / "m.onnx", SIZE)
    message = str(caught.value)
    assert "fractional_max_pool2d" in message and "other formats: torchscript, pt2" in message
    assert "\n" not in message and "\x1b" not in message
    out, err = capfd.readouterr()
    assert "graph(" not in out + err and "Torch IR" not in out + err
    assert not list(tmp_path.iterdir())


class _DeadBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.unused = DynOPool(2.0)

    def forward(self, x):
        return self.conv(x)


def test_freeze_refuses_a_site_that_does_not_run():
    model = _DeadBranch()
    with pytest.raises(UserInputError, match="cannot freeze site 'unused': it does not run"):
        freeze(model, SIZE)


def test_cli_exports_a_checkpoint_and_prints_the_difference(tmp_path, capsys):
    source = "_export_models:export_net"
    result = convert(dc.build_model(source, {}), input_size=SIZE)
    with torch.no_grad():
        for p in scale_parameters(result.model):
            p.mul_(random.Random(0).uniform(0.8, 1.3))
    ckpt = dc.save(tmp_path / "net.pt", result.model, result.plan, source, {}, SIZE)
    with pytest.raises(SystemExit) as info:
        main(["export", str(ckpt), "--format", "torchscript", "--out", str(tmp_path / "net.ts"), "--trust-source"])
    out, err = capsys.readouterr()
    assert info.value.code == 0, err
    assert "input N x 3 x 32 x 32" in out and "max abs difference from the PyTorch model at 32x32" in out
    diff = float(out.split("at 32x32: ")[1].split()[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.load is deprecated
        assert diff < 1e-5 and torch.jit.load(str(tmp_path / "net.ts"))(torch.randn(2, *SIZE)).shape == (2, 5)
    with pytest.raises(SystemExit) as info:
        main(["export", str(ckpt), "--format", "onnx", "--out", str(tmp_path / "x.onnx")])  # untrusted source
    out, err = capsys.readouterr()
    assert info.value.code == 2 and err.count("\n") == 1 and "--trust-source" in err


def test_the_check_sees_wrong_weights_and_nan(moved, tmp_path):
    from safetensors.torch import save_model

    from dynopool_convert.export import _max_diff, load_exported

    frozen = freeze(moved)
    x = [torch.randn(2, *SIZE)]
    save_model(frozen, str(tmp_path / "ok.safetensors"))
    assert _max_diff(load_exported("safetensors", tmp_path / "ok.safetensors", frozen), moved, x)[0] < 1e-5
    with torch.no_grad():
        frozen.get_submodule("fc").weight.mul_(2.0)
    save_model(frozen, str(tmp_path / "bad.safetensors"))
    assert _max_diff(load_exported("safetensors", tmp_path / "bad.safetensors", frozen), moved, x)[0] > 1e-2
    assert _max_diff(lambda t: torch.full((2, 5), float("nan")), moved, x)[0] == float("inf")


def test_freeze_and_onnx_export_of_an_exact_conversion_at_moved_strides(tmp_path):
    """Placement ``exact``: every DynResize freezes to a fixed bilinear resize (or the identity)
    and the ONNX file computes what the converted model does."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from dynopool_convert.dynresize import DynResize, FrozenResize

    torch.manual_seed(0)
    model = convert(ExportNet(8), input_size=SIZE, placement="exact").model.eval()
    assert any(isinstance(m, DynResize) for m in model.modules())
    with torch.no_grad():
        for p in scale_parameters(model):
            p.mul_(1.15)
    frozen = freeze(model, SIZE)
    assert not [m for m in frozen.modules() if isinstance(m, DynOPool)]  # DynResize is one too
    assert any(isinstance(m, FrozenResize) for m in frozen.modules())  # the moved strides resize
    x = torch.randn(2, *SIZE)
    torch.testing.assert_close(frozen(x), model(x), rtol=1e-5, atol=1e-5)
    result = export(model, "onnx", tmp_path / "exact.onnx")
    assert result.max_abs_diff < 1e-5 and result.frozen_max_abs_diff < 1e-5
    import onnx

    ops = {n.op_type for n in onnx.load(str(result.path)).graph.node}
    assert {"Resize", "Conv"} <= ops


class _TwoHeads(nn.Module):
    """Segmentation-style outputs: a dict of two maps at different scales (as torchvision's
    ``out``/``aux``), or the same as a tuple."""

    def __init__(self, as_tuple: bool = False) -> None:
        super().__init__()
        self.as_tuple = as_tuple
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.out = nn.Conv2d(8, 4, 1)
        self.aux = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        h = self.pool(torch.relu(self.stem(x)))
        out, aux = self.out(h), 10.0 * self.aux(h).mean((2, 3))
        return (out, aux) if self.as_tuple else {"out": out, "aux": aux}


@pytest.mark.parametrize("as_tuple", [False, True])
@pytest.mark.parametrize("fmt", FORMATS)
def test_export_of_dict_and_tuple_outputs(as_tuple, fmt, tmp_path):
    """Every output tensor is written, named (a dict's keys in ONNX) and compared, in order:
    swapping two outputs of the file would be seen."""
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
        pytest.importorskip("onnxscript")
    from dynopool_convert.export import _max_diff, load_exported

    torch.manual_seed(0)
    model = convert(_TwoHeads(as_tuple), input_size=SIZE).model.eval()
    with torch.no_grad():
        scale_parameters(model)[0].mul_(1.2)
    result = export(model, fmt, tmp_path / f"model.{fmt}")
    assert result.max_abs_diff < 1e-5 and result.passes(1e-4, 1e-5) and result.float64_max_abs_diff < 1e-5
    run = load_exported(fmt, result.path, freeze(model))
    x = [torch.randn(3, *SIZE)]
    swapped = (lambda t: list(reversed(list(model(t).values() if not as_tuple else model(t)))))
    assert _max_diff(run, model, x)[0] < 1e-5 and _max_diff(swapped, model, x)[0] > 1.0
    if fmt == "onnx":
        import onnx

        names = [o.name for o in onnx.load(str(result.path)).graph.output]
        assert names == (["output_0", "output_1"] if as_tuple else ["out", "aux"])


class _FiveDimAttention(nn.Module):
    """Attention over 5-d queries, keys and values (Twins' layout), which the dynamo ONNX
    exporter cannot translate (onnxscript's attention takes 4-d inputs only)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, 8, 4, stride=4)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        t = self.proj(x).flatten(2).transpose(1, 2)  # N x L x 8
        q = t.reshape(t.shape[0], 1, t.shape[1], 2, 4).permute(0, 1, 3, 2, 4)  # N x 1 x 2 x L x 4
        y = F.scaled_dot_product_attention(q, q, q).permute(0, 1, 3, 2, 4).reshape(t.shape)
        return self.head(y.mean(1))


def test_onnx_falls_back_to_the_torchscript_exporter(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    torch.manual_seed(0)
    model = convert(_FiveDimAttention(), input_size=SIZE).model.eval()
    with torch.no_grad():
        scale_parameters(model)[0].mul_(1.25)
    result = export(model, "onnx", tmp_path / "model.onnx")
    assert result.note is not None and "TorchScript-based" in result.note
    assert result.max_abs_diff < 1e-5 and result.passes(1e-4, 1e-5)
    assert export(_moved(), "onnx", tmp_path / "plain.onnx").note is None  # the usual exporter
