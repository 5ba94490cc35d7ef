"""Held-out size search: choose each group's output size by measured held-out accuracy.

A network trained with size jitter (``size_jitter``) works at the sizes around its current
ones, so neighbouring size allocations can be compared by one evaluation pass each on data
held out from training. The search starts from the best of a few allocations (the learned
one, the original network's scaled into the budget), then greedily takes the best single move
(one group, one axis, a few pixels up or down) or trade (one axis up, another down) that
stays within the budget, while it improves the held-out score.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable, Sequence

from .group_sizes import GroupGeometry

__all__ = ["SearchResult", "search_sizes"]

Sizes = list[tuple[int, int]]


@dataclass
class SearchResult:
    """The chosen allocation and what was evaluated on the way."""

    sizes: Sizes
    strides: list[tuple[float, float]]
    score: tuple[float, float]  # (-held-out loss, held-out accuracy)
    flops: int
    start: str  # which starting allocation the search grew from
    evaluated: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"sizes": [list(s) for s in self.sizes], "strides": [list(s) for s in self.strides],
                "accuracy": self.score[1], "loss": -self.score[0], "flops": self.flops, "start": self.start,
                "evaluations": len(self.evaluated), "evaluated": self.evaluated}


def _step(size: int, fraction: float) -> int:
    return max(1, round(fraction * size))


def _moves(sizes: Sizes, fraction: float, trades: int, rng: random.Random) -> list[Sizes]:
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
    rng.shuffle(pairs)
    traded = [moved([(gx, ax, 1), (gy, ay, -1)]) for (gx, ax), (gy, ay) in pairs[:trades]]
    return [m for m in singles + traded if m is not None]


def search_sizes(
    geometry: GroupGeometry,
    flops_of: Callable[[Sequence[tuple[float, float]]], int],
    budget: int,
    evaluate: Callable[[], tuple[float, float]],
    starts: dict[str, Sequence[tuple[float, float]]],
    rounds: int = 4,
    step_fraction: float = 0.08,
    trades: int = 12,
    seed: int = 0,
) -> SearchResult:
    """Greedy held-out search over the groups' sizes within ``budget`` FLOPs.

    ``flops_of(strides)`` is the cost model; ``evaluate()`` returns the held-out
    ``(accuracy, -loss)`` of the model at the strides currently set; allocations are ranked by
    the held-out loss, then the accuracy;
    ``starts`` names starting stride allocations (each must fit the budget to be used).
    The model is left at the chosen strides.
    """
    rng = random.Random(seed)
    seen: dict[tuple, tuple[float, float]] = {}
    log: list[dict] = []

    def score(sizes: Sizes, origin: str) -> tuple[float, float] | None:
        key = tuple(sizes)
        if key in seen:
            return seen[key]
        if not geometry.set_sizes(sizes):  # a bound or multiple forbids it
            return None
        flops = int(flops_of(geometry.strides()))
        if flops > budget:
            return None
        accuracy, neg_loss = evaluate()
        seen[key] = (neg_loss, accuracy)  # the loss ranks first: on a few thousand images it is far less noisy
        log.append({"sizes": [list(s) for s in sizes], "flops": flops, "accuracy": accuracy, "loss": -neg_loss,
                    "from": origin})
        return seen[key]

    best_sizes, best, start_name = None, None, ""
    for name, strides in starts.items():
        sizes = geometry.sizes_at(strides)
        got = score(sizes, f"start:{name}")
        if got is not None and (best is None or got > best):
            best_sizes, best, start_name = sizes, got, name
    if best_sizes is None:
        raise ValueError("no starting allocation fits the budget")
    for r in range(rounds):
        candidates = [(c, score(c, f"round {r + 1}")) for c in _moves(best_sizes, step_fraction, trades, rng)]
        candidates = [(c, s) for c, s in candidates if s is not None]
        if not candidates:
            break
        top_sizes, top = max(candidates, key=lambda cs: cs[1])
        if top <= best:
            break
        best_sizes, best = top_sizes, top
    geometry.set_sizes(best_sizes)
    strides = geometry.strides()
    return SearchResult(best_sizes, strides, best, int(flops_of(strides)), start_name, log)
