"""The annotated graph: a model traced once and shape-propagated, queried by every pass.

``AnnotatedGraph(model, input_size)`` traces ``model`` with ``tracing.trace_model`` (a
GraphModule, e.g. a converted model, is used as it is) and runs one shape pass at the reference
input. Like torch.fx's ``ShapeProp`` the pass stores each node's ``meta["tensor_meta"]`` (read
by sites, tie groups, token grids and position embeddings); it also keeps every node's value
summary in ``reference`` (``TensorInfo`` for tensors, plain values such as ``x.shape`` as
they are). ``summaries(strides)`` runs the same pass at other strides without touching the
meta: the cost model's perturbed pass, the report's moved strides.

Conversion gives a real ``example`` (its output is the reference output); otherwise a pass
runs on fake tensors (shapes without arithmetic) and a model that fake tensors cannot run is
run for real on zeros. Without an example, DynOPool nodes are shape-only (their size comes
from their stride, the present one or ``strides``) and size-preserving modules pass their
input on.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from .dynopool import DynOPool, dynopool_modules, dynopool_output_size
from .flops import _quiet
from .tracing import Traced, trace_model

__all__ = ["AnnotatedGraph", "TensorInfo", "summarise", "spatial", "trace_graph", "pool_strides"]

Stride = tuple[float, float]


@dataclass(frozen=True)
class TensorInfo:
    """A tensor as the shape pass saw it."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def summarise(value: Any) -> Any:
    """Tensors as ``TensorInfo`` (inside lists and tuples too); other values as they are."""
    if isinstance(value, Tensor):
        return TensorInfo(tuple(value.shape), value.dtype)
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a namedtuple takes its fields one by one
        return type(value)(*(summarise(v) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(summarise(v) for v in value)
    return value


def spatial(info: Any) -> tuple[int, int] | None:
    """``(H, W)`` of an N x C x H x W tensor's summary, else None."""
    if isinstance(info, TensorInfo) and len(info.shape) == 4:
        return info.shape[2], info.shape[3]
    return None


def trace_graph(model: nn.Module) -> Traced:
    """``model`` as a ``Traced``: itself when a GraphModule (node names as qualified names), else
    its ``trace_model`` (a DynOPool root is wrapped: the root is never a leaf)."""
    if isinstance(model, fx.GraphModule):
        return Traced(model, {n.name: n.name for n in model.graph.nodes})
    if isinstance(model, DynOPool):
        model = nn.Sequential(model)
    return trace_model(model)


def pool_strides(model: nn.Module, strides: Mapping[str, Stride] | None = None) -> dict[str, Stride]:
    """The stride each DynOPool of ``model`` runs at: its present one, or ``strides[name]`` for
    every site sharing ``name``'s parameter (clamped to the bounds, as DynOPool does)."""
    pools = dynopool_modules(model)
    named = dict(pools)
    wanted = {id(named[name].stride): s for name, s in (strides or {}).items()}
    out: dict[str, Stride] = {}
    for name, pool in pools:
        s = wanted.get(id(pool.stride))
        lo, hi = 1.0 / pool.r_bounds[1], 1.0 / pool.r_bounds[0]
        out[name] = pool.stride_value if s is None else tuple(min(max(v, lo), hi) for v in pool.effective_stride(s))
    return out


_SIZE_PRESERVING = (
    nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU,
    nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Dropout, nn.Identity,
)


class _ShapePass(fx.Interpreter):
    """Runs the graph once, recording each node's value summary (and, with ``annotate``, its
    ``tensor_meta`` as ``ShapeProp`` does); ``strides`` makes DynOPool nodes shape-only."""

    def __init__(self, gm: fx.GraphModule, strides: dict[str, Stride] | None, annotate: bool) -> None:
        super().__init__(gm)
        self.strides, self.annotate = strides, annotate
        self.summary: dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        self.summary[n] = summarise(out)
        if self.annotate:
            found = False

            def meta(obj: Any) -> Any:
                nonlocal found
                if isinstance(obj, Tensor):
                    found = True
                    return _extract_tensor_metadata(obj)
                return obj

            value = map_aggregate(out, meta)
            if found:
                n.meta["tensor_meta"] = value
            n.meta["type"] = type(out)
        return out

    def call_module(self, target: str, args: tuple, kwargs: dict) -> Any:
        if self.strides is None:
            return super().call_module(target, args, kwargs)
        m = self.fetch_attr(target)
        if isinstance(m, DynOPool):  # only the size matters; it follows the stride
            x = args[0]
            s_h, s_w = self.strides[target]
            h = dynopool_output_size(int(x.shape[-2]), s_h / m.base[0], m.multiple[0])
            w = dynopool_output_size(int(x.shape[-1]), s_w / m.base[1], m.multiple[1])
            return x.new_empty((*x.shape[:-2], h, w)) if isinstance(x, FakeTensor) else F.adaptive_max_pool2d(x, (h, w))
        if isinstance(m, _SIZE_PRESERVING) and len(args) == 1 and not kwargs:
            return args[0]  # same shape; skips fake batch norm, which is slow
        return super().call_module(target, args, kwargs)


class AnnotatedGraph:
    """A traced model with every node's shape at the reference input.

    >>> g = AnnotatedGraph(model, (3, 64, 64))      # doctest: +SKIP
    >>> g.reference[node].shape                      # (N, C, H, W) of a node's output
    """

    def __init__(self, model: nn.Module | Traced, input_size: tuple[int, ...], example: Tensor | None = None) -> None:
        traced = model if isinstance(model, Traced) else trace_graph(model)
        self.gm: fx.GraphModule = traced.graph_module
        self.node_names, self.notes = traced.node_names, traced.notes
        self.input_size = tuple(int(v) for v in input_size)
        self.nodes: list[fx.Node] = list(self.gm.graph.nodes)
        self.modules: dict[str, nn.Module] = dict(self.gm.named_modules())
        #: each node's value summary at the reference input and the present strides
        self.reference, self.output = self._run(None, example, annotate=True)

    def summaries(self, strides: Mapping[str, Stride] | None = None) -> dict[fx.Node, Any]:
        """Every node's value summary with the named DynOPool modules at ``strides`` (others, and
        by default all, at their present strides); the graph's meta is left as it is."""
        return self._run(strides, None, annotate=False)[0]

    def _run(self, strides: Mapping[str, Stride] | None, example: Tensor | None, annotate: bool) -> tuple[dict, Any]:
        gm = self.gm
        was_training = gm.training
        gm.eval()
        try:
            with _quiet(), torch.no_grad():
                if example is not None:
                    rec = _ShapePass(gm, None, annotate)
                    return rec.summary, rec.run(example)
                shape_only = pool_strides(gm, strides)
                param = next(gm.parameters(), None)
                device = param.device if param is not None else torch.device("cpu")
                dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
                zeros = torch.zeros(1, *self.input_size, device=device, dtype=dtype)
                try:
                    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
                        rec = _ShapePass(gm, shape_only, annotate)
                        out = rec.run(mode.from_tensor(zeros))
                except Exception:  # data-dependent code in a leaf module: run it for real
                    rec = _ShapePass(gm, shape_only, annotate)
                    out = rec.run(zeros)
                return rec.summary, summarise(out)
        finally:
            gm.train(was_training)
