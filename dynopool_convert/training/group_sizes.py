"""Each tied group's output size at the reference input, and strides that give chosen sizes.

Size jitter and the held-out size search both work in *pixels* (a group's output size), while
the model learns *strides*. A group's sizes are read at its first site. A group's input size
depends on the groups before it, so sizes are measured by running the model once (batch 1) and
the strides for wanted sizes are found by a few such runs (one per dependent stage at most).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..dynopool import DynOPool
from ..group_ids import stride_groups

__all__ = ["GroupGeometry"]

Pair = tuple[int, int]


class GroupGeometry:
    """Sizes and strides of the tied groups of a converted ``model`` at ``input_size``."""

    def __init__(self, model: nn.Module, input_size: Sequence[int]) -> None:
        self.model = model
        self.input_size = tuple(int(v) for v in input_size)
        groups = stride_groups(model)
        self.params: list[nn.Parameter] = [g.param for g in groups]
        self.sites: list[DynOPool] = [g.first for g in groups]
        self.bounds = [g.bounds for g in groups]

    def measure(self) -> tuple[list[Pair], list[Pair]]:
        """Input and output size of every group's first site at the current strides."""
        seen: dict[int, tuple[Pair, Pair]] = {}

        def record(mod, args, out):
            seen.setdefault(id(mod), (tuple(args[0].shape[-2:]), tuple(out.shape[-2:])))

        hooks = [m.register_forward_hook(record) for m in self.sites]
        was = self.model.training
        ref = next(iter(self.model.parameters()), None)
        self.model.eval()
        try:
            with torch.no_grad():
                self.model(torch.zeros(1, *self.input_size, device=ref.device if ref is not None else "cpu"))
        finally:
            self.model.train(was)
            for h in hooks:
                h.remove()
        pairs = [seen.get(id(m), ((1, 1), (1, 1))) for m in self.sites]
        return [tuple(int(v) for v in p[0]) for p in pairs], [tuple(int(v) for v in p[1]) for p in pairs]

    def strides(self) -> list[tuple[float, float]]:
        """Current strides, one ``(s_h, s_w)`` per group (one device-to-host copy)."""
        if not self.params:
            return []
        values = torch.stack([p.detach().reshape(2).float() for p in self.params]).cpu().tolist()
        return [(a, b) for a, b in values]

    def set_strides(self, strides: Sequence[Sequence[float]]) -> None:
        """Write ``strides`` into the groups' parameters (in place, no autograd)."""
        with torch.no_grad():
            for p, s in zip(self.params, strides):
                p.copy_(torch.tensor([float(s[0]), float(s[1])], dtype=p.dtype, device=p.device).reshape(p.shape))

    def sizes_at(self, strides: Sequence[Sequence[float]]) -> list[Pair]:
        """Output sizes at ``strides`` (the current strides are restored)."""
        saved = self.strides()
        self.set_strides(strides)
        try:
            return self.measure()[1]
        finally:
            self.set_strides(saved)

    def set_sizes(self, sizes: Sequence[Pair]) -> bool:
        """Set strides that give ``sizes`` (``s0 * H / H'`` per axis: ``s0`` is 1 for DynOPool and a
        ``DynResize``'s base, since it resizes ``H -> H * s0 / s``; the input sizes follow the groups
        before); True when every group reached its size (bounds and multiples permitting), False
        also when the forward breaks on the way (a kept 2x2 pool fed a 1x1 map, say: the strides
        are then put back as they were)."""
        sizes = [tuple(s) for s in sizes]
        saved = self.strides()
        bases = [getattr(m, "base", (1.0, 1.0)) for m in self.sites]
        try:
            for _ in range(len(self.params) + 1):
                ins, outs = self.measure()
                if outs == sizes:
                    return True
                strides = [(min(max(bh * ih / max(oh, 1), lo), hi), min(max(bw * iw / max(ow, 1), lo), hi))
                           for (ih, iw), (oh, ow), (lo, hi), (bh, bw) in zip(ins, sizes, self.bounds, bases)]
                self.set_strides(strides)
            return self.measure()[1] == sizes
        except RuntimeError:  # the ops after some group cannot run at these sizes
            self.set_strides(saved)
            return False
