"""Receptive fields computed analytically through the fx graph (theoretical, in input pixels).

Every tensor carries, per axis, its receptive-field size ``rf`` and its *jump* (the distance
in input pixels between two adjacent units). The input has ``rf = 1, jump = 1``. A node that
reads a local window of ``k`` units with step ``t`` of its input gives

    rf' = rf + (k - 1) * jump,      jump' = jump * t

Windows per operation (each op kind's entry in ``op_registry.SPECS``; by default derived from
the size geometry the cost model reads too):

- convolution: ``k = (kernel - 1) * dilation + 1``, ``t = stride`` (padding does not matter);
- max/avg pool: ``k = (kernel - 1) * dilation + 1``, ``t = stride``;
- DynOPool: with ``c = H / H'`` its cell at the reference size, ``t = c``; ``k`` is the widest
  set of input pixels the four quarter-centre reads of one cell touch, bilinear support
  included, over all cells (pixels with zero bilinear weight excluded). At ``s = 2`` on an even
  size that is 2 (exactly ``max_pool2d(2)``); for a fractional cell it is at most
  ``c / 2 + 2``: the reads span half the cell plus the interpolation support, not the cell;
- DynResize (placement ``exact``): ``t = H / H'``; ``k`` = 2 (bilinear), 1 where the size is unchanged;
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

from torch import fx, nn

from ..op_registry import Window, module_window, window_of
from ..pos_embed import resample_pos_embed
from ..rel_pos import regrid_rel_bias
from .graph import ReportGraph

#: functions that read only the size of their map argument
_GRID_FOLLOWERS = (resample_pos_embed, regrid_rel_bias)

__all__ = ["Field", "ReceptiveFields", "receptive_fields", "dynopool_read_span"]


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


def _tensor_inputs(node: fx.Node) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n) or n)
    return [n for n in found if n.op != "get_attr"]  # parameters and buffers are not activations


def _sequential_window(module: nn.Module) -> Window | None:
    """Compose the convolutions/pools inside an opaque leaf module, in registration order."""
    windows = [module_window(m) for m in module.modules() if m is not module]
    windows = [w for w in windows if w is not None]
    if not windows:
        return None
    f = Field()
    for w in windows:
        f = f.through(w)
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
        if node.op == "placeholder" or not inputs or node.target in _GRID_FOLLOWERS:
            # (a grid follower's value is a parameter resampled to a map's size, not the map's pixels)
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
    """The op registry's window for ``node`` (arguments that are tensors read as their shapes)."""
    if hw_in is None or hw_out is None or node.op not in ("call_module", "call_function"):
        return None
    try:
        return window_of(node, graph.gm, lambda a: graph.shapes.get(a.name) or a, hw_in, hw_out)
    except (TypeError, ValueError):
        # an argument computed in the forward that the rule needs as a number (a pool's kernel
        # read off the map's size): the sizes decide, as for ops no rule knows
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
