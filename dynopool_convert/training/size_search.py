"""Held-out size search: choose each group's output size by measured held-out loss.

A network trained with size jitter (``size_jitter``) works at the sizes around its current
ones, so neighbouring size allocations can be compared by one evaluation pass each on data
held out from training. The search starts from the run's initial allocation (the original
network's, scaled into the budget) and moves away from it only on evidence: a candidate
replaces the incumbent when its per-image held-out losses are lower in a paired one-sided test
(the same images) at level ``alpha``, split (Bonferroni) over the candidates of each round and
over the rounds, so that pure noise moves the sizes with probability at most ``alpha``. Candidates:
the learned allocation, then per round every single move (one group, one axis, a few pixels up
or down) and some trades (one axis up, another down) that stay within the budget.
"""
from __future__ import annotations

import math
import random
from statistics import NormalDist
from dataclasses import dataclass, field
from typing import Callable, Sequence

from torch import Tensor

from .group_sizes import GroupGeometry

__all__ = ["SearchResult", "search_sizes", "paired_z"]

Sizes = list[tuple[int, int]]


@dataclass
class SearchResult:
    """The chosen allocation and what was evaluated on the way."""

    sizes: Sizes
    strides: list[tuple[float, float]]
    loss: float
    accuracy: float
    flops: int
    start: str  # the allocation the search grew from
    evaluated: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"sizes": [list(s) for s in self.sizes], "strides": [list(s) for s in self.strides],
                "accuracy": self.accuracy, "loss": self.loss, "flops": self.flops, "start": self.start,
                "evaluations": len(self.evaluated), "evaluated": self.evaluated}


def paired_z(candidate: Tensor, incumbent: Tensor) -> float:
    """How many standard errors lower the candidate's per-image losses are (paired)."""
    d = (incumbent - candidate).double()
    if d.numel() < 2:
        return 0.0
    se = float(d.std()) / math.sqrt(d.numel())
    return float(d.mean()) / se if se > 0 else (math.inf if float(d.mean()) > 0 else 0.0)


STEP_FRACTION = 0.08  # a move changes a size by this share of it (at least one pixel)


def _step(size: int, fraction: float) -> int:
    return max(1, round(fraction * size))


def candidate_moves(sizes: Sizes, fraction: float, trades: int | None, rng: random.Random) -> list[Sizes]:
    """Every group axis moved one step up or down, then ``trades`` random pairs (one axis up,
    another down; None: every pair, in order)."""
    axes = [(g, a) for g in range(len(sizes)) for a in (0, 1)]

    def moved(changes: list[tuple[int, int, int]]) -> Sizes | None:
        out = [list(s) for s in sizes]
        for g, a, sign in changes:
            out[g][a] += sign * _step(sizes[g][a], fraction)
            if out[g][a] < 1:
                return None
        return [(h, w) for h, w in out]

    singles = [moved([(g, a, sign)]) for g, a in axes for sign in (1, -1)]
    pairs = [(x, y) for x in axes for y in axes if x != y]
    if trades is not None:
        rng.shuffle(pairs)
        pairs = pairs[:trades]
    traded = [moved([(gx, ax, 1), (gy, ay, -1)]) for (gx, ax), (gy, ay) in pairs]
    return [m for m in singles + traded if m is not None]


def search_sizes(
    geometry: GroupGeometry,
    flops_of: Callable[[Sequence[tuple[float, float]]], int],
    budget: int,
    evaluate: Callable[[], tuple[Tensor, Tensor]],
    initial: Sequence[tuple[float, float]],
    others: dict[str, Sequence[tuple[float, float]]] | None = None,
    rounds: int = 4,
    step_fraction: float = STEP_FRACTION,
    trades: int = 12,
    alpha: float = 0.05,
    seed: int = 0,
) -> SearchResult:
    """Greedy held-out search over the groups' sizes within ``budget`` FLOPs.

    ``flops_of(strides)`` is the cost model; ``evaluate()`` returns the per-image held-out
    losses and correctness (0/1) of the model at the strides currently set. ``initial`` is the
    incumbent to start from (it must fit the budget); ``others`` (e.g. the learned allocation)
    and the moves replace it only on evidence (``alpha``). The model is left at the chosen strides.
    """
    rng = random.Random(seed)
    seen: dict[tuple, tuple[Tensor, Tensor] | None] = {}
    evaluated_at: dict[tuple, list[tuple[float, float]]] = {}  # the strides each allocation was scored at
    log: list[dict] = []

    def measure(sizes: Sizes, origin: str) -> tuple[Tensor, Tensor] | None:
        key = tuple(sizes)
        if key not in seen:
            seen[key] = None
            if geometry.set_sizes(sizes):  # else a bound or multiple forbids it
                strides = geometry.strides()
                flops = int(flops_of(strides))
                if flops <= budget:
                    losses, correct = evaluate()
                    seen[key], evaluated_at[key] = (losses, correct), strides
                    log.append({"sizes": [list(s) for s in sizes], "flops": flops, "loss": float(losses.mean()),
                                "accuracy": float(correct.float().mean()), "from": origin})
        return seen[key]

    best_sizes, start = geometry.sizes_at(initial), "initial"
    best = measure(best_sizes, "start:initial")
    if best is None:
        raise ValueError("the initial allocation does not fit the budget")

    def better(candidates: list[tuple[Sizes, str]]) -> tuple[Sizes, str, tuple[Tensor, Tensor]] | None:
        scored = []
        for sizes, origin in candidates:
            got = measure(sizes, origin)
            if got is not None and tuple(sizes) != tuple(best_sizes):
                scored.append((paired_z(got[0], best[0]), sizes, origin, got))
        if not scored:
            return None
        z, sizes, origin, got = max(scored, key=lambda t: t[0])
        threshold = NormalDist().inv_cdf(1.0 - alpha / ((rounds + 1) * len(scored)))
        return (sizes, origin, got) if z > threshold else None

    starts = []
    for name, s in (others or {}).items():
        try:
            starts.append((geometry.sizes_at(s), name))
        except RuntimeError:  # the forward breaks at that allocation: not a candidate
            log.append({"from": f"start:{name}", "error": "the forward breaks at these strides"})
    found = better(starts)
    if found:
        best_sizes, start, best = found
    for r in range(rounds):
        found = better([(c, f"round {r + 1}") for c in candidate_moves(best_sizes, step_fraction, trades, rng)])
        if not found:
            break
        best_sizes, _, best = found
    strides = evaluated_at[tuple(best_sizes)]  # exactly what was scored (and fits the budget)
    geometry.set_strides(strides)
    return SearchResult(best_sizes, strides, float(best[0].mean()), float(best[1].float().mean()),
                        int(flops_of(strides)), start, log)
