"""The conversion plan: plain data that outlives the graph (DESIGN.md §2, §4).

A ``Plan`` lists every candidate site (converted, pinned, reverted or skipped, with the reason), the
tied groups and the policy. A *pinned* site keeps its original op, like a reverted one, behind an
adaptive average pool to its reference input size: the layers after it keep their fixed shapes
while the groups before it learn theirs. It is JSON-able through ``to_dict``/``from_dict`` and is what a checkpoint
replays on a freshly built model (``apply_plan``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from .errors import UserInputError

__all__ = ["PLAN_FORMAT_VERSION", "Site", "Group", "Plan", "Status", "Kind"]

#: Bumped whenever the meaning of a field changes; ``Plan.from_dict`` refuses newer versions.
#: 2 added the ``pinned`` status and ``Group.multiple``; 3 added ``Group.r_max``; 4 ``Group.square``.
PLAN_FORMAT_VERSION: int = 4

Status = Literal["converted", "pinned", "reverted", "skipped"]
Kind = Literal["conv", "pool", "interpolate"]


def _pair(value: Any) -> list | None:
    return None if value is None else list(value)


@dataclass
class Site:
    """One candidate resizing op, named by its fx node path (torchvision's naming convention).

    ``input_size``/``output_size`` are the op's spatial ``[h, w]`` at the reference input size
    (the original op's output); ``converted_size`` is DynOPool's output at its initial stride.
    """

    name: str
    op: str
    kind: str
    status: str
    reason: str = ""
    group: int | None = None
    placement: str | None = None
    aggregate: str | None = None
    stride_init: list[float] | None = None
    input_size: list[int] | None = None
    output_size: list[int] | None = None
    converted_size: list[int] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Site":
        known = {f.name for f in fields(cls)}
        site = cls(**{k: v for k, v in data.items() if k in known})
        for name in ("stride_init", "input_size", "output_size", "converted_size"):
            setattr(site, name, _pair(getattr(site, name)))
        return site


@dataclass
class Group:
    """Sites that share one stride parameter because their outputs must keep equal sizes."""

    id: int
    sites: list[str]
    stride_init: list[float]
    status: str = "converted"
    reason: str = ""
    multiple: list[int] | None = None  # output sizes rounded to multiples of this (None: 1)
    #: the largest scale factor r allowed (None: the default bounds); set where larger outputs
    #: than the reference break the layers after the group (a crop to a skip's size)
    r_max: float | None = None
    #: both axes share one stride (DynOPool ``square``): set where the layers after the group
    #: read one axis's size for both, so that moving one axis alone breaks them
    square: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Group":
        known = {f.name for f in fields(cls)}
        group = cls(**{k: v for k, v in data.items() if k in known})
        group.sites, group.stride_init = list(group.sites), list(group.stride_init)
        group.multiple = _pair(group.multiple)
        return group


@dataclass
class Plan:
    """Every candidate site, the tied groups and the policy of one conversion."""

    sites: list[Site]
    groups: list[Group]
    policy: dict[str, Any]
    input_size: list[int]
    notes: list[str] = field(default_factory=list)
    format_version: int = PLAN_FORMAT_VERSION

    def site(self, name: str) -> Site:
        """The site called ``name`` (KeyError if absent)."""
        for s in self.sites:
            if s.name == name:
                return s
        raise KeyError(name)

    def converted_sites(self) -> list[Site]:
        return [s for s in self.sites if s.status == "converted"]

    def converted_groups(self) -> list[Group]:
        return [g for g in self.groups if g.status == "converted"]

    def pinned_sites(self) -> list[Site]:
        return [s for s in self.sites if s.status == "pinned"]

    def summary(self) -> dict[str, int]:
        """Counts of sites per status and the number of learned groups."""
        counts = {"converted": 0, "pinned": 0, "reverted": 0, "skipped": 0}
        for s in self.sites:
            counts[s.status] = counts.get(s.status, 0) + 1
        counts["groups"] = len(self.converted_groups())
        return counts

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "input_size": list(self.input_size),
            "policy": dict(self.policy),
            "sites": [s.to_dict() for s in self.sites],
            "groups": [g.to_dict() for g in self.groups],
            "notes": list(self.notes),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Plan":
        version = int(data.get("format_version", 0))
        if version > PLAN_FORMAT_VERSION or version < 1:
            raise UserInputError(
                f"conversion plan format version {version} is not supported (this dynopool reads 1..{PLAN_FORMAT_VERSION})"
            )
        return cls(
            sites=[Site.from_dict(s) for s in data["sites"]],
            groups=[Group.from_dict(g) for g in data["groups"]],
            policy=dict(data.get("policy", {})),
            input_size=list(data["input_size"]),
            notes=list(data.get("notes", [])),
            format_version=version,
        )
