"""The tied groups of a converted model, and one numbering of them everywhere.

Two sources, one for each side of the conversion (docs/ARCHITECTURE.md, "Groups"):

- at conversion time, ``grouping.TieGraph`` says which sites must share a size; ``convert``
  numbers its groups in graph order (the plan's ``Group.id``);
- after it, ``rewrite`` has given every converted plan group one stride parameter and every
  DynOPool of the group ``group=<plan id>``: the shared parameters are the truth, read here
  by ``stride_groups`` (validation, the cost model, the budget, the report, size control).

Stride parameters are kept in ``scale_parameters`` order (module order), which is not the
group order (a downsample branch's group can come first); values listed in that order are
shown keyed by group id, sorted, and labelled.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

from torch import nn

from .dynopool import DynOPool, dynopool_modules

__all__ = ["StrideGroup", "stride_groups", "group_ids", "by_group", "format_by_group"]


@dataclass
class StrideGroup:
    """The DynOPool modules that share one stride parameter (one tied group)."""

    id: int | None  # the plan's group id (DynOPool.group); None for a DynOPool built by hand
    param: nn.Parameter
    sites: list[tuple[str, DynOPool]]  # (module path, module), in module order

    @property
    def path(self) -> str:
        """The module path of the group's first site (where its sizes are read)."""
        return self.sites[0][0]

    @property
    def first(self) -> DynOPool:
        """The group's first site."""
        return self.sites[0][1]

    @property
    def bounds(self) -> tuple[float, float]:
        """The stride bounds ``(1 / r_max, 1 / r_min)`` its sites share."""
        r_min, r_max = self.first.r_bounds
        return 1.0 / r_max, 1.0 / r_min


def stride_groups(model: nn.Module) -> list[StrideGroup]:
    """The groups of ``model``, one per stride parameter, in ``scale_parameters(model)`` order."""
    groups: dict[int, StrideGroup] = {}
    for name, m in dynopool_modules(model):
        group = groups.get(id(m.stride))
        if group is None:
            groups[id(m.stride)] = StrideGroup(m.group, m.stride, [(name, m)])
        else:
            group.sites.append((name, m))
    return list(groups.values())


def group_ids(model: nn.Module, params: Sequence[nn.Parameter] | None = None) -> list[int | None]:
    """The group id of each stride parameter of ``model`` (``params``, default ``scale_parameters(model)``);
    None for a DynOPool built without one."""
    groups = stride_groups(model)
    owner = {id(g.param): g.id for g in groups}
    return [owner.get(id(p)) for p in ([g.param for g in groups] if params is None else params)]


def by_group(values: Sequence[Any], ids: Sequence[int | None]) -> dict[str, Any]:
    """``values`` (one per stride parameter) keyed by group id as a string, in group order;
    a parameter without a group id is keyed by its position."""
    keyed = [(g if g is not None else i, v) for i, (g, v) in enumerate(zip(ids, values))]
    return {str(k): v for k, v in sorted(keyed, key=lambda kv: kv[0])}


def format_by_group(values: dict[str, Any], fmt: Callable[[Any], str] = str, sep: str = ", ") -> str:
    """``{"0": a, "4": b}`` -> ``"group 0: A, group 4: B"`` (``fmt`` formats each value)."""
    return sep.join(f"group {g}: {fmt(v)}" for g, v in values.items())
