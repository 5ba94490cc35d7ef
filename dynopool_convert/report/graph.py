"""The converted model as an annotated fx graph: trace once, propagate shapes, query.

The report asks this one object for node shapes (at the present strides, or at any strides it
substitutes temporarily), for the DynOPool node of each site and for graph reachability.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Mapping

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from ..dynopool import DynOPool, dynopool_modules
from ..errors import UserInputError

__all__ = ["ReportGraph", "as_graph_module", "strides_set_to"]


class _LeafTracer(fx.Tracer):
    """fx tracer that keeps DynOPool layers as leaves (their forward reads the stride value)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, DynOPool) or super().is_leaf_module(m, qualname)


def as_graph_module(model: nn.Module) -> fx.GraphModule:
    """``model`` itself when it is a GraphModule, else its fx trace (DynOPool kept as a leaf)."""
    if isinstance(model, fx.GraphModule):
        return model
    if isinstance(model, DynOPool):  # the root is never a leaf: wrap it
        model = nn.Sequential(model)
    graph = _LeafTracer().trace(model)
    return fx.GraphModule(model, graph, type(model).__name__)


@contextmanager
def strides_set_to(model: nn.Module, strides: Mapping[str, tuple[float, float]]) -> Iterator[None]:
    """Temporarily set the stride of the named DynOPool modules (shared parameters included)."""
    modules = dict(dynopool_modules(model))
    saved = {id(m.stride): (m.stride, m.stride.detach().clone()) for m in modules.values()}
    try:
        with torch.no_grad():
            for name, s in strides.items():
                modules[name].stride.copy_(torch.as_tensor(s, dtype=modules[name].stride.dtype))
        yield
    finally:
        with torch.no_grad():
            for param, value in saved.values():
                param.copy_(value)


class ReportGraph:
    """A traced model with node shapes at the reference input size.

    >>> g = ReportGraph(model, (3, 64, 64)); g.shapes["conv1"]  # (N, C, H, W) of a node's output
    """

    def __init__(self, model: nn.Module, input_size: tuple[int, int, int]) -> None:
        self.gm = as_graph_module(model)
        self.input_size = tuple(int(v) for v in input_size)
        self.nodes: list[fx.Node] = list(self.gm.graph.nodes)
        self.modules = dict(self.gm.named_modules())
        #: DynOPool module qualname -> its call_module node
        self.pool_nodes: dict[str, fx.Node] = {
            n.target: n for n in self.nodes if n.op == "call_module" and isinstance(self.modules.get(n.target), DynOPool)
        }
        self.shapes = self.propagate()

    def propagate(self, strides: Mapping[str, tuple[float, float]] | None = None) -> dict[str, tuple[int, ...] | None]:
        """Output shape of every node (by node name); ``strides`` substitutes DynOPool strides."""
        x = torch.zeros(1, *self.input_size)
        was_training = self.gm.training
        self.gm.eval()
        try:
            with torch.no_grad(), strides_set_to(self.gm, strides or {}):
                ShapeProp(self.gm).propagate(x)
        except RuntimeError as err:  # ShapeProp wraps the model's own error
            cause = err.__cause__ or err
            first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
            raise UserInputError(
                f"the model does not run at input size {list(self.input_size)}: {first} (give a size it accepts with --input-size)"
            ) from err
        finally:
            self.gm.train(was_training)
        out: dict[str, tuple[int, ...] | None] = {}
        for n in self.nodes:
            meta = n.meta.get("tensor_meta")
            out[n.name] = tuple(int(v) for v in meta.shape) if hasattr(meta, "shape") else None
        return out

    @staticmethod
    def spatial(shape: tuple[int, ...] | None) -> tuple[int, int] | None:
        """``(H, W)`` of an N x C x H x W shape, else None."""
        if shape is None or len(shape) != 4:
            return None
        return shape[2], shape[3]

    def descendants(self, node: fx.Node) -> set[str]:
        """Names of the nodes reachable from ``node`` (itself included)."""
        seen: set[str] = set()
        stack = [node]
        while stack:
            n = stack.pop()
            if n.name in seen:
                continue
            seen.add(n.name)
            stack.extend(n.users)
        return seen

    def module_of(self, node: fx.Node) -> nn.Module | None:
        """The submodule a call_module node calls, else None."""
        return self.modules.get(node.target) if node.op == "call_module" else None
