"""Tiny shared helpers."""
from __future__ import annotations

from timm.layers import to_2tuple

__all__ = ["to_2tuple", "pair_of_floats"]


def pair_of_floats(value: float | tuple[float, float] | list[float]) -> tuple[float, float]:
    """Return ``value`` as an ``(h, w)`` pair of floats."""
    h, w = to_2tuple(value)
    return float(h), float(w)
