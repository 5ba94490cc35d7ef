"""The stride moves validation tries (DESIGN.md §2, "Validation"; docs/RELIABILITY.md).

Training moves every group's stride, on each axis, by up to a few optimiser steps at a time,
and all groups at once. Validation therefore tries, at the reference input size:

* each group on its own, each axis on its own, to both ends of ``MOVE_RANGE``: the stride times
  0.7 (a larger output) and times 1.4 (a smaller one), or by one output step (one pixel, or
  one ``multiple``) where that moves the output further; clamped to the group's stride bounds
  (``axis_moves``);
* ``JOINT_MOVES`` (``JOINT_MOVES_CAPPED`` where a group is capped) random moves of all groups
  together, every group and axis multiplied by its
  own factor drawn uniformly from ``MOVE_RANGE`` with a fixed seed, so that a conversion is
  reproducible (``joint_moves``).

>>> [label for label, _ in axis_moves((32, 32), (2.0, 2.0), (1 / 16, 2.0))]
['smaller output height', 'larger output height', 'smaller output width', 'larger output width']
"""
from __future__ import annotations

import random

from .dynopool import dynopool_output_size

__all__ = ["MOVE_RANGE", "JOINT_MOVES", "JOINT_MOVES_CAPPED", "CAP_AUDIT_MOVES", "CAP_SHRINK", "JOINT_SEED", "axis_moves", "joint_moves", "clamp_stride"]

#: stride factors: per-axis moves go to both ends (-30%, +40%: the same distance in log scale),
#: joint moves draw each group's and axis's factor from it
MOVE_RANGE: tuple[float, float] = (0.7, 1.4)
JOINT_MOVES: int = 3
#: joint moves where a group is capped at its reference scale factor: its cap was probed with the
#: groups after it settled, not with those before it (timm's SAM2-Hiera: a capped shortcut pool
#: broke only when the patch embedding moved too)
JOINT_MOVES_CAPPED: int = 12
#: random joint moves a cap is audited with (forward only), its group's against the same without it
CAP_AUDIT_MOVES: int = 32
#: a capped group's stride is also tried this many times its reference on both axes
CAP_SHRINK: float = 2.0
JOINT_SEED: int = 0

Stride = tuple[float, float]


def clamp_stride(s: float, bounds: tuple[float, float]) -> float:
    """``s`` inside the strides allowed by the scale-factor ``bounds`` ``(r_min, r_max)``."""
    return min(max(s, 1.0 / bounds[1]), 1.0 / bounds[0])


def _axis_target(size: int, s: float, bigger: bool, bounds: tuple[float, float], m: int, b: float = 1.0) -> float | None:
    """The stride that moves the output of an axis of ``size`` pixels to the end of
    ``MOVE_RANGE`` or by one step of ``m``, whichever is further; None when the bounds leave no move.
    ``b``: the site's base (``DynResize``: output ``round(size * b / s)``; DynOPool: 1)."""
    out = dynopool_output_size(size, s / b, m)
    relative = s * (MOVE_RANGE[0] if bigger else MOVE_RANGE[1])
    step = out + m if bigger else out - m
    one_step = size / step * b if step >= 1 else None
    moved_rel = dynopool_output_size(size, clamp_stride(relative, bounds) / b, m)
    if one_step is None or abs(moved_rel - out) >= m:
        target = relative
    else:
        target = one_step
    target = clamp_stride(target, bounds)
    return target if dynopool_output_size(size, target / b, m) != out else None


def axis_moves(size_in: tuple[int, int], stride: Stride, bounds: tuple[float, float],
               multiple: tuple[int, int] = (1, 1), base: Stride = (1.0, 1.0), square: bool = False) -> list[tuple[str, Stride]]:
    """One group's per-axis moves: ``(label, stride)`` for smaller and larger outputs, height
    then width, the other axis at its present stride (``base``: the sites' base, ``DynResize``);
    a ``square`` group's axes share one stride: its moves are the height's, on both axes."""
    moves = []
    if square:
        for bigger, word in ((False, "smaller"), (True, "larger")):
            target = _axis_target(size_in[0], stride[0], bigger, bounds, multiple[0], base[0])
            if target is not None:
                moves.append((f"{word} output (both axes)", (target, target)))
        return moves
    for axis, name in ((0, "height"), (1, "width")):
        for bigger, word in ((False, "smaller"), (True, "larger")):
            target = _axis_target(size_in[axis], stride[axis], bigger, bounds, multiple[axis], base[axis])
            if target is not None:
                moved = (target, stride[1]) if axis == 0 else (stride[0], target)
                moves.append((f"{word} output {name}", moved))
    return moves


def joint_moves(strides: dict[int, Stride], bounds: dict[int, tuple[float, float]], n: int = JOINT_MOVES,
                seed: int = JOINT_SEED, factors: tuple[float, float] = MOVE_RANGE) -> list[dict[int, Stride]]:
    """``n`` random moves of all groups at once: group -> stride, each axis times its own factor."""
    rng = random.Random(seed)
    moves = []
    for _ in range(n):
        moves.append({
            gid: tuple(clamp_stride(s * rng.uniform(*factors), bounds[gid]) for s in strides[gid])
            for gid in sorted(strides)
        })
    return moves
