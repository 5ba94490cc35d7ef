"""How often a training run's DynOPool sizes are read from the strides, and what it visits (DESIGN.md §7).

A size change is an event: new kernels (cuDNN autotuning with ``cudnn.benchmark``), new
allocations. Sizes come from each site's host copy of its stride; this schedule refreshes the
copies of all groups in one device-to-host transfer (:func:`~dynopool_convert.dynopool.refresh_sizes`)
every ``every`` optimiser steps. With ``every`` > 1 the sites hold their sizes in between
(``DynOPool.hold_sizes``; the strides still learn at every step: the straight-through gradient
does not need current sizes); ``released()`` lifts the hold for code that sets strides and
measures sizes (the trainer's size search). With ``every`` = 1 nothing is held: sizes follow
every change of the strides (size jitter, the search, settling).

It also counts the distinct ``(site, input size, output size)`` the training forwards used (kept
across a resume),
and sets ``cudnn.benchmark`` off while strides learn (every new size would be autotuned) and on
once they are frozen (or settled); the previous setting is restored by ``close``.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from ..dynopool import dynopool_modules, refresh_sizes, scale_parameters

__all__ = ["SizeSchedule"]


class SizeSchedule:
    """Refreshes a model's sizes every ``every`` steps (held in between when ``every`` > 1) and counts them."""

    def __init__(self, model: nn.Module, every: int, device: torch.device, strides_learn: bool) -> None:
        self.model, self.every = model, max(1, int(every))
        self.sites = dynopool_modules(model)
        self.seen: set[tuple] = set()
        self._cuda = device.type == "cuda"
        self._cudnn = torch.backends.cudnn.benchmark
        self._learning = strides_learn
        self._set_benchmark()
        refresh_sizes(model, hold=self.every > 1)

    @property
    def distinct(self) -> int:
        """Distinct (site, input size, output size) used by the run's training steps so far."""
        return len(self.seen)

    def _set_benchmark(self) -> None:
        if self._cuda:
            torch.backends.cudnn.benchmark = not self._learning

    def after_step(self, step: int, learning: bool = True) -> None:
        """Record the sizes the step used; refresh them when ``step`` is a multiple of ``every``.

        ``learning``: whether the strides still move (False once frozen: ``cudnn.benchmark`` on).
        """
        for name, m in self.sites:
            if m.last_sizes is not None:
                self.seen.add((name, *(tuple(int(v) for v in pair) for pair in m.last_sizes)))
        if step % self.every == 0:
            refresh_sizes(self.model)
        if self._learning and not learning:
            self._learning = False
            self._set_benchmark()

    @contextlib.contextmanager
    def released(self) -> Iterator[None]:
        """Sizes follow the strides inside the block (then held again at the strides it leaves)."""
        if self.every == 1:
            yield
            return
        refresh_sizes(self.model, hold=False)
        try:
            yield
        finally:
            refresh_sizes(self.model, hold=True)

    def state(self) -> dict:
        """Plain data for a resumed run: the held strides (one pair per group) and the sizes seen."""
        by_param = {id(m.stride): list(m.host_stride()) for _, m in self.sites}
        return {"held": [by_param[id(p)] for p in scale_parameters(self.model)],
                "seen": [[name, list(a), list(b)] for name, a, b in sorted(self.seen)]}

    def load_state(self, state: dict | None) -> None:
        if not state:
            return
        self.seen = {(name, tuple(a), tuple(b)) for name, a, b in state["seen"]}
        if self.every > 1:
            by_param = {id(p): v for p, v in zip(scale_parameters(self.model), state["held"])}
            for _, m in self.sites:
                m._set_host(by_param[id(m.stride)])

    def close(self) -> None:
        """Sizes follow the strides again; ``cudnn.benchmark`` as it was."""
        refresh_sizes(self.model, hold=False)
        if self._cuda:
            torch.backends.cudnn.benchmark = self._cudnn
