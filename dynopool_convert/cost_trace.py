"""Tracing and shape passes for the cost model (``cost_model.py``): the leaf-aware fx trace,
one shape pass per stride setting (fake tensors), and how its observations are compared.
Package-internal."""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch._subclasses.fake_tensor import FakeTensorMode

from .dynopool import DynOPool, dynopool_output_size
from .flops import _quiet
from .op_registry import autowrap_functions, leaf_module_types

__all__ = ["trace_for_cost"]


# --------------------------------------------------------------------------------------------
# tracing and shape passes


class _LeafTracer(fx.Tracer):
    """fx tracer that keeps the op registry's modules (DynOPool, convolutions, pools) and timm's
    not-traceable modules as leaves, and the registry's functions as single calls."""

    def __init__(self) -> None:
        try:
            from timm.layers import get_notrace_functions, get_notrace_modules

            self._notrace = tuple(get_notrace_modules())
            autowrap = tuple(get_notrace_functions())
        except ImportError:  # pragma: no cover - timm is a dependency
            self._notrace, autowrap = (), ()
        self._leaves = tuple(leaf_module_types())  # the op registry's: DynOPool, convs, pools
        super().__init__(autowrap_functions=(*autowrap, *autowrap_functions()))

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        # conv subclasses (timm's StdConv2d, Conv2dSame) stay whole, as the conversion keeps them
        if isinstance(m, self._leaves) or (self._notrace and isinstance(m, self._notrace)):
            return True
        return super().is_leaf_module(m, qualname)


def trace_for_cost(model: nn.Module) -> fx.GraphModule:
    """``model`` itself if it is a GraphModule, else an fx trace sharing its submodules."""
    if isinstance(model, fx.GraphModule):
        return model
    tracer = _LeafTracer()
    graph = tracer.trace(model)
    return fx.GraphModule(tracer.root, graph, model.__class__.__name__)


_SHAPE_PRESERVING = (
    nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU,
    nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Dropout, nn.Identity,
)


class _Recorder(fx.Interpreter):
    """Runs the graph once and records every node's value summary (shapes, plain values)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.summary: dict[fx.Node, Any] = {}
        # read outside any fake-tensor mode: DynOPool sizes need the real stride values
        self.strides = {name: m.stride_value for name, m in gm.named_modules() if isinstance(m, DynOPool)}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        self.summary[n] = _summarise(out)
        return out

    def call_module(self, target: str, args: tuple, kwargs: dict) -> Any:
        m = self.fetch_attr(target)
        if isinstance(m, DynOPool):  # only the shape matters; the stride is a real tensor
            x = args[0]
            s_h, s_w = self.strides[target]
            h = dynopool_output_size(int(x.shape[-2]), s_h / m.base[0], m.multiple[0])
            w = dynopool_output_size(int(x.shape[-1]), s_w / m.base[1], m.multiple[1])
            return x.new_empty((*x.shape[:-2], h, w))
        if isinstance(m, _SHAPE_PRESERVING) and len(args) == 1 and not kwargs:
            return args[0]  # same shape; skips fake batch norm, which is slow
        return super().call_module(target, args, kwargs)


def _summarise(value: Any) -> Any:
    if isinstance(value, Tensor):
        return _TensorInfo(tuple(value.shape), value.dtype)
    if isinstance(value, (list, tuple)):
        return type(value)(_summarise(v) for v in value)
    return value


@dataclass(frozen=True)
class _TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _shape_pass(gm: fx.GraphModule, input_size: Sequence[int]) -> dict[fx.Node, Any]:
    param = next(gm.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    rec = _Recorder(gm)
    was_training = gm.training
    gm.eval()
    try:
        # fake tensors: shapes without the arithmetic (the parameters stay real)
        with _quiet(), torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True) as mode:
            rec.run(mode.from_tensor(torch.zeros(1, *input_size, device=device, dtype=dtype)))
    finally:
        gm.train(was_training)
    return rec.summary

def _spatial(info: Any) -> tuple[int, int] | None:
    if isinstance(info, _TensorInfo) and len(info.shape) == 4:
        return info.shape[2], info.shape[3]
    return None


# --------------------------------------------------------------------------------------------
# helpers


def _shape_of(info: Any, others: bool = False) -> Any:
    """Tensors as their shapes; other values as None (not compared: an int that changes carries
    no size, the tensors built from it are checked on their own), or as they are with
    ``others`` (for messages)."""
    if isinstance(info, _TensorInfo):
        return info.shape
    if isinstance(info, (list, tuple)):
        return tuple(_shape_of(v, others) for v in info)
    return info if others else None


def _is_shape_like(info: Any) -> bool:
    if isinstance(info, bool):
        return False
    if isinstance(info, int):
        return True
    return isinstance(info, (list, tuple)) and len(info) > 0 and all(_is_shape_like(v) for v in info)


def _has_tensor(info: Any) -> bool:
    if isinstance(info, _TensorInfo):
        return True
    return isinstance(info, (list, tuple)) and any(_has_tensor(v) for v in info)


def _flat(info: Any) -> list:
    if isinstance(info, (list, tuple)) and not isinstance(info, _TensorInfo):
        return [v for item in info for v in _flat(item)]
    return [info]


def _shows(info: Any, size: tuple[int, int]) -> bool:
    """Whether every tensor of ``info`` has ``size`` as its NCHW or NHWC spatial dims."""
    return all(
        len(t.shape) == 4 and size in (t.shape[2:4], t.shape[1:3]) for t in _flat(info) if isinstance(t, _TensorInfo)
    )


def _inherits(info_r: Any, info_p: Any, size_r: tuple[int, int], size_p: tuple[int, int]) -> bool:
    """Whether an output observed at two strides follows a class of sizes ``size_r``/``size_p``.

    Each tensor must show the size (NCHW or NHWC) at both, or have a number of elements in
    proportion to the area (flattened tokens); each int (a shape) must not change or change
    exactly as the class's height, width or area does (``ceil(h / p) * p`` does not: refused).
    """
    flat_r, flat_p = _flat(info_r), _flat(info_p)
    if len(flat_r) != len(flat_p):
        return False
    a_r, a_p = size_r[0] * size_r[1], size_p[0] * size_p[1]
    for r, p in zip(flat_r, flat_p):
        if isinstance(r, _TensorInfo) and isinstance(p, _TensorInfo):
            shows = len(r.shape) == 4 and (
                (r.shape[2:4] == size_r and p.shape[2:4] == size_p) or (r.shape[1:3] == size_r and p.shape[1:3] == size_p)
            )
            if not shows and p.numel * a_r != r.numel * a_p:
                return False
        elif isinstance(r, int) and not isinstance(r, bool) and isinstance(p, int):
            if r != p and (r, p) not in ((size_r[0], size_p[0]), (size_r[1], size_p[1]), (a_r, a_p)):
                return False
        elif type(r) is not type(p):
            return False
    return True


def _substitute(value: Any, summary: dict[fx.Node, Any]) -> Any:
    """Replace node references by their recorded summaries (plain values stay)."""
    return fx.node.map_arg(value, lambda a: summary.get(a))
