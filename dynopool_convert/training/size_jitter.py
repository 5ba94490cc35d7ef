"""Size jitter: every training step, each group's output size moves a random ±k pixels.

The weights then work at the sizes around the current ones, so (a) a size change during
training is not a cliff, and (b) the network is a small resolution supernet: the held-out
size search (``size_search``) can compare neighbouring allocations with one evaluation pass
each. The stride gradient of a jittered step is applied to the un-jittered stride.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from ..dynopool import refresh_sizes
from .group_sizes import GroupGeometry

__all__ = ["SizeJitter"]


class SizeJitter:
    """Moves each group's output size by a uniform random integer in ``[-pixels, pixels]``
    per axis for the duration of one step (``with jitter.step(): forward, backward``).

    The current sizes are re-measured (one batch-1 forward) every ``remeasure_every`` steps.
    """

    def __init__(self, geometry: GroupGeometry, pixels: int, seed: int = 0, remeasure_every: int = 50) -> None:
        if pixels < 0:
            raise ValueError(f"size jitter must be >= 0 pixels, got {pixels}")
        self.geometry = geometry
        self.pixels = int(pixels)
        self.seed = int(seed)
        self.remeasure_every = max(1, int(remeasure_every))
        self.sizes: list[tuple[int, int]] = []  # saved with the run's state: a resumed run jitters alike

    @contextlib.contextmanager
    def step(self, step: int) -> Iterator[None]:
        """Jittered strides inside the block (draws seeded by ``(seed, step)``); the learned
        values are restored on exit."""
        geo = self.geometry
        if self.pixels == 0 or not geo.params:
            yield
            return
        if not self.sizes or step % self.remeasure_every == 0:
            self.sizes = geo.measure()[1]  # one batch-1 forward every few steps
        strides = geo.strides()
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + int(step))
        moves = torch.randint(-self.pixels, self.pixels + 1, (len(strides), 2), generator=gen).tolist()
        # scale each stride by the size ratio, so that its size moves by about the drawn pixels
        deltas = []
        for (s_h, s_w), (h, w), (dh, dw) in zip(strides, self.sizes, moves):
            deltas.append((s_h * h / max(1, h + dh) - s_h, s_w * w / max(1, w + dw) - s_w))
        saved = [p.detach().clone() for p in geo.params]
        with torch.no_grad():
            for p, (dh, dw) in zip(geo.params, deltas):
                p.add_(torch.tensor([dh, dw], dtype=p.dtype, device=p.device).reshape(p.shape))
        refresh_sizes(geo.model)  # the jittered sizes for every site in one transfer
        try:
            yield
        finally:
            with torch.no_grad():  # exactly the learned values back (s + d - d is not s in float32)
                for p, v in zip(geo.params, saved):
                    p.copy_(v)
