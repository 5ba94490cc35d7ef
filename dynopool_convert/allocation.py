"""Per-group allocations of a compute budget: which groups' scale factors ``r`` the budget fit
lowers, and by how much (used by ``budget.fit_to_budget`` and ``budget.project_to_budget``).

An allocation is a list of factors, one per group, each multiplying that group's ``r = 1/s``.
Rounding makes the cost a step function of every factor, so each search here moves one group
by one cost level at a time (``next_level``) and evaluates the cost model, never the model.
"""
from __future__ import annotations

import math
import struct
import time
from collections.abc import Sequence

from .cost_model import INFEASIBLE, CostModel

#: relative width at which a search for a cost level's edge stops: far finer than one pixel's
#: step in any factor (1/4096 at 4096 px), so no level is skipped
TOLERANCE = 1e-7

__all__ = ["scaled", "flops_path_factors", "resolution_path_factors", "one_group_factors", "log_resolution", "bisect_edge"]


def f32(x: float) -> float:
    """``x`` rounded to float32, the stride parameters' dtype: the cost model must see the
    value the forward pass will read, or a size could round the other way at a boundary."""
    return struct.unpack("f", struct.pack("f", x))[0]


def scaled(base: Sequence[tuple[float, float]], bounds, factor: float | Sequence[float]) -> list[tuple[float, float]]:
    """Strides when each group's r = 1/s is multiplied by ``factor`` (one for all, or one per
    group), clamped to the bounds."""
    factors = [factor] * len(base) if isinstance(factor, (int, float)) else list(factor)
    out = []
    for (s_h, s_w), (lo, hi), f in zip(base, bounds, factors):
        out.append((f32(min(max(s_h / f, lo), hi)), f32(min(max(s_w / f, lo), hi))))
    return out


def bisect_edge(holds, lo: float, hi: float) -> tuple[float, float]:
    """``[lo, hi]`` narrowed to ``TOLERANCE`` around where ``holds`` (true at ``lo``, false at
    ``hi``) changes."""
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if holds(mid) else (lo, mid)
        if hi - lo <= TOLERANCE * hi:
            break
    return lo, hi


def feasible_floor(cost: CostModel, base, bounds, factors: list[float], g: int, floor: float) -> float:
    """``floor``, or the smallest factor of group ``g`` above it at which no map is empty (the
    others as in ``factors``, which must be feasible); ``g = -1``: one factor for all groups."""
    trial = list(factors)

    def put(f: float) -> None:
        trial[:] = [f] * len(trial) if g < 0 else [f if i == g else x for i, x in enumerate(trial)]

    put(floor)
    if cost.flops(scaled(base, bounds, trial)) < INFEASIBLE:
        return floor
    def empties(f: float) -> bool:
        put(f)
        return cost.flops(scaled(base, bounds, trial)) >= INFEASIBLE

    return bisect_edge(empties, floor, max(factors) if g < 0 else factors[g])[1]


def next_level(cost: CostModel, base, bounds, factors: list[float], g: int, level: float, floor: float) -> tuple[float, float] | None:
    """Largest factor below ``factors[g]`` at which the cost drops under ``level`` (others
    fixed), and that cost; ``None`` if group ``g`` cannot lower the cost any more."""
    floor = feasible_floor(cost, base, bounds, factors, g, floor)
    trial = list(factors)
    trial[g] = floor
    if cost.flops(scaled(base, bounds, trial)) >= level:
        return None
    def below(f: float) -> bool:
        trial[g] = f
        return cost.flops(scaled(base, bounds, trial)) < level

    trial[g] = bisect_edge(below, floor, factors[g])[0]
    return trial[g], cost.flops(scaled(base, bounds, trial))


def flops_path_factors(cost: CostModel, base, bounds, budget: int, floor: float, max_steps: int = 2000,
                    max_seconds: float = 10.0) -> list[float] | None:
    """Per-group factors found by lowering one group by one cost level at a time.

    Rounding makes the cost a step function of the common factor, and on a network whose
    sizes halve exactly at every stage all sizes step down together (ResNet-50 at 224:
    4.12G, then 3.63G: nothing in between). Each one-level move that lands within the budget is
    a candidate, and the most expensive candidate is kept; the path goes on, as long as any move
    stays over the budget, by the one that buys the most FLOPs per unit of log r given up.
    (Taking the first move that fits ended RegNetY-200MF at 64 px at 0.65x for a 0.8x budget:
    its last 2x2 map went to 1x1 in one move, where lowering the earlier maps a pixel at a time
    reaches 0.80x.) ``None`` if no candidate is found within ``max_steps`` steps or
    ``max_seconds`` (many groups, far over budget): the common factor is used then.
    """
    factors = [1.0] * len(base)
    current = cost.flops(scaled(base, bounds, factors))
    best: tuple[float, list[float]] | None = None  # the most expensive allocation within the budget
    deadline = time.perf_counter() + max_seconds
    for _ in range(max_steps):
        if current <= budget:
            return factors if best is None or current > best[0] else best[1]
        # every later candidate costs less than ``current``: none can beat the best found
        if (best is not None and current <= best[0]) or time.perf_counter() > deadline:
            break
        moves = []
        for g in range(len(base)):
            nxt = next_level(cost, base, bounds, factors, g, current, floor)
            if nxt is not None:
                f, c = nxt
                moves.append((g, f, c, (current - c) / max(math.log(factors[g] / f), 1e-12)))
        if not moves:
            break
        for g, f, c, _ in moves:
            if c <= budget and (best is None or c > best[0]):
                best = (c, [f if i == g else x for i, x in enumerate(factors)])
        above = [m for m in moves if m[2] > budget]
        if not above:
            break
        g, f, c, _ = max(above, key=lambda m: m[3])
        factors[g], current = f, c
    return None if best is None else best[1]


def one_group_factors(cost: CostModel, base, bounds, budget: int, index: int) -> list[float] | None:
    """Per-group factors that lower only group ``index``'s ``r`` to the largest value that fits,
    or None when that group alone cannot reach the budget."""
    factors = [1.0] * len(base)

    def fits(f: float) -> bool:
        factors[index] = f
        return cost.flops(scaled(base, bounds, factors)) <= budget

    # far below any bound (the stride is clamped to its upper bound there), or where maps empty
    floor = feasible_floor(cost, base, bounds, factors, index, 1e-3)
    if not fits(floor):
        return None
    lo, hi = floor, 1.0
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    fits(lo)
    return list(factors)


def log_resolution(cost: CostModel, strides: Sequence[tuple[float, float]]) -> float:
    """Sum over the groups of ``log(h * w)`` of each group's output map at ``strides``: the log of
    the product of the maps' areas, so every map counts alike and crushing any one of them (a
    last 3x3 map to 1x1) costs as much as halving the input's area; ``-inf`` where the model
    cannot run."""
    return resolution_of(cost.group_sizes(strides))


def resolution_of(sizes) -> float:
    """``log_resolution`` of ``cost.group_sizes``'s result."""
    if sizes is None:
        return -math.inf
    return sum(math.log(max(io[1][0] * io[1][1], 1)) for io in sizes if io is not None)


def admissible(cost: CostModel, original, strides: Sequence[tuple[float, float]]) -> bool:
    """No map larger than in ``original`` (``cost.group_sizes`` at the starting strides) at the
    same site, and no site that shrank its input enlarging it: the fit moves resolution between
    the maps, it does not add any. False where the model cannot run."""
    return sizes_admissible(cost.group_sizes(strides), original)


def sizes_admissible(sizes, original) -> bool:
    """``admissible`` of ``cost.group_sizes``'s result."""
    if sizes is None:
        return False
    for now, then in zip(sizes, original):
        if now is None or then is None:
            continue
        (h_in, w_in), (h, w) = now
        (h0_in, w0_in), (h0, w0) = then
        if h > h0 or w > w0 or (h > h_in and h0 <= h0_in) or (w > w_in and w0 <= w0_in):
            return False
    return True


def _level_up(cost: CostModel, base, bounds, factors: list[float], g: int, level: float, ceiling: float) -> tuple[float, float] | None:
    """Smallest factor in ``(factors[g], ceiling]`` at which the cost rises above ``level``
    (others fixed), and that cost; ``None`` if raising group ``g`` to ``ceiling`` does not."""
    trial = list(factors)
    trial[g] = ceiling
    if factors[g] >= ceiling or cost.flops(scaled(base, bounds, trial)) <= level:
        return None
    def within(f: float) -> bool:
        trial[g] = f
        return cost.flops(scaled(base, bounds, trial)) <= level

    trial[g] = bisect_edge(within, factors[g], ceiling)[1]
    return trial[g], cost.flops(scaled(base, bounds, trial))


class _ResolutionPath:
    """The state of ``resolution_path_factors``: per-group factors, their cost and resolution."""

    def __init__(self, cost: CostModel, base, bounds, budget: int, floor: float, ceilings: list[float],
                 min_flops: float = 0.0) -> None:
        self.cost, self.base, self.bounds, self.budget, self.min_flops = cost, base, bounds, budget, min_flops
        self.floor, self.ceilings = floor, ceilings
        self.original = cost.group_sizes(scaled(base, bounds, 1.0))
        self.factors = [1.0] * len(base)
        self.flops = cost.flops(scaled(base, bounds, self.factors))
        self.kept = log_resolution(cost, scaled(base, bounds, self.factors))

    def _with(self, g: int, f: float) -> list[float]:
        return [f if i == g else x for i, x in enumerate(self.factors)]

    def admissible(self, factors: list[float]) -> bool:
        """``admissible`` at these factors."""
        return admissible(self.cost, self.original, scaled(self.base, self.bounds, factors))

    def descend(self, fixed: int = -1) -> bool:
        """Down one level at a time, by the move losing the least resolution per FLOP saved,
        until within the budget (group ``fixed`` stays); False if no move is left first."""
        while self.flops > self.budget:
            best = None  # score, group, factor, cost, resolution
            for g in range(len(self.base)):
                if g == fixed:
                    continue
                nxt = next_level(self.cost, self.base, self.bounds, self.factors, g, self.flops, self.floor)
                if nxt is None:
                    continue
                res = log_resolution(self.cost, scaled(self.base, self.bounds, self._with(g, nxt[0])))
                score = (self.flops - nxt[1]) / max(self.kept - res, 1e-12)
                if best is None or score > best[0]:
                    best = (score, g, nxt[0], nxt[1], res)
            if best is None:
                return False
            _, g, self.factors[g], self.flops, self.kept = best
        return True

    def ascend(self, fixed: int = -1) -> None:
        """Up one level at a time, by the move regaining the most resolution per FLOP spent,
        while one fits the budget (group ``fixed`` stays)."""
        while True:
            best = None
            for g in range(len(self.base)):
                if g == fixed:
                    continue
                up = _level_up(self.cost, self.base, self.bounds, self.factors, g, self.flops, self.ceilings[g])
                if up is None or up[1] > self.budget or not self.admissible(self._with(g, up[0])):
                    continue
                res = log_resolution(self.cost, scaled(self.base, self.bounds, self._with(g, up[0])))
                if res > self.kept:
                    score = (res - self.kept) / max(up[1] - self.flops, 1)
                    if best is None or score > best[0]:
                        best = (score, g, up[0], up[1], res)
            if best is None:
                return
            _, g, self.factors[g], self.flops, self.kept = best

    def set(self, factors: list[float]) -> None:
        """Move to ``factors``, with their cost and resolution."""
        self.factors = list(factors)
        strides = scaled(self.base, self.bounds, self.factors)
        self.flops, self.kept = self.cost.flops(strides), log_resolution(self.cost, strides)

    def exchange(self) -> bool:
        """One group a level up and the others down until within the budget, or one group a
        level down and the others up while they fit: kept when it keeps more resolution. True
        when an exchange was kept."""
        start = (list(self.factors), self.kept)
        for g in range(len(self.base)):
            for move in ("up", "down"):
                if move == "up":
                    nxt = _level_up(self.cost, self.base, self.bounds, self.factors, g, self.flops, self.ceilings[g])
                    ok = nxt is not None and self.admissible(self._with(g, nxt[0]))
                else:
                    nxt = next_level(self.cost, self.base, self.bounds, self.factors, g, self.flops, self.floor)
                    ok = nxt is not None
                if not ok:
                    continue
                self.set(self._with(g, nxt[0]))
                if move == "up" and not self.descend(fixed=g):
                    self.set(start[0])
                    continue
                self.ascend(fixed=g)
                if self.kept > start[1] + 1e-9 and self.flops >= self.min_flops:
                    return True
                self.set(start[0])
        return False


def resolution_path_factors(cost: CostModel, base, bounds, budget: int, floor: float,
                            starts: Sequence[list[float]] = (), min_flops: float = 0.0,
                            max_exchanges: int = 100, exchange_starts: int = 1) -> list[float] | None:
    """Per-group factors that keep the most resolution (``log_resolution``) within the budget.

    Down from the original sizes, one group one cost level at a time, by the move that gives up
    the least resolution per FLOP saved, until the cost is within the budget; up again while a
    move fits (the last move down usually overshoots); then exchanges (one group a level up and
    the others down until within the budget, or the reverse) while they keep more resolution.
    The ascent runs from each of ``starts`` (other fits' allocations within the budget) too, and
    the exchanges from the ``exchange_starts`` of them keeping the most resolution. Groups may rise
    above their original ``r`` (up to their bounds) but no map above its original size and no
    shrinking site into an enlarging one: resolution moves between the maps, as DynOPool's
    learned strides move it. Only allocations costing at least ``min_flops`` are returned;
    ``None`` when none is found.
    """
    ceilings = [max(max(s_h, s_w) / lo, 1.0) for (s_h, s_w), (lo, _) in zip(base, bounds)]
    path = _ResolutionPath(cost, base, bounds, budget, floor, ceilings, min_flops)
    found = []
    for start in [None, *starts]:
        if start is not None:
            path.set(start)
            if path.flops > budget or not path.admissible(path.factors):
                continue
        elif not path.descend():
            continue
        path.ascend()
        if path.flops >= min_flops:
            found.append((path.kept, path.flops, list(path.factors)))
    distinct = {tuple(f): (kept, flops, f) for kept, flops, f in found}
    best = None
    for _, _, factors in sorted(distinct.values(), reverse=True)[:exchange_starts]:
        path.set(factors)
        for _ in range(max_exchanges):
            if not path.exchange():
                break
        if best is None or (path.kept, path.flops) > best[:2]:
            best = (path.kept, path.flops, list(path.factors))
    return None if best is None else best[2]
