"""Tiny shared helpers."""
from __future__ import annotations

from typing import Any

from timm.layers import to_2tuple

__all__ = ["to_2tuple", "pair_of_floats", "int_pair", "node_hw"]


def pair_of_floats(value: float | tuple[float, float] | list[float]) -> tuple[float, float]:
    """Return ``value`` as an ``(h, w)`` pair of floats."""
    h, w = to_2tuple(value)
    return float(h), float(w)


def int_pair(value: Any) -> tuple[int, int]:
    """``3`` -> ``(3, 3)``; ``(3, 5)`` -> ``(3, 5)``; a 1-element sequence is used for both axes."""
    if isinstance(value, (tuple, list)):
        return int(value[0]), int(value[-1])
    return int(value), int(value)


def node_hw(node: Any) -> tuple[int, int] | None:
    """The spatial ``(h, w)`` of an fx node's N x C x H x W output (the annotated graph's
    ``tensor_meta``), None for anything else."""
    meta = None if node is None else node.meta.get("tensor_meta")
    if meta is None or not hasattr(meta, "shape") or len(meta.shape) != 4:
        return None
    return int(meta.shape[2]), int(meta.shape[3])
