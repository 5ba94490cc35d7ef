"""Mutations fx does not record, recorded: item assignment on traced tensors, and traced values
stored on submodules.

The Swin detection code builds its shifted-window mask with ``img_mask[:, h, w, :] = cnt`` on
``torch.zeros((1, Hp, Wp, 1))`` sized from the input (fx's Proxy has no ``__setitem__``: "'Proxy'
object does not support item assignment"), and hands each block its grid as ``blk.H, blk.W = H,
W`` before calling it. fx records neither: kept whole, such a block read the Proxy left on it at
trace time. Here both are calls in the order the code runs them (``operator.setitem``; the
attribute set on the submodule before each call that reads it), and every attribute set so is
given back its value from before the trace.
"""
from __future__ import annotations

import contextlib
import operator
from typing import Any, Iterator

from torch import fx, nn
from torch.fx.node import has_side_effect
from torch.utils import _pytree as pytree

__all__ = ["SettableProxy", "recorded_module_attributes", "set_module_attribute"]


class SettableProxy(fx.Proxy):
    """A Proxy whose item assignment is recorded as ``operator.setitem(self, key, value)``
    (fx keeps it through dead-code elimination: it is a side effect)."""

    def __setitem__(self, key: Any, value: Any) -> None:
        self.tracer.create_proxy("call_function", operator.setitem, (self, key, value), {})


@has_side_effect
def set_module_attribute(module: nn.Module, name: str, value: Any) -> None:
    """``setattr(module, name, value)``, as a graph node that dead-code elimination keeps."""
    setattr(module, name, value)


@contextlib.contextmanager
def recorded_module_attributes(tracer: fx.Tracer, root: nn.Module) -> Iterator[None]:
    """While tracing ``root``: a traced value stored on one of its submodules is stored (so
    tracing reads it on) and recorded as ``set_module_attribute``; given back after."""
    paths = {id(m): name for name, m in root.named_modules()}
    original = nn.Module.__setattr__
    saved: dict[tuple[int, str], tuple[nn.Module, str, Any]] = {}
    targets: dict[int, fx.Proxy] = {}  # one get_attr node per submodule

    def setattr_recorded(module: nn.Module, name: str, value: Any) -> None:
        traced = any(isinstance(v, fx.Proxy) and v.tracer is tracer for v in pytree.tree_leaves(value))
        if traced and paths.get(id(module)):  # the root's own forward reads its traced values as they are
            saved.setdefault((id(module), name), (module, name, module.__dict__.get(name, _MISSING)))
            if id(module) not in targets:
                # named apart from the call_module nodes (torchvision's tracer parses _N suffixes)
                name_ = paths[id(module)].replace(".", "_") + "_module"
                targets[id(module)] = tracer.create_proxy("get_attr", paths[id(module)], (), {}, name=name_)
            tracer.create_proxy("call_function", set_module_attribute, (targets[id(module)], name, value), {})
        original(module, name, value)

    nn.Module.__setattr__ = setattr_recorded  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.__setattr__ = original  # type: ignore[method-assign]
        for module, name, old in saved.values():
            if old is _MISSING:
                module.__dict__.pop(name, None)
            else:
                object.__setattr__(module, name, old)


_MISSING = object()
