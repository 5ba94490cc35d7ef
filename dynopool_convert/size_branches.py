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
exact at the reference, and where another size would need the other branch, the conversion's
validation sees the forward break (the group is rounded, pinned or reverted, as for any
model). Each branch taken is a note. The example's size is the plan's, so replays take the
same branches.
"""
from __future__ import annotations

import contextlib
import os
import traceback
from typing import Any, Iterator

import torch
from torch import fx, nn
from torchvision.models.feature_extraction import NodePathTracer

__all__ = ["BranchingTracer", "CONTROL_FLOW_REFUSAL"]

#: fx's refusal of an ``if`` on a traced value
CONTROL_FLOW_REFUSAL = "symbolically traced variables cannot be used as inputs to control flow"

_SIZE_ATTRIBUTES = ("shape", "ndim", "dtype")
_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_SIZE_METHODS = ("size", "dim", "numel")
_SIZE_FUNCTIONS = {int, float, len, bool, abs, min, max, divmod, round}


def _size_only(node: fx.Node, seen: dict[fx.Node, bool]) -> bool:
    """Whether ``node``'s value follows from tensor sizes (and constants) alone."""
    if node in seen:
        return seen[node]
    seen[node] = False  # (cycles cannot happen; a guard all the same)
    if node.op == "call_function" and node.target is getattr and node.args[1] in _SIZE_ATTRIBUTES:
        ok = True
    elif node.op == "call_method" and node.target in _SIZE_METHODS:
        ok = all(_size_only(a, seen) for a in node.all_input_nodes[1:])
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
#: called record nodes, parameters read are proxies); saved at import, before any trace
_MODULE_CALL, _MODULE_GETATTR = nn.Module.__call__, nn.Module.__getattr__


@contextlib.contextmanager
def _untraced() -> Iterator[None]:
    """Modules run as they would outside a trace (in the middle of one)."""
    patched = nn.Module.__call__, nn.Module.__getattr__
    nn.Module.__call__, nn.Module.__getattr__ = _MODULE_CALL, _MODULE_GETATTR  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.__call__, nn.Module.__getattr__ = patched  # type: ignore[method-assign]


class BranchingTracer(NodePathTracer):
    """``NodePathTracer`` that takes ``if``s on traced sizes as ``example`` takes them."""

    def __init__(self, *args: Any, example: torch.Tensor, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.example = example
        self.branches: list[str] = []  # one note per branch taken

    def to_bool(self, obj: fx.Proxy) -> bool:
        if not _size_only(obj.node, {}):
            return super().to_bool(obj)  # a condition on tensor values: fx's refusal
        value = bool(self._value(obj.node))
        self.branches.append(f"{_user_frame()}: a condition on sizes, {value} at the reference size, "
                             f"is taken as {value} at every size")
        return value

    def _value(self, node: fx.Node) -> Any:
        """``node``'s value when the graph traced so far runs on the example input."""
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        graph.graph_copy(self.graph, env)
        graph.output(env[node])
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        inputs = [self.example] + [n.args[0] if n.args else None for n in placeholders[1:]]
        with _untraced(), torch.no_grad():
            return fx.GraphModule(self.root, graph)(*inputs)

