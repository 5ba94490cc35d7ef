"""The converted model as the report queries it: the annotated graph (``annotated_graph.py``)
with node shapes by name (at the present strides, or at any strides it substitutes
temporarily), the DynOPool node of each site and graph reachability.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Mapping

import torch
from torch import fx, nn

from ..annotated_graph import AnnotatedGraph, TensorInfo, trace_graph
from ..dynopool import DynOPool, dynopool_modules
from ..errors import UserInputError

__all__ = ["ReportGraph", "strides_set_to"]


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


class ReportGraph(AnnotatedGraph):
    """The annotated graph of a model, with node shapes by node name, at the reference input size.

    >>> g = ReportGraph(model, (3, 64, 64)); g.shapes["conv1"]  # (N, C, H, W) of a node's output
    """

    def __init__(self, model: nn.Module, input_size: tuple[int, int, int]) -> None:
        traced = trace_graph(model)
        try:
            super().__init__(traced, input_size)
        except Exception as err:  # the model's own failure at this size is the user's to fix
            raise _does_not_run(tuple(int(v) for v in input_size), err) from err
        #: DynOPool module qualname -> its call_module node
        self.pool_nodes: dict[str, fx.Node] = {
            n.target: n for n in self.nodes if n.op == "call_module" and isinstance(self.modules.get(n.target), DynOPool)
        }
        self.shapes = _shapes(self.reference)

    def propagate(self, strides: Mapping[str, tuple[float, float]] | None = None) -> dict[str, tuple[int, ...] | None]:
        """Output shape of every node (by node name); ``strides`` substitutes DynOPool strides."""
        try:
            return _shapes(self.summaries(strides))
        except Exception as err:
            raise _does_not_run(self.input_size, err) from err

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


def _shapes(summary: Mapping[fx.Node, Any]) -> dict[str, tuple[int, ...] | None]:
    return {n.name: info.shape if isinstance(info, TensorInfo) else None for n, info in summary.items()}


def _does_not_run(input_size: tuple[int, ...], err: Exception) -> UserInputError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return UserInputError(
        f"the model does not run at input size {list(input_size)}: {first} (give a size it accepts with --input-size)"
    )
