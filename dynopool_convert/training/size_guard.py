"""A size change the conversion did not foresee stops training cleanly (issue 19).

Validation tries the stride moves of a few optimiser steps; training can go further (and size
jitter moves sizes by a pixel inside a step). When a forward or backward fails and some group's
output size in that forward differs from the last block that ran (a shape mismatch after a
stride step), ``SizeGuard`` names those groups and from which size to which, puts back the
strides of the last block that ran, saves ``last.pt`` through the trainer's own ``save`` and
raises ``UserInputError`` (CLI exit 2, one line): no traceback and no lost work.

>>> guard = SizeGuard(model, save=lambda: trainer.checkpoint())     # doctest: +SKIP
>>> with guard.watch(step):                                          # doctest: +SKIP
...     trainer.step(images, labels)
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import nn

from ..dynopool import DynOPool, dynopool_output_size, scale_parameters
from ..errors import DynopoolError, UserInputError, one_line
from ..moves import clamp_stride

__all__ = ["SizeGuard", "SizeChangeBroke"]


class SizeChangeBroke(UserInputError):
    """A stride step changed a group's output size and the model's forward or backward broke."""


def _fmt(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


class SizeGuard:
    """Remembers the strides and sizes of the last block that ran (a training step, an
    evaluation) and turns a shape failure after a size change into ``SizeChangeBroke``."""

    def __init__(self, model: nn.Module, save: Callable[[], None]) -> None:
        self._save = save
        self._pools = [(name, m) for name, m in model.named_modules() if isinstance(m, DynOPool)]
        self._params = scale_parameters(model)  # one per group
        self._sizes: dict[str, tuple[tuple[int, int], tuple[int, int]]] = {}
        self._good: tuple[list[torch.Tensor], dict] | None = None
        for name, m in self._pools:
            m.register_forward_hook(self._hook(name, m))

    def _hook(self, name: str, module: DynOPool):
        sizes = self._sizes

        # a plain closure, not a bound method: deep copies of the model (budget projection)
        # share it, and only the model's own modules record (the block's last forward wins)
        def hook(mod, args, out):
            if mod is module:
                sizes[name] = (tuple(args[0].shape[-2:]), tuple(out.shape[-2:]))
        return hook

    @contextlib.contextmanager
    def watch(self, step: int) -> Iterator[None]:
        """Run a block (a step, an evaluation); on a shape failure after a size change, restore
        the last good strides, save and raise ``SizeChangeBroke``; other errors pass through."""
        now = [p.detach().clone() for p in self._params]
        self._sizes.clear()
        try:
            yield
        except (RuntimeError, ValueError) as raised:
            # count_flops and friends wrap a failing forward in a UserInputError: judge its cause
            err = raised.__cause__ if isinstance(raised, DynopoolError) else raised
            if not isinstance(err, (RuntimeError, ValueError)) or isinstance(err, (torch.OutOfMemoryError, DynopoolError)):
                raise
            moved = self._moved() if self._good is not None else []
            if not moved:
                raise
            good_strides, _ = self._good
            with torch.no_grad():
                for p, value in zip(self._params, good_strides):
                    p.copy_(value)
            self._save()
            raise SizeChangeBroke(
                f"step {step}: {type(err).__name__} after the sizes changed: {'; '.join(moved)}: {one_line(err, 200)}; "
                "last.pt holds the strides before that step: convert again to validate the model at the new "
                "size, or keep the group fixed (convert --exclude)"
            ) from None
        if self._sizes:
            self._good = (now, dict(self._sizes))

    def _moved(self) -> list[str]:
        """'group G (site) from HxW to H'xW' (stride a -> b)' for each group whose output size in
        the failing forward (the modules it reached) differs from the last good one; when the
        failure came before or outside the model's own forward (an evaluation on a copy), the
        sizes the present strides give at the last good input sizes."""
        good_strides, good_sizes = self._good
        before = {id(p): s for p, s in zip(self._params, good_strides)}
        moved, seen = [], set()
        for name, m in self._pools:
            if name not in good_sizes or m.group in seen:
                continue
            old_stride = before[id(m.stride)]
            if self._sizes:
                if name not in self._sizes:
                    continue
                old_out, new_out = good_sizes[name][1], self._sizes[name][1]
            else:
                size_in = good_sizes[name][0]
                old_out = tuple(dynopool_output_size(n, clamp_stride(float(s), m.r_bounds), k)
                                for n, s, k in zip(size_in, m.effective_stride(old_stride.tolist()), m.multiple))
                new_out = m.output_size(size_in)
            if new_out != old_out:
                seen.add(m.group)
                old, new = old_stride.tolist(), m.stride.detach().tolist()
                moved.append(f"group {m.group} ({name}) from {_fmt(old_out)} to {_fmt(new_out)} "
                             f"(stride {old[0]:.3g}x{old[1]:.3g} -> {new[0]:.3g}x{new[1]:.3g})")
        return moved
