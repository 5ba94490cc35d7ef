"""One numbering of the scale-factor groups everywhere: the plan's (and the report's) group ids.

Stride parameters are kept in ``scale_parameters`` order (module order), which is not the
group order (a downsample branch's group can come first); values listed in that order are
shown keyed by group id, sorted, and labelled.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

from torch import nn

from .dynopool import dynopool_modules, scale_parameters

__all__ = ["group_ids", "by_group", "format_by_group"]


def group_ids(model: nn.Module, params: Sequence[nn.Parameter] | None = None) -> list[int | None]:
    """The group id of each stride parameter of ``model`` (``params``, default ``scale_parameters(model)``);
    None for a DynOPool built without one."""
    owner: dict[int, int | None] = {}
    for _, module in dynopool_modules(model):
        owner.setdefault(id(module.stride), module.group)
    return [owner.get(id(p)) for p in (scale_parameters(model) if params is None else params)]


def by_group(values: Sequence[Any], ids: Sequence[int | None]) -> dict[str, Any]:
    """``values`` (one per stride parameter) keyed by group id as a string, in group order;
    a parameter without a group id is keyed by its position."""
    keyed = [(g if g is not None else i, v) for i, (g, v) in enumerate(zip(ids, values))]
    return {str(k): v for k, v in sorted(keyed, key=lambda kv: kv[0])}


def format_by_group(values: dict[str, Any], fmt: Callable[[Any], str] = str, sep: str = ", ") -> str:
    """``{"0": a, "4": b}`` -> ``"group 0: A, group 4: B"`` (``fmt`` formats each value)."""
    return sep.join(f"group {g}: {fmt(v)}" for g, v in values.items())
