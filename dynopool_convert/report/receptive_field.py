"""Receptive fields computed analytically through the fx graph (theoretical, in input pixels).

Every tensor carries, per axis, its receptive-field size ``rf`` and its *jump* (the distance
in input pixels between two adjacent units). The input has ``rf = 1, jump = 1``. A node that
reads a local window of ``k`` units with step ``t`` of its input gives

    rf' = rf + (k - 1) * jump,      jump' = jump * t

Windows per operation (one handler per type, in the tables below):

- convolution: ``k = (kernel - 1) * dilation + 1``, ``t = stride`` (padding does not matter);
- max/avg pool: ``k = (kernel - 1) * dilation + 1``, ``t = stride``;
- DynOPool: with ``c = H / H'`` its cell at the reference size, ``t = c``; ``k`` is the widest
  set of input pixels the four quarter-centre reads of one cell touch, bilinear support
  included, over all cells (pixels with zero bilinear weight excluded). At ``s = 2`` on an even
  size that is 2 (exactly ``max_pool2d(2)``); for a fractional cell it is at most
  ``c / 2 + 2``: the reads span half the cell plus the interpolation support, not the cell;
- adaptive pools: ``k`` = widest bin, ``t = H / H'``;
- interpolate / upsample: ``t = H / H'``; ``k`` = 1 (nearest), 2 (bilinear), 4 (bicubic);
- ops with several spatial operands (add, mul, cat, ...): the maximum over the operands;
  broadcast operands with a 1 x 1 spatial size (squeeze-excitation gates) are ignored: they
  scale channels and do not widen the spatial support;
- every other op passes the field through when it keeps the spatial size. An unknown leaf
  module with convolutions or pools inside (timm's notrace blocks) composes them in
  registration order; an unknown op that resizes is a window ``k = ceil(H / H')``,
  ``t = H / H'``; both are listed in ``approximate`` (a reduction to 1 x 1 is a global pool,
  exact);
- the spatial dims are followed through ``permute``/``transpose`` (channels-last blocks); a
  reshape that moves them loses them until a tensor is N x C x H x W again (listed).

The field is *theoretical*: it is not clipped at the image border.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..dynopool import DynOPool
from ..dynresize import DynResize
from .graph import ReportGraph

__all__ = ["Field", "ReceptiveFields", "receptive_fields", "dynopool_read_span"]

Window = tuple[tuple[float, float], tuple[float, float]]  # ((k_h, t_h), (k_w, t_w))


@dataclass(frozen=True)
class Field:
    """Receptive field ``size`` and ``jump`` per axis (h, w), in input pixels."""

    size: tuple[float, float] = (1.0, 1.0)
    jump: tuple[float, float] = (1.0, 1.0)

    def through(self, window: Window) -> "Field":
        """The field after a local window ``((k_h, t_h), (k_w, t_w))``."""
        (k_h, t_h), (k_w, t_w) = window
        return Field(
            (self.size[0] + (k_h - 1) * self.jump[0], self.size[1] + (k_w - 1) * self.jump[1]),
            (self.jump[0] * t_h, self.jump[1] * t_w),
        )

    @staticmethod
    def widest(fields: list["Field"]) -> "Field":
        return Field(
            (max(f.size[0] for f in fields), max(f.size[1] for f in fields)),
            (max(f.jump[0] for f in fields), max(f.jump[1] for f in fields)),
        )


@dataclass
class ReceptiveFields:
    """Field of every node (by node name) and the nodes handled by the generic fallback."""

    fields: dict[str, Field]
    approximate: list[str] = field(default_factory=list)


def _pair(v) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        return (int(v[0]), int(v[-1]))
    return (int(v), int(v))


def _window(kernel, stride, dilation=1) -> Window:
    k, t, d = _pair(kernel), _pair(stride if stride not in (None, ()) else kernel), _pair(dilation)
    return (((k[0] - 1) * d[0] + 1, t[0]), ((k[1] - 1) * d[1] + 1, t[1]))


def dynopool_read_span(size_in: int, size_out: int) -> int:
    """Widest run of input pixels one DynOPool cell reads along an axis (bilinear support included).

    >>> dynopool_read_span(8, 4), dynopool_read_span(32, 4)
    (2, 6)
    """
    c = size_in / size_out
    widest = 1
    for i in range(size_out):
        q1 = min(max((i + 0.25) * c - 0.5, 0.0), size_in - 1.0)
        q2 = min(max((i + 0.75) * c - 0.5, 0.0), size_in - 1.0)
        first = math.floor(q1 + 1e-9)
        last = round(q2) if abs(q2 - round(q2)) < 1e-9 else math.floor(q2) + 1
        widest = max(widest, min(last, size_in - 1) - first + 1)
    return widest


def _resize_window(hw_in, hw_out, k: tuple[float, float]) -> Window:
    return ((k[0], hw_in[0] / hw_out[0]), (k[1], hw_in[1] / hw_out[1]))


def _adaptive_window(hw_in, hw_out) -> Window:
    def widest_bin(n_in: int, n_out: int) -> int:
        return max(math.ceil((i + 1) * n_in / n_out) - math.floor(i * n_in / n_out) for i in range(n_out))

    return _resize_window(hw_in, hw_out, (widest_bin(hw_in[0], hw_out[0]), widest_bin(hw_in[1], hw_out[1])))


def _interp_support(mode: str) -> float:
    return {"nearest": 1, "nearest-exact": 1, "area": 1, "bilinear": 2, "bicubic": 4}.get(mode, 2)


# -- handlers: (graph, node, module_or_None, hw_in, hw_out) -> Window ---------------------------
ModuleHandler = Callable[[nn.Module, tuple[int, int], tuple[int, int]], Window]


def _conv_module(m: nn.Conv2d, hw_in, hw_out) -> Window:
    return _window(m.kernel_size, m.stride, m.dilation)


def _maxpool_module(m: nn.MaxPool2d, hw_in, hw_out) -> Window:
    return _window(m.kernel_size, m.stride, m.dilation)


def _avgpool_module(m: nn.AvgPool2d, hw_in, hw_out) -> Window:
    return _window(m.kernel_size, m.stride)


def _dynopool_module(m: DynOPool, hw_in, hw_out) -> Window:
    spans = (dynopool_read_span(hw_in[0], hw_out[0]), dynopool_read_span(hw_in[1], hw_out[1]))
    return _resize_window(hw_in, hw_out, spans)


def _adaptive_module(m: nn.Module, hw_in, hw_out) -> Window:
    return _adaptive_window(hw_in, hw_out)


def _dynresize_module(m: DynResize, hw_in, hw_out) -> Window:
    """Bilinear, one sample per output pixel: one pixel read per axis where the size is unchanged."""
    return _resize_window(hw_in, hw_out, tuple(1 if a == b else 2 for a, b in zip(hw_in, hw_out)))


def _upsample_module(m: nn.Upsample, hw_in, hw_out) -> Window:
    s = _interp_support(m.mode)
    return _resize_window(hw_in, hw_out, (s, s))


#: Module type -> handler (subclasses match too: timm's Conv2dSame, StdConv2d, ...).
MODULE_HANDLERS: dict[type, ModuleHandler] = {
    DynResize: _dynresize_module,  # before DynOPool: it is one
    DynOPool: _dynopool_module,
    nn.Conv2d: _conv_module,
    nn.MaxPool2d: _maxpool_module,
    nn.AvgPool2d: _avgpool_module,
    nn.AdaptiveAvgPool2d: _adaptive_module,
    nn.AdaptiveMaxPool2d: _adaptive_module,
    nn.Upsample: _upsample_module,
}


def _arg(node: fx.Node, index: int, name: str, default):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _conv_function(graph: ReportGraph, node: fx.Node, hw_in, hw_out) -> Window:
    weight = _arg(node, 1, "weight", None)
    kshape = graph.shapes.get(weight.name) if isinstance(weight, fx.Node) else None
    kernel = kshape[2:] if kshape else (1, 1)
    return _window(kernel, _arg(node, 3, "stride", 1), _arg(node, 5, "dilation", 1))


def _maxpool_function(graph: ReportGraph, node: fx.Node, hw_in, hw_out) -> Window:
    kernel = _arg(node, 1, "kernel_size", 1)
    return _window(kernel, _arg(node, 2, "stride", None) or kernel, _arg(node, 4, "dilation", 1))


def _avgpool_function(graph: ReportGraph, node: fx.Node, hw_in, hw_out) -> Window:
    kernel = _arg(node, 1, "kernel_size", 1)
    return _window(kernel, _arg(node, 2, "stride", None) or kernel)


def _adaptive_function(graph: ReportGraph, node: fx.Node, hw_in, hw_out) -> Window:
    return _adaptive_window(hw_in, hw_out)


def _interpolate_function(graph: ReportGraph, node: fx.Node, hw_in, hw_out) -> Window:
    s = _interp_support(str(_arg(node, 3, "mode", "nearest")))
    return _resize_window(hw_in, hw_out, (s, s))


FunctionHandler = Callable[[ReportGraph, fx.Node, tuple[int, int], tuple[int, int]], Window]

#: Function (call_function target) -> handler.
FUNCTION_HANDLERS: dict[Callable, FunctionHandler] = {
    F.conv2d: _conv_function,
    torch.conv2d: _conv_function,
    F.max_pool2d: _maxpool_function,
    torch.max_pool2d: _maxpool_function,
    F.avg_pool2d: _avgpool_function,
    torch._C._nn.avg_pool2d: _avgpool_function,
    F.adaptive_avg_pool2d: _adaptive_function,
    F.adaptive_max_pool2d: _adaptive_function,
    F.interpolate: _interpolate_function,
}

def _tensor_inputs(node: fx.Node) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n) or n)
    return [n for n in found if n.op != "get_attr"]  # parameters and buffers are not activations


def _sequential_window(module: nn.Module) -> Window | None:
    """Compose the convolutions/pools inside an opaque leaf module, in registration order."""
    inner = [m for m in module.modules() if m is not module and isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d))]
    if not inner:
        return None
    f = Field()
    for m in inner:
        handler = next(h for t, h in MODULE_HANDLERS.items() if isinstance(m, t))
        f = f.through(handler(m, (1, 1), (1, 1)))
    return ((f.size[0], f.jump[0]), (f.size[1], f.jump[1]))


def _permuted_axes(node: fx.Node, axes: tuple[int, int], rank: int) -> tuple[int, int] | None:
    """Where the (h, w) dims go through a permute/transpose (None: not a layout op we follow)."""
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    args = list(node.args[1:])
    if name == "permute":
        dims = list(args[0]) if len(args) == 1 and isinstance(args[0], (list, tuple)) else args
        dims = [d % rank for d in dims]
        return dims.index(axes[0]), dims.index(axes[1])
    if name in ("transpose", "swapaxes") and len(args) == 2:
        a, b = args[0] % rank, args[1] % rank
        swap = {a: b, b: a}
        return swap.get(axes[0], axes[0]), swap.get(axes[1], axes[1])
    return None


_RESHAPES = {"reshape", "view", "flatten", "unflatten", "view_as", "reshape_as"}


def _is_reshape(node: fx.Node) -> bool:
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    return node.op in ("call_method", "call_function") and name in _RESHAPES


def _spatial_of(shape, axes) -> tuple[int, int] | None:
    if shape is None or axes is None or len(shape) <= max(axes):
        return None
    return int(shape[axes[0]]), int(shape[axes[1]])


def receptive_fields(graph: ReportGraph, shapes: dict[str, tuple[int, ...] | None] | None = None) -> ReceptiveFields:
    """Receptive field of every node of ``graph`` at the given node ``shapes`` (default: present).

    The spatial dims of every tensor are followed through the graph (dims 2, 3 of the input;
    ``permute``/``transpose`` move them, e.g. channels-last blocks), so an N x H x W x C tensor
    is read correctly.
    """
    shapes = graph.shapes if shapes is None else shapes
    result = ReceptiveFields({})
    fields = result.fields
    axes: dict[str, tuple[int, int] | None] = {}
    for node in graph.nodes:
        shape = shapes.get(node.name)
        inputs = [n for n in _tensor_inputs(node) if n.name in fields]
        if node.op == "placeholder" or not inputs:
            fields[node.name] = Field()
            axes[node.name] = (2, 3) if shape is not None and len(shape) == 4 and node.op == "placeholder" else None
            continue
        spatial_in = [(n, _spatial_of(shapes.get(n.name), axes.get(n.name))) for n in inputs]
        spatial_in = [(n, hw) for n, hw in spatial_in if hw is not None]
        if not spatial_in:  # no spatial operand: a non-spatial value (flattened features, ...)
            fields[node.name] = Field.widest([fields[n.name] for n in inputs])
            axes[node.name] = None
            if shape is not None and len(shape) == 4 and any(len(shapes.get(n.name) or ()) for n in inputs):
                # reshaped back to N x C x H x W (token/patch layouts): follow it again, approximately
                axes[node.name] = (2, 3)
                result.approximate.append(node.name)
            continue
        # the primary operand: the widest one (a 1 x 1 SE gate may come first in ``gate * x``)
        primary, hw_in = max(spatial_in, key=lambda item: item[1][0] * item[1][1])
        rank = len(shapes[primary.name]) if shapes.get(primary.name) is not None else 0
        moved = _permuted_axes(node, axes[primary.name], rank) if node.op in ("call_method", "call_function") else None
        out_axes = moved if moved is not None else (axes[primary.name] if shape is not None and len(shape) == rank else None)
        if _is_reshape(node) and shape != shapes.get(primary.name):
            out_axes = None  # a reshape that moves elements: the spatial dims are lost (tokens, patches)
        axes[node.name] = out_axes
        hw_out = _spatial_of(shape, out_axes)
        # broadcast 1x1 operands (SE gates) do not widen the support when larger operands exist
        joined = [n for n, hw in spatial_in if hw != (1, 1) or hw_in == (1, 1)]
        base = Field.widest([fields[n.name] for n in joined])
        window = _window_of(graph, node, hw_in, hw_out)
        opaque = graph.module_of(node)
        if window is None and opaque is not None and hw_out is not None and _sequential_window(opaque) is not None:
            window = _sequential_window(opaque)  # a leaf module with convs/pools inside (timm notrace)
            result.approximate.append(node.name)
        elif window is None and hw_out is not None and hw_in != hw_out:
            window = _fallback_window(graph, node, hw_in, hw_out)
            if hw_out != (1, 1):  # a reduction to 1 x 1 (x.mean((2, 3))) is a global pool: exact
                result.approximate.append(node.name)
        fields[node.name] = base.through(window) if window is not None else base
    return result


def _window_of(graph: ReportGraph, node: fx.Node, hw_in, hw_out) -> Window | None:
    if hw_in is None or hw_out is None:
        return None
    if node.op == "call_module":
        module = graph.module_of(node)
        for t, handler in MODULE_HANDLERS.items():
            if isinstance(module, t):
                return handler(module, hw_in, hw_out)
    elif node.op == "call_function" and node.target in FUNCTION_HANDLERS:
        return FUNCTION_HANDLERS[node.target](graph, node, hw_in, hw_out)
    return None


def _fallback_window(graph: ReportGraph, node: fx.Node, hw_in, hw_out) -> Window:
    module = graph.module_of(node)
    if module is not None:
        seq = _sequential_window(module)
        if seq is not None:
            return seq
    return (
        (math.ceil(hw_in[0] / hw_out[0]), hw_in[0] / hw_out[0]),
        (math.ceil(hw_in[1] / hw_out[1]), hw_in[1] / hw_out[1]),
    )
