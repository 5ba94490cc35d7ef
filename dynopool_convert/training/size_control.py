"""How a fine-tuning run chooses its sizes: optionally a held-out search, then settling.

By default (``train.size_search`` off, ``train.scale_lr`` and ``train.size_jitter`` 0: the
measurements of docs/RESULTS.md §6) the sizes are the budget fit's and stay there. With
``size_search`` on, the schedule (``train.settle``, ``train.holdout``) is:

1. *Training* (the first ``1 - settle`` of the steps): the weights train at the starting sizes
   (the budget fit's); with ``scale_lr > 0`` the strides also learn by their gradient, and with
   ``size_jitter > 0`` every group's size moves by up to that many pixels each step
   (``size_jitter.py``).
2. *Search* (once, at that step): the held-out split carved from the training data (never the
   validation data) compares size allocations within the budget: the run's initial one is kept
   unless the learned one, a group shrunk alone into the budget or a neighbour has a lower
   held-out loss in a paired one-sided test over the same images (``size_search.py``).
3. *Settling* (the last ``settle`` of the steps): the strides are held at the chosen sizes and
   the weights adapt to them, on all the training images: the held-out ones have served their
   one purpose and train again from the epoch after the search (``rejoin_epoch``).

With ``size_search`` off (or no budget), the strides keep whatever ``scale_lr`` does to the end
(with ``scale_lr > 0``, as in the paper; with 0, the sizes they start at).
With the strides not learned and no allocation but the start within the budget
(``search_has_choices``), the trainer skips the search and holds no images out.
"""
from __future__ import annotations

import contextlib
import random
from typing import Any, Callable, Sequence

from torch import Tensor, nn

from .group_sizes import GroupGeometry
from .size_jitter import SizeJitter
from .size_search import STEP_FRACTION, candidate_moves, search_sizes

__all__ = ["SizeControl", "search_has_choices"]


class SizeControl:
    """The size schedule of one run (see the module docstring)."""

    def __init__(self, model: nn.Module, input_size: Sequence[int], *, jitter: int, search: bool, settle: float,
                 total_steps: int, seed: int, rounds: int = 4, alpha: float = 0.05, learning: bool = True) -> None:
        self.geometry = GroupGeometry(model, input_size)
        self.active = bool(self.geometry.params)
        self.jitter = SizeJitter(self.geometry, jitter if self.active else 0, seed)
        self.search_step = round(total_steps * (1.0 - settle)) if (search and self.active) else None
        self.rounds, self.seed, self.alpha = rounds, seed, alpha
        self.learning = learning  # an optimiser moves the strides (else nothing needs holding)
        self.initial = self.geometry.strides()  # the run's starting allocation (the search's incumbent)
        self.original = [tuple(m.stride_init) for m in self.geometry.sites]  # the converted model's, before any fit
        self.result: dict[str, Any] | None = None  # the search's outcome once it ran
        self.rejoin_epoch: int | None = None  # the held-out images train again from this epoch on

    @property
    def settled(self) -> bool:
        return self.result is not None

    def step(self, step: int) -> contextlib.AbstractContextManager:
        """Context for one training step's forward and backward (jittered while learning)."""
        return contextlib.nullcontext() if self.settled else self.jitter.step(step)

    def rejoins(self, epoch: int) -> bool:
        """Whether the held-out images are back in training at ``epoch``."""
        return self.rejoin_epoch is not None and epoch >= self.rejoin_epoch

    def search_due(self, step: int) -> bool:
        return self.search_step is not None and not self.settled and step >= self.search_step

    def search(self, flops_of: Callable, budget: int, evaluate: Callable[[], tuple[Tensor, Tensor]],
               project: Callable[[], None]) -> dict[str, Any]:
        """Run the held-out search and set the chosen strides (held from now on by ``hold``).

        The incumbent is the run's initial allocation; the learned one (projected into the budget
        by ``project()``, which moves the model's strides in place, if it is over) competes with it.
        """
        learned = self.geometry.strides()
        others = {"learned": learned}
        if flops_of(learned) > budget:
            project()
            others["learned, projected"] = self.geometry.strides()
            self.geometry.set_strides(learned)
        initial = self.initial if flops_of(self.initial) <= budget else others.get("learned, projected", learned)
        others.update(self._one_group_fits(flops_of, budget))
        found = search_sizes(self.geometry, flops_of, budget, evaluate, initial, others, rounds=self.rounds,
                             alpha=self.alpha, seed=self.seed)
        self.result = found.to_dict()
        return self.result

    def has_choices(self, flops_of: Callable, budget: int, start: Sequence[tuple[float, float]] | None = None) -> bool:
        """Whether the search could keep anything but ``start`` (default: the current strides),
        the strides staying there until it runs: a group shrunk alone into the budget, or a
        first-round move within it (every single and paired move: a superset of those it tries).
        Under ``exact`` at a budget equal to the original's FLOPs there is none: a resize costs
        more than the pixels it saves."""
        current = self.geometry.strides()
        start = [tuple(s) for s in start] if start is not None else current
        try:
            if flops_of(start) > budget or self._one_group_fits(flops_of, budget):
                return True
            self.geometry.set_strides(start)
            for sizes in candidate_moves(self.geometry.sizes_at(start), STEP_FRACTION, None, random.Random(0)):
                if self.geometry.set_sizes(sizes) and flops_of(self.geometry.strides()) <= budget:
                    return True
            return False
        finally:
            self.geometry.set_strides(current)

    def _one_group_fits(self, flops_of: Callable, budget: int) -> dict[str, list[tuple[float, float]]]:
        """Allocations that spend the budget by shrinking one group alone from the original sizes
        (its ``r`` times the largest factor that fits; the others at their original strides).

        Fitting a budget by one common factor on every group's ``r`` compounds along the network
        (each group's size is relative to its input), so the last maps shrink most; shrinking the
        input alone is "lower the resolution", which these starts put back into the comparison.
        """
        base = self.original
        out = {}
        for g, (lo, hi) in enumerate(self.geometry.bounds):
            def scaled(f: float) -> list[tuple[float, float]]:
                trial = list(base)
                trial[g] = tuple(min(max(s / f, lo), hi) for s in base[g])
                return trial
            if flops_of(scaled(1e-6)) > budget or flops_of(base) <= budget:
                continue  # this group alone cannot reach the budget (or no need to shrink)
            low, high = 1e-6, 1.0
            for _ in range(40):
                mid = 0.5 * (low + high)
                low, high = (mid, high) if flops_of(scaled(mid)) <= budget else (low, mid)
            out[f"only group {g} shrunk"] = scaled(low)
        return out

    def hold(self) -> None:
        """While settling, put the searched strides back after each optimiser step (whatever the
        optimiser's momentum would do to them; works the same under DDP)."""
        if self.settled and self.learning:
            self.geometry.set_strides(self.result["strides"])

    def state(self) -> dict[str, Any]:
        return {"initial": [list(s) for s in self.initial], "jitter_sizes": [list(s) for s in self.jitter.sizes],
                "result": self.result, "rejoin_epoch": self.rejoin_epoch}

    def load_state(self, state: dict[str, Any] | None) -> None:
        if not state:
            return
        self.initial = [tuple(s) for s in state["initial"]]
        self.jitter.sizes = [tuple(s) for s in state["jitter_sizes"]]
        self.result = state.get("result")
        self.rejoin_epoch = state.get("rejoin_epoch")


def search_has_choices(model: nn.Module, input_size: Sequence[int], flops_of: Callable, budget: int,
                       start: Sequence[tuple[float, float]] | None = None) -> bool:
    """``SizeControl.has_choices`` for a model before its run's schedule exists."""
    control = SizeControl(model, input_size, jitter=0, search=False, settle=0.0, total_steps=1, seed=0, learning=False)
    return control.has_choices(flops_of, budget, start)
