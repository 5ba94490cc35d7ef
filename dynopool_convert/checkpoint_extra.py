"""The checkpoint's ``extra`` data: one schema, written here only (docs/ARCHITECTURE.md, "The checkpoint's extra").

``extra["flops"]`` is a mapping of fvcore counts at the checkpoint's ``input_size``:
``original`` (the model before conversion), ``converted`` (right after it), ``final`` and
``fit_method``/``group_factors``/``axes_raised`` (after fitting to a budget at convert time),
``current`` (the weights saved by fine-tuning, after the budget projection). Once fine-tuning
replaced the classifier, ``original`` is the original built with the new one, and
``extra["head"]`` records ``classes`` (before, after) and ``original_flops`` (before, after). ``extra["fit_to_budget"]`` is
``BudgetFit.as_dict()`` when the trainer converted and fitted the model itself.
``extra["weights"]`` is where the loaded weights came from (``weights.build_with_weights``).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["conversion_extra", "with_current_flops", "with_new_head", "original_flops"]


def conversion_extra(original: int | None, converted: int, fit: Any = None, keep_fit: bool = False,
                     weights: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``extra`` for a freshly converted model (``fit``: a ``BudgetFit`` when fitted to a budget;
    ``keep_fit`` also stores the whole fit result; ``weights``: the loaded weights' origin)."""
    flops: dict[str, Any] = {"original": original, "converted": converted}
    if fit is not None:
        flops.update(final=fit.final_flops, fit_method=fit.method, group_factors=fit.group_factors)
        if getattr(fit, "groups", None) is not None:  # the group id of each factor
            flops["groups"] = fit.groups
        if getattr(fit, "axes_raised", 0):  # one-axis moves after the factors (``axis_fill``)
            flops["axes_raised"] = fit.axes_raised
    extra: dict[str, Any] = {"flops": flops}
    if fit is not None and keep_fit:
        extra["fit_to_budget"] = fit.as_dict()
    if weights is not None:
        extra["weights"] = dict(weights)
    return extra


def with_current_flops(extra: Mapping[str, Any] | None, flops: int) -> dict[str, Any]:
    """A copy of ``extra`` whose ``flops["current"]`` is ``flops`` (the other counts kept)."""
    out = dict(extra or {})
    counts = out.get("flops")
    out["flops"] = {**(counts if isinstance(counts, Mapping) else {}), "current": int(flops)}
    return out


def with_new_head(extra: Mapping[str, Any] | None, classes: tuple[int, int], before: int, after: int) -> dict[str, Any]:
    """A copy of ``extra`` for a model whose classifier went from ``classes[0]`` to ``classes[1]``
    classes: ``flops["original"]`` is ``after`` (the original built with the new classifier), and
    ``head`` records both class counts and both originals (kept from a first replacement)."""
    out = dict(extra or {})
    counts = out.get("flops")
    out["flops"] = {**(counts if isinstance(counts, Mapping) else {}), "original": int(after)}
    first = out.get("head") if isinstance(out.get("head"), Mapping) else {}
    out["head"] = {"classes": [first.get("classes", [classes[0]])[0], int(classes[1])],
                   "original_flops": [first.get("original_flops", [before])[0], int(after)]}
    return out


def original_flops(extra: Mapping[str, Any] | None) -> int | None:
    """The unconverted model's FLOPs recorded in ``extra`` (also the older ``flops_original``)."""
    extra = extra or {}
    counts = extra.get("flops")
    if isinstance(counts, Mapping) and counts.get("original") is not None:
        return counts["original"]
    return extra.get("flops_original")
