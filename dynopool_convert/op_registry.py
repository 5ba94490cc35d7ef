"""The op registry: everything the package knows about one kind of resizing op, in one entry.

An ``OpSpec`` names the modules and/or functions it covers and holds

- ``site``: the ``SiteHandler`` that finds, describes and rewrites it (``sites.py``);
- ``geometry``: how it changes the spatial size (a window, TF-"same" padding, a fixed size,
  a scale factor), read by the cost model (``cost_model.py``) to follow sizes in closed form;
- ``window``: its receptive-field window (``report/receptive_field.py``); by default derived
  from ``geometry``;
- ``leaf``/``autowrap``: the tracer (``tracing.py``) keeps its modules as leaves and its functions as single
  calls, so that all passes see the same node.

Adding an op kind is one entry in ``SPECS`` (docs/ARCHITECTURE.md). First match wins, in
order; a module matches a spec when it is an instance of one of ``modules`` (subclasses too),
a function when it is one of ``functions``.
"""
from __future__ import annotations

import dataclasses
import math
import operator
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from timm.layers import BlurPool2d
from timm.layers.pool2d_same import avg_pool2d_same, max_pool2d_same
from torch import fx, nn

from ._helpers import int_pair
from .dynopool import DynOPool
from .dynresize import DynResize
from .input_site import InputSiteHandler, input_resize
from .sites import (
    AdaptiveFunctionHandler,
    AdaptiveModuleHandler,
    ConvHandler,
    InterpolateFunctionHandler,
    PoolFunctionHandler,
    PoolModuleHandler,
    SiteHandler,
    StridedSliceHandler,
    TransposedConvHandler,
    UnsupportedStridedModuleHandler,
    UpsampleModuleHandler,
    slice_steps,
)
from .sites_conv_function import CONV_FUNCTIONS, CONV_PARAMS, ConvFunctionHandler
from .sites_unfold import UnfoldHandler
from .sites_unshuffle import UNSHUFFLE_FUNCTIONS, UnshuffleHandler

__all__ = ["Geometry", "OpCall", "OpSpec", "SPECS", "Window", "spec_for", "spec_for_node", "op_call",
           "site_specs", "leaf_module_types", "autowrap_functions", "window_of"]

#: a receptive-field window per axis: ((k_h, t_h), (k_w, t_w)), kernel extent and step
Window = tuple[tuple[float, float], tuple[float, float]]
HW = tuple[int, int]


@dataclass(frozen=True)
class Geometry:
    """How an op maps its input's spatial size to its output's.

    ``window``: ``floor((n + padding - dilation (kernel - 1) - 1) / stride) + 1`` per axis
    (``padding`` is the total of both sides; None when not a static number, e.g. ``'same'``);
    ``same``: TF-"same" padding computed at run time, ``ceil(n / stride)``; ``fixed``: an output
    size that does not depend on the input (adaptive pools, ``interpolate(size=...)``);
    ``scale``: ``floor(n * factor)``; ``transposed``: a transposed convolution,
    ``(n - 1) * stride - padding + dilation (kernel - 1) + output_padding + 1`` (``output_padding``
    in ``factor``). ``flops_on``: whether fvcore's count of the op scales with
    its input (``in``) or output (``out``) area. ``support``: the input pixels one output pixel
    reads for resizes (None: adaptive bins).
    """

    kind: str
    kernel: HW = (1, 1)
    stride: HW = (1, 1)
    padding: HW | None = (0, 0)
    dilation: HW = (1, 1)
    ceil: bool = False
    factor: tuple[float, float] = (1.0, 1.0)
    support: float | None = None
    flops_on: str = "in"
    flat: bool = False  # the output's grid flattened into one axis (an unfold's N x C k^2 x L)


@dataclass(frozen=True)
class OpCall:
    """One call of an op, as the passes see it: the module (call_module) or the function and its
    arguments after the input bound by name (tensors given as their shapes, or as they are)."""

    module: nn.Module | None = None
    target: Callable | None = None
    args: dict[str, Any] | None = None

    def arg(self, name: str, default: Any = None) -> Any:
        value = (self.args or {}).get(name, default)
        return default if value is None else value


@dataclass(frozen=True)
class OpSpec:
    """One op kind: what it matches and what every pass needs to know about it."""

    name: str
    modules: tuple[type, ...] = ()
    functions: tuple[Callable, ...] = ()
    params: tuple[str, ...] = ()  # positional parameter names after the input (of a forward, for modules)
    site: SiteHandler | None = None
    geometry: Callable[[OpCall], list[Geometry]] | None = None
    window: Callable[[OpCall, HW, HW], Window | None] | None = None  # default: from geometry
    leaf: bool = True
    autowrap: bool = False

    def covers(self, module: nn.Module | None = None, target: Any = None) -> bool:
        if module is not None:
            return isinstance(module, self.modules)
        return target is not None and any(target is f for f in self.functions)

    def window_of(self, call: OpCall, hw_in: HW, hw_out: HW) -> Window | None:
        """The receptive-field window of ``call`` (None: the op keeps the field)."""
        if self.window is not None:
            return self.window(call, hw_in, hw_out)
        shapes = self.geometry(call) if self.geometry is not None else []
        return geometry_window(shapes[0], hw_in, hw_out) if shapes else None


# --------------------------------------------------------------------------------------------
# geometries and windows


def window_geometry(kernel: Any, stride: Any, padding: Any = 0, dilation: Any = 1, ceil: bool = False,
                    flops_on: str = "in", same: bool = False) -> list[Geometry]:
    """A window op; with ``same``, also TF-"same" padding at run time (timm's ``*Same`` subclasses
    keep ``padding = 0`` and pad in their forward: the cost model tries both)."""
    k, s, d = int_pair(kernel), int_pair(stride if stride not in (None, (), []) else kernel), int_pair(dilation)
    p = None if isinstance(padding, str) else tuple(2 * v for v in int_pair(padding))
    out = [Geometry("window", k, s, p, d, bool(ceil), flops_on=flops_on)]
    if same and max(s) > 1:
        out.append(Geometry("same", k, s, None, d, flops_on=flops_on))
    return out


def _unfold(geometry: Any) -> list[Geometry]:
    """An unfold's patch grid: a window (its output flattens it into the last axis)."""
    get = (lambda k, d: getattr(geometry, k)) if isinstance(geometry, nn.Module) else (lambda k, d: geometry.get(k, d))
    g = window_geometry(get("kernel_size", None), get("stride", 1), get("padding", 0), get("dilation", 1))[0]
    return [dataclasses.replace(g, flat=True)]


def geometry_window(g: Geometry, hw_in: HW, hw_out: HW) -> Window:
    """The receptive-field window of a geometry at the given sizes."""
    if g.kind == "transposed":  # an output pixel reads ceil(extent / stride) inputs, a step of 1/stride
        return tuple((math.ceil(((g.kernel[i] - 1) * g.dilation[i] + 1) / g.stride[i]), 1.0 / g.stride[i])
                     for i in range(2))  # type: ignore[return-value]
    if g.kind in ("window", "same"):
        return tuple(((g.kernel[i] - 1) * g.dilation[i] + 1, g.stride[i]) for i in range(2))  # type: ignore[return-value]
    if g.support is None:
        return adaptive_window(hw_in, hw_out)
    return resize_window(hw_in, hw_out, (g.support, g.support))


def resize_window(hw_in: HW, hw_out: HW, k: tuple[float, float]) -> Window:
    return (k[0], hw_in[0] / hw_out[0]), (k[1], hw_in[1] / hw_out[1])


def adaptive_window(hw_in: HW, hw_out: HW) -> Window:
    def widest_bin(n_in: int, n_out: int) -> int:
        return max(math.ceil((i + 1) * n_in / n_out) - math.floor(i * n_in / n_out) for i in range(n_out))

    return resize_window(hw_in, hw_out, (widest_bin(hw_in[0], hw_out[0]), widest_bin(hw_in[1], hw_out[1])))


def interp_support(mode: Any) -> float:
    """Input pixels one output pixel of an interpolation reads, per axis."""
    return {"nearest": 1, "nearest-exact": 1, "area": 1, "bilinear": 2, "bicubic": 4}.get(str(mode), 2)


def _interpolation(size: Any, scale: Any, mode: Any) -> list[Geometry]:
    if size is not None:
        return [Geometry("fixed", support=interp_support(mode), flops_on="out")]
    if scale is None:
        return []
    f = scale if isinstance(scale, (tuple, list)) else (scale, scale)
    return [Geometry("scale", factor=(float(f[0]), float(f[-1])), support=interp_support(mode), flops_on="out")]


def _pad(pad: Any) -> list[Geometry]:
    """Padding ``(left, right[, top, bottom])``: a window of 1 with that total padding."""
    pad = tuple(int(v) for v in (pad if isinstance(pad, (tuple, list)) else (pad,) * 4))
    left, right = pad[0], pad[1] if len(pad) > 1 else pad[0]
    top, bottom = (pad[2], pad[3]) if len(pad) >= 4 else (0, 0)
    return [Geometry("window", padding=(top + bottom, left + right))]


def _shuffle(factor: Any, up: bool) -> list[Geometry]:
    """``PixelShuffle(r)``: ``n * r`` (a scale); ``PixelUnshuffle(r)``: ``n / r``, defined on
    multiples of ``r`` only (a window of ``r`` at step ``r``; validation rounds sizes there)."""
    if not isinstance(factor, int):
        return []
    if up:
        return [Geometry("scale", factor=(float(factor), float(factor)), support=1, flops_on="out")]
    return [Geometry("window", (factor, factor), (factor, factor), (0, 0))]


def _unpool(kernel: Any, stride: Any, padding: Any, output_size: Any) -> list[Geometry]:
    """``MaxUnpool2d``: ``(n - 1) s - 2 p + k`` (a transposed window); with an ``output_size``
    (read off a map, as a rule) no geometry here: the size follows that map."""
    if output_size is not None or not isinstance(kernel, (int, tuple, list)):
        return []
    k, p = int_pair(kernel), int_pair(padding or 0)
    return [Geometry("transposed", k, int_pair(stride or kernel), (2 * p[0], 2 * p[1]), factor=(0.0, 0.0), flops_on="out")]


def _strided_slice(index: Any) -> list[Geometry]:
    """``x[..., ::s_h, ::s_w]``: ``ceil(n / s)``, a one-pixel window at step ``s``."""
    steps = slice_steps(index)
    return [] if steps is None else [Geometry("window", (1, 1), steps, (0, 0))]


#: the window of an op that moves no pixel relative to another (padding: the amounts, which Swin
#: computes in its forward, only add border pixels)
_KEEPS_FIELD: Window = ((1, 1.0), (1, 1.0))


def _dynopool_window(call: OpCall, hw_in: HW, hw_out: HW) -> Window:
    from .report.receptive_field import dynopool_read_span

    spans = (dynopool_read_span(hw_in[0], hw_out[0]), dynopool_read_span(hw_in[1], hw_out[1]))
    return resize_window(hw_in, hw_out, spans)


def _dynresize_window(call: OpCall, hw_in: HW, hw_out: HW) -> Window:
    """Bilinear, one sample per output pixel: one pixel read per axis where the size is unchanged."""
    return resize_window(hw_in, hw_out, tuple(1 if a == b else 2 for a, b in zip(hw_in, hw_out)))


def _weight_kernel(call: OpCall) -> tuple:
    w = call.arg("weight")
    return tuple(w[-2:]) if isinstance(w, (tuple, list)) and len(w) == 4 else (1, 1)


_MAX_PARAMS = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
_AVG_PARAMS = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")


def _pool_call(call: OpCall) -> list[Geometry]:
    return window_geometry(call.arg("kernel_size", 1), call.arg("stride"), call.arg("padding", 0),
                           call.arg("dilation", 1), call.arg("ceil_mode", False))


def _same_pool_call(call: OpCall) -> list[Geometry]:
    k = call.arg("kernel_size", 1)
    return [Geometry("same", int_pair(k), int_pair(call.arg("stride") or k), None, int_pair(call.arg("dilation", 1)))]


def _conv_module(m: nn.Conv2d) -> list[Geometry]:
    return window_geometry(m.kernel_size, m.stride, m.padding, m.dilation, flops_on="out", same=True)


def _conv_transpose_module(m: nn.ConvTranspose2d) -> list[Geometry]:
    if isinstance(m.padding, str):
        return []
    # fvcore counts a transposed convolution on its input's area
    return [Geometry("transposed", int_pair(m.kernel_size), int_pair(m.stride), tuple(2 * v for v in int_pair(m.padding)),
                     int_pair(m.dilation), factor=tuple(float(v) for v in int_pair(m.output_padding)), flops_on="in")]


def _pool_module(m: nn.Module) -> list[Geometry]:
    dilation = getattr(m, "dilation", 1) if not isinstance(m, nn.AvgPool2d) else 1
    return window_geometry(m.kernel_size, m.stride, getattr(m, "padding", 0), dilation, getattr(m, "ceil_mode", False),
                           same=isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)))


def _blur_pool(m: BlurPool2d) -> list[Geometry]:
    # F.pad(x, m.padding) then a depthwise conv with the filt_size x filt_size binomial filter
    top, bottom = m.padding[2], m.padding[3]
    return [Geometry("window", int_pair(m.filt_size), int_pair(m.stride), (top + bottom, m.padding[0] + m.padding[1]),
                     flops_on="out")]


def _module_geometry(fn: Callable[[Any], list[Geometry]]) -> Callable[[OpCall], list[Geometry]]:
    return lambda call: fn(call.module)


# --------------------------------------------------------------------------------------------
# the table, first match wins

_PAD_MODULES = (nn.ConstantPad2d, nn.ZeroPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d, nn.CircularPad2d)
_ADAPTIVE_FUNCTIONS = {F.adaptive_avg_pool2d: "F.adaptive_avg_pool2d", F.adaptive_max_pool2d: "F.adaptive_max_pool2d"}

SPECS: tuple[OpSpec, ...] = (
    # placement exact: a resize in front of the kept op (a DynOPool subclass: before "dynopool")
    OpSpec("dynresize", modules=(DynResize,), window=_dynresize_window),
    OpSpec("dynopool", modules=(DynOPool,), window=_dynopool_window),  # the cost model follows its group
    OpSpec("input_site", functions=(input_resize,), site=InputSiteHandler()),  # convert(input_site=True); identity
    OpSpec("conv", modules=(nn.Conv2d,), site=ConvHandler(), geometry=_module_geometry(_conv_module)),
    OpSpec("conv_transpose", modules=(nn.ConvTranspose2d,), site=TransposedConvHandler(),
           geometry=_module_geometry(_conv_transpose_module)),
    OpSpec("max_pool", modules=(nn.MaxPool2d,), site=PoolModuleHandler("max"), geometry=_module_geometry(_pool_module)),
    OpSpec("avg_pool", modules=(nn.AvgPool2d,), site=PoolModuleHandler("mean"), geometry=_module_geometry(_pool_module)),
    OpSpec("lp_pool", modules=(nn.LPPool2d,), site=PoolModuleHandler("mean"), geometry=_module_geometry(_pool_module)),
    OpSpec("blur_pool", modules=(BlurPool2d,), site=PoolModuleHandler("mean"), geometry=_module_geometry(_blur_pool)),
    OpSpec("adaptive_pool", modules=(nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d), site=AdaptiveModuleHandler(),
           geometry=lambda call: [Geometry("fixed")]),
    OpSpec("upsample", modules=(nn.Upsample,), site=UpsampleModuleHandler(),
           geometry=lambda c: _interpolation(c.module.size, c.module.scale_factor, c.module.mode)),
    OpSpec("pad", modules=_PAD_MODULES, geometry=lambda call: _pad(call.module.padding), leaf=False),
    OpSpec("max_pool_function", functions=(F.max_pool2d,), params=_MAX_PARAMS, geometry=_pool_call,
           site=PoolFunctionHandler("F.max_pool2d", "max")),
    OpSpec("torch_max_pool_function", functions=(torch.max_pool2d,), params=_MAX_PARAMS[:5], geometry=_pool_call,
           site=PoolFunctionHandler("torch.max_pool2d", "max")),
    OpSpec("max_pool_indices_function", functions=(F.max_pool2d_with_indices,), params=_MAX_PARAMS, geometry=_pool_call,
           site=PoolFunctionHandler("F.max_pool2d_with_indices", "max")),
    OpSpec("avg_pool_function", functions=(F.avg_pool2d,), params=_AVG_PARAMS, geometry=_pool_call,
           site=PoolFunctionHandler("F.avg_pool2d", "mean")),
    OpSpec("aten_avg_pool_function", functions=(torch._C._nn.avg_pool2d,), params=_AVG_PARAMS, geometry=_pool_call),
    OpSpec("max_pool2d_same", functions=(max_pool2d_same,), params=_MAX_PARAMS[:5], geometry=_same_pool_call,
           site=PoolFunctionHandler("timm max_pool2d_same", "max"), autowrap=True),
    OpSpec("avg_pool2d_same", functions=(avg_pool2d_same,), params=_AVG_PARAMS[:5], geometry=_same_pool_call,
           site=PoolFunctionHandler("timm avg_pool2d_same", "mean"), autowrap=True),
    OpSpec("adaptive_pool_function", functions=tuple(_ADAPTIVE_FUNCTIONS), site=AdaptiveFunctionHandler(_ADAPTIVE_FUNCTIONS),
           geometry=lambda call: [Geometry("fixed")]),
    OpSpec("adaptive_pool1d_function", functions=(torch.adaptive_avg_pool1d,),
           site=AdaptiveFunctionHandler({torch.adaptive_avg_pool1d: "torch.adaptive_avg_pool1d"})),
    OpSpec("interpolate_function", functions=(F.interpolate, F.upsample), params=("size", "scale_factor", "mode", "align_corners"),
           site=InterpolateFunctionHandler({F.interpolate: "F.interpolate", F.upsample: "F.upsample"}),
           geometry=lambda c: _interpolation(c.arg("size"), c.arg("scale_factor"), c.arg("mode", "nearest"))),
    OpSpec("conv_function", functions=CONV_FUNCTIONS, params=CONV_PARAMS, site=ConvFunctionHandler(),
           geometry=lambda c: window_geometry(_weight_kernel(c), c.arg("stride", 1), c.arg("padding", 0), c.arg("dilation", 1),
                                              flops_on="out")),
    # channels to space and back: sizes times or over the factor; space to depth is a patchify
    # site (sites_unshuffle.py), depth to space no site (it adds no pixel of its own)
    OpSpec("pixel_shuffle", modules=(nn.PixelShuffle,), geometry=lambda c: _shuffle(c.module.upscale_factor, up=True)),
    OpSpec("pixel_unshuffle", modules=(nn.PixelUnshuffle,), site=UnshuffleHandler(),
           geometry=lambda c: _shuffle(c.module.downscale_factor, up=False)),
    OpSpec("pixel_shuffle_function", functions=(F.pixel_shuffle, torch.pixel_shuffle), params=("upscale_factor",),
           geometry=lambda c: _shuffle(c.arg("upscale_factor"), up=True)),
    OpSpec("pixel_unshuffle_function", functions=UNSHUFFLE_FUNCTIONS, params=("downscale_factor",), site=UnshuffleHandler(),
           geometry=lambda c: _shuffle(c.arg("downscale_factor"), up=False)),
    # upsampling to a max pool's indices (fvcore counts no FLOPs for it): a transposed window
    OpSpec("max_unpool", modules=(nn.MaxUnpool2d,), params=("indices", "output_size"),
           geometry=lambda c: _unpool(c.module.kernel_size, c.module.stride, c.module.padding, c.arg("output_size"))),
    OpSpec("max_unpool_function", functions=(F.max_unpool2d,), params=("indices", "kernel_size", "stride", "padding", "output_size"),
           geometry=lambda c: _unpool(c.arg("kernel_size"), c.arg("stride"), c.arg("padding", 0), c.arg("output_size"))),
    # x[:, :, ::2, ::2]; any other indexing has no geometry here (the cost model's other rules)
    OpSpec("strided_slice", functions=(operator.getitem,), params=("index",), site=StridedSliceHandler(),
           geometry=lambda c: _strided_slice(c.arg("index"))),
    OpSpec("pad_function", functions=(F.pad,), params=("pad", "mode", "value"), geometry=lambda c: _pad(c.arg("pad", ())),
           window=lambda c, hw_in, hw_out: _KEEPS_FIELD),
    # T2T's soft split: overlapping patches every `stride` pixels, as tokens (sites_unfold.py)
    OpSpec("unfold", modules=(nn.Unfold,), functions=(F.unfold,), params=("kernel_size", "dilation", "padding", "stride"),
           site=UnfoldHandler(), geometry=lambda c: _unfold(c.module if c.module is not None else (c.args or {}))),
    # last: any other leaf module with a stride > 1, listed as a site that is not converted
    OpSpec("unsupported", modules=(nn.Module,), site=UnsupportedStridedModuleHandler(), leaf=False),
)


# --------------------------------------------------------------------------------------------
# queries


def spec_for(module: nn.Module | None = None, target: Any = None) -> OpSpec | None:
    """The first spec covering ``module`` (or the function ``target``), None if none does."""
    return next((s for s in SPECS if s.covers(module, target) and s.name != "unsupported"), None)


def op_call(node: fx.Node, gm: fx.GraphModule, value_of: Callable[[fx.Node], Any], spec: OpSpec) -> OpCall:
    """``node`` as an ``OpCall`` for ``spec`` (``value_of`` gives a node argument's value or shape)."""
    bound = dict(zip(spec.params, node.args[1:]))
    bound.update({k: v for k, v in node.kwargs.items() if k != "input"})
    if node.op == "call_module":  # a module's forward arguments too (MaxUnpool2d's output_size)
        return OpCall(module=gm.get_submodule(node.target), args=fx.node.map_arg(bound, value_of) if spec.params else None)
    return OpCall(target=node.target, args=fx.node.map_arg(bound, value_of))


def spec_for_node(node: fx.Node, gm: fx.GraphModule) -> OpSpec | None:
    """The spec of a call_module/call_function node (geometry and window; not the site table)."""
    if node.op == "call_module":
        return spec_for(module=gm.get_submodule(node.target))
    if node.op == "call_function":
        return spec_for(target=node.target)
    return None


def window_of(node: fx.Node, gm: fx.GraphModule, value_of: Callable[[fx.Node], Any], hw_in: HW, hw_out: HW) -> Window | None:
    """The receptive-field window of ``node`` from its spec, None when no spec knows it."""
    spec = spec_for_node(node, gm)
    return spec.window_of(op_call(node, gm, value_of, spec), hw_in, hw_out) if spec is not None else None


def site_specs() -> Iterator[OpSpec]:
    """Specs with a site handler, in table order."""
    return (s for s in SPECS if s.site is not None)


def leaf_module_types() -> list[type]:
    """Module classes the tracer keeps as leaves (their ops are single nodes)."""
    return list(dict.fromkeys(t for s in SPECS if s.leaf for t in s.modules))


def autowrap_functions() -> list[Callable]:
    """Functions the tracer records as single calls instead of tracing into them."""
    return [f for s in SPECS if s.autowrap for f in s.functions]


def module_window(m: nn.Module) -> Window | None:
    """The window of a module on its own (sizes unknown: window ops only)."""
    spec = spec_for(module=m)
    shapes = spec.geometry(OpCall(module=m)) if spec is not None and spec.geometry is not None else []
    return geometry_window(shapes[0], (1, 1), (1, 1)) if shapes and shapes[0].kind in ("window", "same") else None

