"""A size change the conversion did not foresee stops training cleanly (issue 19).

Validation tries the stride moves of a few optimiser steps; training can go further. When a
forward or backward fails after a stride step changed some group's output size (a shape
mismatch somewhere after it), ``SizeGuard`` names the groups whose size changed and from which
size to which, puts back the strides of the last step that ran, saves ``last.pt`` through the
trainer's own ``save`` and raises ``UserInputError`` (CLI exit 2, one line): no traceback and no
lost work.

>>> guard = SizeGuard(model, save=lambda: trainer.checkpoint())     # doctest: +SKIP
>>> with guard.watch(step):                                          # doctest: +SKIP
...     trainer.step(images, labels)
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import nn

from ..dynopool import DynOPool
from ..errors import DynopoolError, UserInputError, one_line

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
        self._params = list({id(m.stride): m.stride for _, m in self._pools}.values())
        self._sizes: dict[str, tuple[tuple[int, int], tuple[int, int]]] = {}
        self._good: tuple[list[torch.Tensor], dict] | None = None
        for name, m in self._pools:
            m.register_forward_hook(self._hook(name, m))

    def _hook(self, name: str, module: DynOPool):
        sizes = self._sizes

        # a plain closure, not a bound method: deep copies of the model (budget projection)
        # share it, and only the model's own modules record
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
        except (RuntimeError, ValueError) as err:
            if isinstance(err, (torch.OutOfMemoryError, DynopoolError)) or self._good is None:
                raise
            moved = self._moved()
            if not moved:
                raise
            good_strides, _ = self._good
            with torch.no_grad():
                for p, value in zip(self._params, good_strides):
                    p.copy_(value)
            self._save()
            raise SizeChangeBroke(
                f"step {step}: {type(err).__name__} after a stride step moved {'; '.join(moved)}: {one_line(err, 200)}; "
                "last.pt holds the strides before that step: convert again to validate the model at the new "
                "size, or keep the group fixed (convert --exclude)"
            ) from None
        if self._sizes:
            self._good = (now, dict(self._sizes))

    def _moved(self) -> list[str]:
        """'group G (site) from HxW to H'xW' (stride a -> b)' for each group whose output size at
        the last good step's input sizes differs under the present strides."""
        good_strides, good_sizes = self._good
        before = {id(p): s for p, s in zip(self._params, good_strides)}
        moved, seen = [], set()
        for name, m in self._pools:
            if name not in good_sizes or m.group in seen:
                continue
            size_in, size_out = good_sizes[name]
            new_out = m.output_size(size_in)
            if new_out != size_out:
                seen.add(m.group)
                old = before[id(m.stride)].tolist()
                new = m.stride_value
                moved.append(f"group {m.group} ({name}) from {_fmt(size_out)} to {_fmt(new_out)} "
                             f"(stride {old[0]:.3g}x{old[1]:.3g} -> {new[0]:.3g}x{new[1]:.3g})")
        return moved
