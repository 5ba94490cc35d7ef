"""The converted model as an annotated fx graph: trace once, propagate shapes, query.

The report asks this one object for node shapes (at the present strides, or at any strides it
substitutes temporarily), for the DynOPool node of each site and for graph reachability.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..dynopool import DynOPool, dynopool_modules, dynopool_output_size
from ..errors import UserInputError
from ..op_registry import autowrap_functions, leaf_module_types

__all__ = ["ReportGraph", "as_graph_module", "strides_set_to", "frozen_pools"]


class _LeafTracer(fx.Tracer):
    """fx tracer that keeps the op registry's modules as leaves (DynOPool's forward reads the
    stride value; pools and convs are one node each) and its functions as single calls."""

    def __init__(self) -> None:
        super().__init__(autowrap_functions=tuple(autowrap_functions()))
        self._leaves = tuple(leaf_module_types())

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self._leaves) or super().is_leaf_module(m, qualname)


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


class FixedResize(nn.Module):
    """Stand-in for a DynOPool frozen at a stride: same output size, strides as Python floats,
    so that fvcore's jit trace and fake-tensor shape propagation can run through it."""

    def __init__(self, stride: tuple[float, float], multiple: tuple[int, int] = (1, 1)) -> None:
        super().__init__()
        self.stride_hw = (float(stride[0]), float(stride[1]))
        self.multiple = multiple

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = int(x.shape[-2]), int(x.shape[-1])
        size = (dynopool_output_size(h, self.stride_hw[0], self.multiple[0]),
                dynopool_output_size(w, self.stride_hw[1], self.multiple[1]))
        return F.adaptive_max_pool2d(x, size)


@contextmanager
def frozen_pools(model: nn.Module, strides: Mapping[str, tuple[float, float]] | None = None) -> Iterator[nn.Module]:
    """Temporarily replace every DynOPool of ``model`` by a ``FixedResize`` at its present stride,
    or at ``strides[name]`` (a stride given for one site moves every site sharing its parameter;
    clamped to the site's bounds, as DynOPool does)."""
    pools = dynopool_modules(model)
    named = dict(pools)
    wanted = {id(named[name].stride): s for name, s in (strides or {}).items()}
    swapped: list[tuple[nn.Module, str, DynOPool]] = []
    try:
        for name, pool in pools:
            lo, hi = 1.0 / pool.r_bounds[1], 1.0 / pool.r_bounds[0]
            s = wanted.get(id(pool.stride))
            value = pool.stride_value if s is None else tuple(min(max(float(v), lo), hi) for v in s)
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            effective = (value[0] / pool.base[0], value[1] / pool.base[1])  # DynResize: H * base / s
            setattr(parent, attr, FixedResize(effective, pool.multiple))
            swapped.append((parent, attr, pool))
        yield model
    finally:
        for parent, attr, pool in swapped:
            setattr(parent, attr, pool)


class _ShapeRecorder(fx.Interpreter):
    """Runs the graph and records every node's output shape (no change to the graph's meta)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.shapes: dict[str, tuple[int, ...] | None] = {}

    def run_node(self, n: fx.Node):
        result = super().run_node(n)
        self.shapes[n.name] = tuple(int(v) for v in result.shape) if isinstance(result, torch.Tensor) else None
        return result


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
        """Output shape of every node (by node name); ``strides`` substitutes DynOPool strides.

        Runs on fake tensors (shapes only, no arithmetic); a model that fake tensors cannot run
        is run for real, once, on zeros.
        """
        from torch._subclasses.fake_tensor import FakeTensorMode

        was_training = self.gm.training
        self.gm.eval()
        try:
            with torch.no_grad(), frozen_pools(self.gm, strides):
                try:
                    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
                        recorder = _ShapeRecorder(self.gm)
                        recorder.run(mode.from_tensor(torch.zeros(1, *self.input_size)))
                except Exception:  # data-dependent code in a leaf module: run it for real
                    recorder = _ShapeRecorder(self.gm)
                    recorder.run(torch.zeros(1, *self.input_size))
        except Exception as err:  # the model's own failure at this size is the user's to fix
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UserInputError(
                f"the model does not run at input size {list(self.input_size)}: {first} (give a size it accepts with --input-size)"
            ) from err
        finally:
            self.gm.train(was_training)
        return recorder.shapes

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
