"""The original's FLOPs and the budget after fine-tuning replaced the classifier.

A model converted with 1000 classes and fine-tuned on 10 is compared with the original built for
10: its classifier alone can be a tenth of a small model's FLOPs (MobileNetV3-S at 64 px). So
when ``adapt_head`` gives the model a new classifier, the original is built again with it and
counted (fvcore, at the checkpoint's input size), the checkpoint's ``flops.original`` becomes
that count, and the budget follows:

- ``--budget 0.7x`` (a share) is a share of the original with the new classifier;
- ``--budget 4G`` (FLOPs) stays as given;
- no ``--budget``: the checkpoint's budget keeps its share of the original (a checkpoint
  converted with ``--budget 0.6x`` stays at 0.6x of the original with the new classifier).

Sizes that a convert-time fit chose for the old classifier are fitted again for the new budget
from the converted model's (``reset_to_converted``), so the model trains as one converted with
``num_classes`` set from the start would.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..budget import budget_fraction, format_flops
from ..checkpoint_extra import original_flops, with_new_head
from ..dynopool import dynopool_modules
from . import upstream

__all__ = ["after_new_head", "rebase_budget", "reset_to_converted"]


def after_new_head(model: nn.Module, bundle: Any, budget_arg: str | int | None, classes: tuple[int, int],
                   refit: bool, say: Callable[[str], None]) -> None:
    """``rebase_budget``; then (``refit``: sizes a convert-time fit chose, not learned ones) every
    stride back to the converted model's, for the trainer to fit into the new budget."""
    rebase_budget(bundle, budget_arg, classes, say)
    if refit and reset_to_converted(model):
        say("sizes back to the converted model's, to be fitted to the budget again")


def rebase_budget(bundle: Any, budget_arg: str | int | None, classes: tuple[int, int],
                  say: Callable[[str], None]) -> None:
    """Count the original again with ``bundle``'s new head (``classes``: before, after), record
    it in ``bundle.extra`` and set ``bundle.budget`` by the rules above; say both in one line.
    A checkpoint that does not record the original's FLOPs is left as it is."""
    before = original_flops(bundle.extra)
    if before is None:
        return
    original = int(upstream.count_flops(upstream.build_model(bundle.source, bundle.build_args), bundle.input_size))
    bundle.extra = with_new_head(bundle.extra, classes, before, original)
    budget, old = bundle.budget, bundle.budget
    had = f"with {classes[0]}" if classes[0] else "without a classifier"
    line = f"original with {classes[1]} classes: {format_flops(original)} FLOPs ({original:,}; {format_flops(before)} {had})"
    if budget_arg is not None and budget_fraction(budget_arg) is not None:
        budget = upstream.parse_budget(budget_arg, original)
        line += f"; budget {budget_arg} of it: {format_flops(budget)} ({budget:,})"
    elif budget_arg is None and budget is not None:
        budget = max(1, round(_share(budget, before) * original))
        line += (f"; the checkpoint's budget {format_flops(old)} ({old / before:.3g}x of the original) keeps its "
                 f"share: {format_flops(budget)} ({budget:,})")
    elif budget is not None:
        line += f"; budget {format_flops(budget)} as given, {budget / original:.3g}x of it"
    bundle.budget = budget
    say(line)


def _share(budget: int, original: int) -> float:
    """``budget`` as a share of ``original``: the shortest decimal that gives it back (``0.6`` for
    a budget written ``0.6x``, as ``parse_budget`` rounds), else the plain ratio."""
    for digits in range(1, 10):
        share = round(budget / original, digits)
        if round(share * original) == budget:
            return share
    return budget / original


def reset_to_converted(model: nn.Module) -> bool:
    """Every DynOPool group's stride back to the converted model's (``stride_init``: before any
    budget fit), so that a fit for a new budget starts where ``convert --budget`` starts;
    whether any moved."""
    moved = False
    with torch.no_grad():
        for _, module in dynopool_modules(model):
            p = module.stride
            init = torch.tensor(module.stride_init, dtype=p.dtype, device=p.device).reshape(p.shape)
            if not torch.equal(p, init):
                p.copy_(init)
                moved = True
    return moved
