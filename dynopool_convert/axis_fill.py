"""The budget fit's optional last step (``fit_to_budget(axis_fill=True)``, ``dynopool convert
--axis-fill``; off by default, docs/RESULTS.md §6.7): one axis of one group at a time raised by
one pixel while the budget allows.

The allocations of ``allocation.py`` multiply each group's ``r`` on both axes alike. Where one
pixel is a large share of a map (a ViT's 7x7 patch grid at 224 px, or any map at 32-64 px),
the next level down on both axes can fall far below the budget: ViT-B/32 under half its FLOPs
went from 7x7 to 4x4 patches (0.68 of the budget), where 5x4 fits. DynOPool's scale factors
are per axis; this fill spends what the square step left on the maps' other axis (a group whose
axes share one stride, ``square``, moves on both).
"""
from __future__ import annotations

import time
from collections.abc import Sequence

from .allocation import bisect_edge, f32, log_resolution, resolution_of, scaled, sizes_admissible
from .cost_model import CostModel

__all__ = ["fill_axes"]


def _axis_level_up(cost: CostModel, strides: list[tuple[float, float]], g: int, axis: int, level: float,
                   lowest: float) -> tuple[list[tuple[float, float]], float] | None:
    """``strides`` with group ``g``'s stride on ``axis`` lowered just enough (not below
    ``lowest``) for the cost to rise above ``level``, and that cost; None if it never does."""
    start = strides[g][axis]

    def at(x: float) -> list[tuple[float, float]]:
        pair = list(strides[g])
        pair[axis] = f32(max(start / x, lowest))
        if cost.square[g]:  # its axes share one stride
            pair = [pair[axis]] * 2
        return [tuple(pair) if i == g else s for i, s in enumerate(strides)]

    ceiling = start / lowest
    if ceiling <= 1.0 or cost.flops(at(ceiling)) <= level:
        return None
    trial = at(bisect_edge(lambda x: cost.flops(at(x)) <= level, 1.0, ceiling)[1])
    return trial, cost.flops(trial)


def fill_axes(cost: CostModel, base: Sequence[tuple[float, float]], bounds, strides: Sequence[tuple[float, float]],
              budget: int, groups: Sequence[int] | None = None,
              max_seconds: float = 10.0) -> tuple[list[tuple[float, float]], int]:
    """``strides`` (within ``budget``) with one group's map raised one level on one axis at a
    time, by the move that regains the most resolution (``log_resolution``) per FLOP spent,
    while a move fits the budget and keeps every map within its size at ``base`` (``admissible``);
    and the number of moves made. Only ``groups`` (indices; default all) move. Stops after
    ``max_seconds`` (many groups, or a cost model that probes leaves at each new size) with the
    best move of the candidates it scored."""
    original = cost.group_sizes(scaled(base, bounds, 1.0))
    strides = [tuple(s) for s in strides]
    flops, kept = cost.flops(strides), log_resolution(cost, strides)
    deadline = time.perf_counter() + max_seconds
    moves = 0
    late = False
    while not late:
        best = None  # score, strides, cost, resolution
        for g in range(len(bounds)) if groups is None else groups:
            for axis in (0,) if cost.square[g] else (0, 1):
                # a new size can mean new probes of opaque leaves (MobileNetV5: seconds each)
                late = late or time.perf_counter() > deadline
                if late:
                    break
                up = _axis_level_up(cost, strides, g, axis, flops, bounds[g][0])
                if up is None or up[1] > budget:
                    continue
                sizes = cost.group_sizes(up[0])  # one evaluation for both checks
                if not sizes_admissible(sizes, original):
                    continue
                res = resolution_of(sizes)
                if res > kept:
                    score = (res - kept) / max(up[1] - flops, 1)
                    if best is None or score > best[0]:
                        best = (score, up[0], up[1], res)
        if best is None:
            break
        _, strides, flops, kept = best
        moves += 1
    return strides, moves
