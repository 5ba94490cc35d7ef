"""Branches on traced sizes, taken as they go at the reference input size.

Research code branches on sizes where fx cannot follow: PVT's ``if H * W == num_patches:
return pos_embed`` (else interpolated), the Swin paper code's ``if W % patch != 0: pad``,
``pad_input = H % 2 == 1`` in its patch merging. fx refuses any ``if`` on a traced value
("symbolically traced variables cannot be used as inputs to control flow"); where the failing
code is the model's own forward, or a module that holds a resizing op (which cannot be kept
whole), the model could not be converted at all. ``BranchingTracer`` answers such a condition
when it depends on sizes only (shapes, ``ndim``, ``dtype`` and arithmetic on them; never on
tensor values): it runs the graph traced so far on an example input of the reference size and
takes the branch that input takes. The converted model then takes that branch at every size:
exact at the reference; where another size needs the other branch to run at all, the
conversion's validation sees the forward break (the group is rounded, pinned or reverted, as
for any model), and where the other branch would only compute something else, nothing does:
each branch taken is a note for the user to read. The example's size is the plan's, so replays take the
same branches.
"""
from __future__ import annotations

import contextlib
import inspect
import operator
import os
import traceback
from typing import Any, Callable, Iterator

import torch
import torchvision
from torch import fx, nn
from torch.fx import _symbolic_trace
from torchvision.models.feature_extraction import NodePathTracer

from .proxy_mutations import SettableProxy, recorded_module_attributes

__all__ = ["BranchingTracer", "CONTROL_FLOW_REFUSAL"]

#: fx's refusal of an ``if`` on a traced value
CONTROL_FLOW_REFUSAL = "symbolically traced variables cannot be used as inputs to control flow"

_SIZE_ATTRIBUTES = ("shape", "ndim", "dtype")
_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_SIZE_METHODS = ("size", "dim", "numel")
_SIZE_FUNCTIONS = {int, float, len, bool, abs, min, max, divmod, round}


#: ops whose output's size depends on the data (a shape read after them is no size of the input's)
_DATA_SHAPED = {torch.nonzero, torch.masked_select, torch.unique, torch.unique_consecutive, torch.argwhere,
                torchvision.ops.nms, torchvision.ops.batched_nms, "nonzero", "masked_select", "unique", "argwhere"}


def _data_shaped(tensor: fx.Node) -> bool:
    """Whether ``tensor``'s shape may depend on values: an op of ``_DATA_SHAPED``, a one-argument
    ``where`` or an index by a tensor (a mask) among its sources."""
    stack, seen = [tensor], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if any(n.target is t or n.target == t for t in _DATA_SHAPED) or (n.target is torch.where and len(n.args) + len(n.kwargs) == 1):
            return True
        if n.op == "call_function" and n.target is operator.getitem and len(n.args) > 1:
            parts = n.args[1] if isinstance(n.args[1], tuple) else (n.args[1],)  # (a slice's bounds are ints)
            if any(isinstance(a, fx.Node) and not _size_only(a, {}) for a in parts):
                return True
        stack += n.all_input_nodes
    return False


def _size_only(node: fx.Node, seen: dict[fx.Node, bool]) -> bool:
    """Whether ``node``'s value follows from tensor sizes (and constants) alone."""
    if node in seen:
        return seen[node]
    seen[node] = False  # (cycles cannot happen; a guard all the same)
    if node.op == "call_function" and node.target is getattr and node.args[1] in _SIZE_ATTRIBUTES:
        ok = not _data_shaped(node.args[0])
    elif node.op == "call_method" and node.target in _SIZE_METHODS:
        ok = not _data_shaped(node.args[0]) and all(_size_only(a, seen) for a in node.all_input_nodes[1:])
    elif node.op == "call_function" and (getattr(node.target, "__module__", None) in ("_operator", "operator", "math")
                                          or node.target in _SIZE_FUNCTIONS):
        ok = all(_size_only(a, seen) for a in node.all_input_nodes)
    else:
        ok = False
    seen[node] = ok
    return ok


def _user_frame() -> str:
    """``file:line: code`` of the model code that branched (the innermost frame outside torch)."""
    for frame in reversed(traceback.extract_stack()):
        if not frame.filename.startswith(_TORCH_DIR) and frame.filename != __file__ and "feature_extraction" not in frame.filename:
            return f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno} ({(frame.line or '').strip()[:80]})"
    return "?"


#: ``nn.Module``'s own call and attribute lookup: fx patches both while it traces (modules
#: called record nodes, parameters read are proxies); fx keeps the originals
_MODULE_CALL = getattr(_symbolic_trace, "_orig_module_call", nn.Module.__call__)
_MODULE_GETATTR = getattr(_symbolic_trace, "_orig_module_getattr", nn.Module.__getattr__)


@contextlib.contextmanager
def _untraced() -> Iterator[None]:
    """Modules run as they would outside a trace (in the middle of one)."""
    patched = nn.Module.__call__, nn.Module.__getattr__
    nn.Module.__call__, nn.Module.__getattr__ = _MODULE_CALL, _MODULE_GETATTR  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.__call__, nn.Module.__getattr__ = patched  # type: ignore[method-assign]


def _innermost_module() -> nn.Module | None:
    """The module whose code is running (the innermost ``self`` that is a module on the stack)."""
    frame = inspect.currentframe()
    while frame is not None:
        module = frame.f_locals.get("self")
        if isinstance(module, nn.Module) and not isinstance(module, fx.GraphModule):
            return module
        frame = frame.f_back
    return None


class BranchingTracer(NodePathTracer):
    """``NodePathTracer`` that takes ``if``s on traced sizes as ``example`` takes them (none
    without one), in the modules ``may_fix`` accepts (the root, modules holding a site);
    elsewhere fx's refusal stands (such a module is then kept whole, as before). The modules
    whose ids are in ``leaf_ids`` are leaves too (one instance, not its class)."""

    def __init__(self, *args: Any, example: torch.Tensor | None, may_fix: Callable[[nn.Module], bool],
                 leaf_ids: set[int] = frozenset(), **kwargs: Any) -> None:  # type: ignore[assignment]
        super().__init__(*args, **kwargs)
        self.example, self.may_fix, self.leaf_ids = example, may_fix, leaf_ids
        self.branches: list[str] = []  # one note per branch taken
        self._concrete: dict[str, Any] = {}

    def trace(self, root: Any, concrete_args: dict[str, Any] | None = None) -> fx.Graph:
        self._concrete = dict(concrete_args or {})
        with recorded_module_attributes(self, root):
            return super().trace(root, concrete_args)

    def is_leaf_module(self, m: nn.Module, module_qualname: str) -> bool:
        return id(m) in self.leaf_ids or super().is_leaf_module(m, module_qualname)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return SettableProxy(node, self)  # item assignment recorded (proxy_mutations.py)

    def to_bool(self, obj: fx.Proxy) -> bool:
        module = _innermost_module() if self.example is not None else None
        if module is None or not self.may_fix(module) or not _size_only(obj.node, {}):
            return super().to_bool(obj)  # fx's refusal: a condition on values, or a module kept whole
        try:
            # a batch of one and a batch of two, other values: a condition that tells them apart
            # reads the batch or the data, not the image's size
            other = torch.cat([self.example, torch.randn_like(self.example)])
            values = [bool(self._value(obj.node, x)) for x in (self.example, other)]
        except Exception:  # (the run fails: fx's refusal, as without this tracer)
            values = []
        if len(set(values)) != 1:
            return super().to_bool(obj)
        self.branches.append(f"{_user_frame()}: a condition on sizes, {values[0]} at the reference size, "
                             f"is taken as {values[0]} at every size")
        return values[0]

    def _value(self, node: fx.Node, example: torch.Tensor) -> Any:
        """``node``'s value when the graph traced so far runs on ``example`` (the forward's
        other arguments at the values they were traced with, flattened as fx's placeholders)."""
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        graph.graph_copy(self.graph, env)
        graph.output(env[node])
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        others = torch.utils._pytree.tree_leaves(list(self._concrete.values()))
        inputs = [example, *others] if len(others) == len(placeholders) - 1 else \
            [example] + [n.args[0] if n.args else None for n in placeholders[1:]]
        with _untraced(), torch.no_grad():
            return fx.GraphModule(self.root, graph)(*inputs)
