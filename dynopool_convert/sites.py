"""Site handlers, one per op kind, in a table (DESIGN.md §2).

A handler recognises one kind of resizing op in the traced graph, describes it (``inspect``:
stride, default aggregate, or why it is left alone) and rewrites it around a DynOPool module
(``apply``). Handlers are configured per op kind and listed in the op registry
(``op_registry.SPECS``): the spec says which modules/functions a handler sees, ``match`` adds the
handler's own conditions (a stride > 1, ...). Supporting a new layer is one registry entry.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch.nn.functional as F
from torch import fx, nn

from ._helpers import node_hw, pair_of_floats

__all__ = ["Candidate", "SiteHandler", "HANDLERS", "find_candidates", "site_module_types", "handler_for"]


@dataclass
class Candidate:
    """A resizing op found in the graph: what it is, its stride, or why it stays as it is."""

    node: str  # fx node name (key into the graph)
    name: str  # qualified site name (module path style)
    kind: str  # "conv" | "pool" | "interpolate"
    op: str  # human-readable op description
    handler: str
    stride: tuple[float, float] | None = None
    aggregate: str = "max"
    skip_reason: str = ""
    patch: tuple[int, int] | None = None  # a patchify conv (kernel == stride, no padding): its kernel


class SiteHandler(Protocol):
    """One kind of site: recognise, describe, rewrite (``match`` is asked about the nodes its
    registry entry covers)."""

    name: str
    kind: str

    def match(self, node: fx.Node, gm: fx.GraphModule) -> bool: ...

    def inspect(self, node: fx.Node, gm: fx.GraphModule) -> Candidate: ...

    def apply(self, gm: fx.GraphModule, node: fx.Node, pool_path: str, placement: str) -> None: ...


# ----------------------------------------------------------------------------------------
# helpers


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    if node.op != "call_module":
        return None
    return gm.get_submodule(node.target)


def _users_of_module(gm: fx.GraphModule, target: str) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_module" and n.target == target)


def _as_stride(value: Any) -> tuple[float, float] | None:
    """A static (h, w) stride from an int/float/tuple argument, None when not static."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value), float(value)
    if isinstance(value, (tuple, list)) and all(isinstance(v, (int, float)) for v in value):
        if len(value) == 1:
            return float(value[0]), float(value[0])
        if len(value) == 2:
            return float(value[0]), float(value[1])
    return None


def _is_4d(node: fx.Node) -> bool:
    return node_hw(node) is not None


def _retarget_to_pool(gm: fx.GraphModule, node: fx.Node, pool_path: str) -> None:
    """Turn ``node`` into a call of the DynOPool module at ``pool_path`` on its first input."""
    node.op = "call_module"
    node.target = pool_path
    node.args = (node.args[0] if node.args else node.kwargs["input"],)
    node.kwargs = {}


def _fmt(value: Any) -> str:
    """``(3, 3)`` -> ``3``, ``(3, 1)`` -> ``3x1``, ``'same'`` -> ``same``."""
    if isinstance(value, (tuple, list)):
        return _fmt(value[0]) if len(set(value)) == 1 else "x".join(str(v) for v in value)
    return str(value)


def _desc(module: nn.Module) -> str:
    """``Conv2d(k=7, s=2, p=3)``: the class and its static geometry."""
    parts = [f"{key}={_fmt(getattr(module, attr))}" for key, attr in (("k", "kernel_size"), ("s", "stride"), ("p", "padding"))
             if getattr(module, attr, None) is not None]
    return f"{type(module).__name__}({', '.join(parts)})"


# ----------------------------------------------------------------------------------------
# strided convolutions

#: Conv2d subclasses that compute their own TF-'SAME' padding from the stride at run time:
#: setting stride 1 is enough, their padding attribute stays 0.
_DYNAMIC_SAME_PAD: tuple[str, ...] = (
    "Conv2dSame",
    "Conv2dSameExport",
    "StdConv2dSame",
    "ScaledStdConv2dSame",
)


def _same_padding(conv: nn.Conv2d) -> tuple[int, int] | str:
    kh, kw = conv.kernel_size
    dh, dw = conv.dilation
    if kh % 2 == 1 and kw % 2 == 1:
        return dh * (kh - 1) // 2, dw * (kw - 1) // 2
    return "same"  # even kernels: torch pads asymmetrically


def patch_size(conv: nn.Conv2d) -> tuple[int, int] | None:
    """The kernel of a patchify conv (kernel == stride, no padding or dilation), else None."""
    k, st = tuple(conv.kernel_size), tuple(conv.stride)
    if k != st or tuple(conv.dilation) != (1, 1) or isinstance(conv.padding, str) or any(conv.padding):
        return None
    if type(conv).__name__ in _DYNAMIC_SAME_PAD or getattr(conv, "same_pad", False):
        return None
    return int(k[0]), int(k[1])


def make_conv_stride_one(conv: nn.Conv2d) -> None:
    """Stride 1 with 'same'-equivalent padding (H_out == H_in), keeping the conv's class."""
    conv.stride = (1, 1)
    if type(conv).__name__ in _DYNAMIC_SAME_PAD or getattr(conv, "same_pad", False):
        return
    conv.padding = _same_padding(conv)
    # what nn.Conv2d derives from padding for non-'zeros' padding modes
    pad = []
    for d, k in zip(conv.dilation, conv.kernel_size):
        total = d * (k - 1)
        pad = [total // 2, total - total // 2] + pad
    conv._reversed_padding_repeated_twice = pad


class ConvHandler:
    """``nn.Conv2d`` and subclasses (timm ``Conv2dSame``, ``StdConv2d``, ...) with stride > 1."""

    name = "conv"
    kind = "conv"

    def match(self, node: fx.Node, gm: fx.GraphModule) -> bool:
        m = _module(gm, node)
        return isinstance(m, nn.Conv2d) and tuple(m.stride) != (1, 1)

    def inspect(self, node: fx.Node, gm: fx.GraphModule) -> Candidate:
        conv = _module(gm, node)
        cand = Candidate(node.name, "", self.kind, _desc(conv), self.name, pair_of_floats(tuple(conv.stride)), "max",
                         patch=patch_size(conv))
        if _users_of_module(gm, node.target) > 1:
            cand.skip_reason = "the conv module is called at several places (weights shared): its stride cannot change for one call"
        elif not _is_4d(node):
            cand.skip_reason = "input is not an N x C x H x W tensor"
        return cand

    def apply(self, gm: fx.GraphModule, node: fx.Node, pool_path: str, placement: str) -> None:
        """``before``/``after``: the conv at stride 1 after/before DynOPool; ``patchify``: the
        conv unchanged after a DynOPool that resizes its input to a multiple of the patch."""
        if placement != "patchify":
            make_conv_stride_one(gm.get_submodule(node.target))
        graph = gm.graph
        if placement in ("before", "patchify"):
            with graph.inserting_before(node):
                pool = graph.call_module(pool_path, (node.args[0],))
            node.args = (pool, *node.args[1:])
        else:
            with graph.inserting_after(node):
                pool = graph.call_module(pool_path, (node,))
            node.replace_all_uses_with(pool, delete_user_cb=lambda user: user is not pool)


class TransposedConvHandler:
    """Strided transposed convolutions: listed, not converted."""

    name = "conv_transpose"
    kind = "conv"

    def match(self, node: fx.Node, gm: fx.GraphModule) -> bool:
        m = _module(gm, node)
        return isinstance(m, nn.ConvTranspose2d) and tuple(m.stride) != (1, 1)

    def inspect(self, node: fx.Node, gm: fx.GraphModule) -> Candidate:
        m = _module(gm, node)
        return Candidate(node.name, "", self.kind, _desc(m), self.name,
                         skip_reason="transposed convolution (learned upsampling) is not converted")

    def apply(self, gm, node, pool_path, placement) -> None:  # pragma: no cover - never converted
        raise NotImplementedError


# ----------------------------------------------------------------------------------------
# pooling modules


def _pool_skip_reason(node: fx.Node, stride: tuple[float, float] | None, returns_indices: bool, what: str) -> str:
    """Why a pool is not converted ("" when it is a site)."""
    if stride is None:
        return f"{what} is not a static number"
    if stride == (1.0, 1.0):
        return "stride 1: keeps the spatial size"
    if returns_indices:
        return "returns pooling indices (used by an unpooling op)"
    if not _is_4d(node):
        return "input is not an N x C x H x W tensor"
    return ""


class PoolModuleHandler:
    """Pooling modules (``MaxPool2d``, ``AvgPool2d``, timm's ``*Same`` variants, ``LPPool2d``,
    ``BlurPool2d``, ...); DynOPool replaces them, aggregating with ``aggregate`` by default."""

    name = "pool_module"
    kind = "pool"

    def __init__(self, aggregate: str = "max") -> None:
        self.aggregate = aggregate

    def match(self, node: fx.Node, gm: fx.GraphModule) -> bool:
        return _module(gm, node) is not None

    def inspect(self, node: fx.Node, gm: fx.GraphModule) -> Candidate:
        m = _module(gm, node)
        stride = _as_stride(m.stride if getattr(m, "stride", None) is not None else m.kernel_size)
        cand = Candidate(node.name, "", self.kind, _desc(m), self.name, stride, self.aggregate)
        cand.skip_reason = _pool_skip_reason(node, stride, getattr(m, "return_indices", False), "stride")
        return cand

    def apply(self, gm: fx.GraphModule, node: fx.Node, pool_path: str, placement: str) -> None:
        _retarget_to_pool(gm, node, pool_path)


class AdaptiveModuleHandler:
    """Adaptive pools: listed as skipped, they adapt to whatever size they receive."""

    name = "adaptive_module"
    kind = "pool"

    def match(self, node: fx.Node, gm: fx.GraphModule) -> bool:
        return _module(gm, node) is not None

    def inspect(self, node: fx.Node, gm: fx.GraphModule) -> Candidate:
        return Candidate(node.name, "", self.kind, type(_module(gm, node)).__name__, self.name,
                         skip_reason="adaptive pool: adapts to the learned sizes")

    def apply(self, gm, node, pool_path, placement) -> None:  # pragma: no cover - never converted
        raise NotImplementedError


# ----------------------------------------------------------------------------------------
# functional pooling

def _bind(node: fx.Node, params: tuple[str, ...]) -> dict[str, Any]:
    bound = dict(zip(params, node.args[1:]))
    bound.update({k: v for k, v in node.kwargs.items() if k != "input"})
    return bound


class PoolFunctionHandler:
    """A pooling function (``F.max_pool2d``, ``F.avg_pool2d``, timm's ``*_pool2d_same``, ...):
    ``label`` names it in the plan, ``aggregate`` is DynOPool's default."""

    name = "pool_function"
    kind = "pool"

    def __init__(self, label: str, aggregate: str) -> None:
        self.label, self.aggregate = label, aggregate

    def match(self, node: fx.Node, gm: fx.GraphModule) -> bool:
        return node.op == "call_function"

    def inspect(self, node: fx.Node, gm: fx.GraphModule) -> Candidate:
        from .op_registry import spec_for

        label, params, aggregate = self.label, spec_for(target=node.target).params, self.aggregate
        bound = _bind(node, params)
        stride_arg = bound.get("stride")
        stride = _as_stride(stride_arg if stride_arg not in (None, [], ()) else bound.get("kernel_size"))
        op = f"{label}(k={_fmt(bound.get('kernel_size'))}, s={_fmt(stride_arg)})"
        cand = Candidate(node.name, "", self.kind, op, self.name, stride, aggregate)
        indices = bool(bound.get("return_indices")) or node.target is F.max_pool2d_with_indices
        cand.skip_reason = _pool_skip_reason(node, stride, indices, "stride/kernel size")
        return cand

    def apply(self, gm: fx.GraphModule, node: fx.Node, pool_path: str, placement: str) -> None:
        _retarget_to_pool(gm, node, pool_path)


#: node meta key of a quarter of a space to depth by slices (``patch_reshape.py``: its unshuffle is the site)
QUARTER_OF_PATCHES = "dynopool_quarter_of_patches"


def slice_steps(index: Any) -> tuple[int, int] | None:
    """``(step_h, step_w)`` of an index that subsamples both last axes of an N x C x H x W tensor
    and keeps everything else (``x[:, :, ::2, ::2]``, ``x[..., ::2, ::3]``: the shortcut of the
    CIFAR ResNets' option A), else None. A step on one axis alone is no site: that is how rotary
    embeddings split channels (``x[..., ::2]`` of N x heads x tokens x channels)."""
    if not isinstance(index, tuple) or not all(isinstance(i, slice) or i is Ellipsis for i in index):
        return None
    if index.count(Ellipsis) > 1:
        return None
    if Ellipsis in index:
        at = index.index(Ellipsis)
        index = index[:at] + (slice(None),) * (4 - len(index) + 1) + index[at + 1:]
    if len(index) != 4:
        return None
    whole = [i.start in (None, 0) and i.stop is None for i in index]
    steps = [1 if i.step is None else i.step for i in index]
    if not all(whole) or not all(isinstance(v, int) and v >= 1 for v in steps) or steps[:2] != [1, 1]:
        return None
    return (steps[2], steps[3]) if min(steps[2:]) > 1 else None


class StridedSliceHandler:
    """Subsampling by slicing (``x[:, :, ::2, ::2]``): a window of one pixel at that step;
    DynOPool replaces it, averaging by default."""

    name = "strided_slice"
    kind = "pool"

    def match(self, node: fx.Node, gm: fx.GraphModule) -> bool:
        return (node.op == "call_function" and len(node.args) == 2 and isinstance(node.args[0], fx.Node)
                and _is_4d(node.args[0]) and slice_steps(node.args[1]) is not None and not node.meta.get(QUARTER_OF_PATCHES))

    def inspect(self, node: fx.Node, gm: fx.GraphModule) -> Candidate:
        step = slice_steps(node.args[1])
        return Candidate(node.name, "", self.kind, f"x[..., ::{step[0]}, ::{step[1]}]", self.name,
                         (float(step[0]), float(step[1])), "mean")

    def apply(self, gm: fx.GraphModule, node: fx.Node, pool_path: str, placement: str) -> None:
        _retarget_to_pool(gm, node, pool_path)


class AdaptiveFunctionHandler:
    """Functional adaptive pools: listed as skipped (``labels``: function -> its name)."""

    name = "adaptive_function"
    kind = "pool"

    def __init__(self, labels: dict[Callable, str]) -> None:
        self.labels = labels

    def match(self, node: fx.Node, gm: fx.GraphModule) -> bool:
        return node.op == "call_function" and node.target in self.labels

    def inspect(self, node: fx.Node, gm: fx.GraphModule) -> Candidate:
        return Candidate(node.name, "", self.kind, self.labels[node.target], self.name,
                         skip_reason="adaptive pool: adapts to the learned sizes")

    def apply(self, gm, node, pool_path, placement) -> None:  # pragma: no cover
        raise NotImplementedError


# ----------------------------------------------------------------------------------------
# interpolation


def _interp_candidate(node: fx.Node, handler: str, op: str, size: Any, scale: Any) -> Candidate:
    cand = Candidate(node.name, "", "interpolate", op, handler, aggregate="mean")
    if size is not None:
        cand.skip_reason = "size-targeted interpolation: adapts to the learned sizes"
        return cand
    factor = _as_stride(scale)
    if factor is None or min(factor) <= 0:
        cand.skip_reason = "scale factor is not a static positive number"
        return cand
    cand.stride = (1.0 / factor[0], 1.0 / factor[1])
    if cand.stride == (1.0, 1.0):
        cand.skip_reason = "scale factor 1: keeps the spatial size"
    elif not _is_4d(node):
        cand.skip_reason = "input is not an N x C x H x W tensor"
    return cand


class UpsampleModuleHandler:
    """``nn.Upsample`` (and its subclasses) with a scale factor."""

    name = "upsample_module"
    kind = "interpolate"

    def match(self, node: fx.Node, gm: fx.GraphModule) -> bool:
        return isinstance(_module(gm, node), nn.Upsample)

    def inspect(self, node: fx.Node, gm: fx.GraphModule) -> Candidate:
        m = _module(gm, node)
        op = f"{type(m).__name__}(scale_factor={m.scale_factor}, size={m.size}, mode={m.mode})"
        return _interp_candidate(node, self.name, op, m.size, m.scale_factor)

    def apply(self, gm: fx.GraphModule, node: fx.Node, pool_path: str, placement: str) -> None:
        _retarget_to_pool(gm, node, pool_path)


_INTERP_PARAMS = ("size", "scale_factor", "mode", "align_corners")


class InterpolateFunctionHandler:
    """``F.interpolate`` / ``F.upsample`` with a scale factor (``labels``: function -> its name)."""

    name = "interpolate_function"
    kind = "interpolate"

    def __init__(self, labels: dict[Callable, str]) -> None:
        self.labels = labels

    def match(self, node: fx.Node, gm: fx.GraphModule) -> bool:
        return node.op == "call_function" and node.target in self.labels

    def inspect(self, node: fx.Node, gm: fx.GraphModule) -> Candidate:
        bound = _bind(node, _INTERP_PARAMS)
        size, scale = bound.get("size"), bound.get("scale_factor")
        label = self.labels[node.target]
        op = f"{label}(scale_factor={scale}, mode={bound.get('mode', 'nearest')})"
        if isinstance(size, fx.Node):
            op = f"{label}(size=<dynamic>)"
        return _interp_candidate(node, self.name, op, size, scale)

    def apply(self, gm: fx.GraphModule, node: fx.Node, pool_path: str, placement: str) -> None:
        _retarget_to_pool(gm, node, pool_path)


# ----------------------------------------------------------------------------------------
# anything else that strides


class UnsupportedStridedModuleHandler:
    """A leaf module with ``stride > 1`` that no handler knows: listed, not converted."""

    name = "unsupported"
    kind = "conv"

    def match(self, node: fx.Node, gm: fx.GraphModule) -> bool:
        m = _module(gm, node)
        if m is None or not _is_4d(node):
            return False
        stride = _as_stride(getattr(m, "stride", None))
        return stride is not None and stride != (1.0, 1.0)

    def inspect(self, node: fx.Node, gm: fx.GraphModule) -> Candidate:
        m = _module(gm, node)
        kind = "pool" if "pool" in type(m).__name__.lower() else self.kind  # (MaxUnpool2d is listed as a pool)
        return Candidate(node.name, "", kind, _desc(m), self.name, skip_reason=f"strided {type(m).__name__} has no site handler")

    def apply(self, gm, node, pool_path, placement) -> None:  # pragma: no cover
        raise NotImplementedError


def __getattr__(name: str) -> Any:
    if name == "HANDLERS":  # the table lives in the op registry (it imports this module)
        from .op_registry import site_specs

        return [spec.site for spec in site_specs()]
    raise AttributeError(name)


def handler_for(name: str) -> SiteHandler:
    """A handler registered under ``name`` (handlers of one name rewrite alike)."""
    from .op_registry import site_specs

    for spec in site_specs():
        if spec.site.name == name:
            return spec.site
    raise KeyError(name)


def site_module_types() -> list[type]:
    """Module classes the tracer must keep as leaves so that their sites are single nodes."""
    from .op_registry import site_specs

    return list(dict.fromkeys(t for spec in site_specs() if spec.leaf for t in spec.modules))


def find_candidates(gm: fx.GraphModule, node_names: dict[str, str]) -> list[Candidate]:
    """Every node some handler recognises, in graph order, named by its qualified name
    (first match in the registry's order: the spec covers the node, its handler matches)."""
    from .op_registry import site_specs

    specs = list(site_specs())
    found = []
    for node in gm.graph.nodes:
        if node.op not in ("call_module", "call_function"):
            continue
        module = _module(gm, node)
        for spec in specs:
            if spec.covers(module, node.target if module is None else None) and spec.site.match(node, gm):
                cand = spec.site.inspect(node, gm)
                cand.name = node_names.get(node.name, node.name)
                found.append(cand)
                break
    return found
