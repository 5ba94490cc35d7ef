"""NumPy's scalar math on traced sizes, recorded as calls while tracing.

Research code derived from the Swin detection and segmentation repositories pads to whole
windows with ``Hp = int(np.ceil(H / ws)) * ws``; fx cannot trace NumPy (``np.ceil`` of a Proxy
raises "invalid __array_struct__"), so the module holding it could only be kept whole, and with
it the sizes its tokens take. While tracing, the model's own modules see ``np`` as a stand-in
whose scalar functions (below) record a call when given a traced value and are NumPy's otherwise;
the graph calls this module's functions, which are NumPy's on plain numbers.
"""
from __future__ import annotations

import contextlib
import sys
import types
from typing import Any, Callable, Iterator

import numpy as np
from torch import fx
from torch.utils import _pytree as pytree

__all__ = ["NUMPY_REFUSAL", "numpy_of_sizes"]

#: what fx raises when NumPy is given a Proxy (NumPy reads array attributes off it)
NUMPY_REFUSAL = "__array_struct__"


def ceil(x: Any) -> Any:
    return np.ceil(x)


def floor(x: Any) -> Any:
    return np.floor(x)


def sqrt(x: Any) -> Any:
    return np.sqrt(x)


def round(x: Any, decimals: int = 0) -> Any:  # noqa: A001 - NumPy's name
    return np.round(x, decimals)


def trunc(x: Any) -> Any:
    return np.trunc(x)


def log2(x: Any) -> Any:
    return np.log2(x)


def prod(x: Any) -> Any:
    return np.prod(tuple(x))


def maximum(x: Any, y: Any) -> Any:
    return np.maximum(x, y)


def minimum(x: Any, y: Any) -> Any:
    return np.minimum(x, y)


#: NumPy's names for them (``np.around`` is ``np.round``)
_RECORDED: dict[str, Callable] = {
    "ceil": ceil, "floor": floor, "sqrt": sqrt, "round": round, "around": round, "trunc": trunc,
    "log2": log2, "prod": prod, "maximum": maximum, "minimum": minimum,
}


def _recording(name: str) -> Callable:
    """NumPy's ``name``, recording a call of this module's function when given a traced value."""
    real, recorded = getattr(np, name), _RECORDED[name]

    def call(*args: Any, **kwargs: Any) -> Any:
        proxies = [a for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, fx.Proxy)]
        if not proxies:
            return real(*args, **kwargs)
        return proxies[0].tracer.create_proxy("call_function", recorded, args, kwargs)

    call.__name__ = name
    return call


class _NumpyWhileTracing(types.ModuleType):
    """``numpy`` with ``_RECORDED``'s functions recording calls on traced values."""

    def __init__(self) -> None:
        super().__init__("numpy")
        for name in _RECORDED:
            setattr(self, name, _recording(name))

    def __getattr__(self, name: str) -> Any:
        return getattr(np, name)


@contextlib.contextmanager
def numpy_of_sizes(module_names: set[str]) -> Iterator[None]:
    """In each of ``module_names``' globals, ``numpy`` (under any name) and its functions above
    imported by name are stand-ins that record calls on traced values, until the block ends."""
    stand_in = _NumpyWhileTracing()
    replaced: list[tuple[dict, str, Any]] = []
    by_function = {id(getattr(np, name)): name for name in _RECORDED}
    for module_name in sorted(module_names):
        module = sys.modules.get(module_name)
        if module is None:
            continue
        namespace = vars(module)
        for key, value in list(namespace.items()):
            if value is np:
                replaced.append((namespace, key, value))
                namespace[key] = stand_in
            elif callable(value) and id(value) in by_function:
                replaced.append((namespace, key, value))
                namespace[key] = getattr(stand_in, by_function[id(value)])
    try:
        yield
    finally:
        for namespace, key, value in replaced:
            namespace[key] = value
