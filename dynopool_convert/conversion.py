"""The one conversion entry point: a model source in, a converted model with its FLOPs and its
checkpoint ``extra`` out. ``dynopool convert`` and ``finetune`` (when a recipe names an
unconverted model) both call ``convert_source``, so that the default input size, the recorded
FLOPs and the ``extra`` are worked out in one place.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from torch import fx

from .budget import BudgetFit, fit_to_budget, parse_budget
from .checkpoint_extra import conversion_extra
from .convert import ConversionResult, check_input_size, convert
from .errors import UserInputError
from .flops import count_flops, format_flops
from .models import default_input_size, resolve_source
from .plan import Plan
from .weights import build_with_weights, default_placement

__all__ = ["Conversion", "convert_source"]

#: ``progress(message)``: a context manager around each step (the CLI's spinner)
Progress = Callable[[str], AbstractContextManager]


@dataclass
class Conversion:
    """A model source converted: the result and everything its checkpoint records."""

    result: ConversionResult
    source: str
    build_args: dict[str, Any]
    input_size: tuple[int, int, int]
    placement: str
    origin: dict[str, Any] | None  # where the loaded weights came from (None: none loaded)
    original_flops: int
    converted_flops: int  # right after conversion (before any budget fit)
    fit: BudgetFit | None  # the fit to the budget, when one was given
    extra: dict[str, Any]  # the checkpoint's ``extra`` (checkpoint_extra.py)
    budget: int | None = None  # the budget in FLOPs (a relative one resolved against original_flops)

    @property
    def model(self) -> fx.GraphModule:
        return self.result.model

    @property
    def plan(self) -> Plan:
        return self.result.plan


def convert_source(
    source: str,
    build_args: dict[str, Any] | None = None,
    *,
    input_size: Sequence[int] | None = None,
    weights: str | Path | None = None,
    pretrained: bool = False,
    budget: int | str | None = None,
    keep_fit: bool = False,
    progress: Progress | None = None,
    axis_fill: bool = False,
    **policy: Any,
) -> Conversion:
    """Build ``source`` (with ``weights``/``pretrained``), convert it with ``policy`` (the keyword
    arguments of ``convert``; ``placement`` defaults to ``exact`` with weights, else ``before``)
    at ``input_size`` (default: the model's own, ``models.default_input_size``), count its FLOPs
    and fit it to ``budget`` (FLOPs, or a share of the original's: ``0.7x``, ``70%``) when given.
    ``keep_fit`` also stores the whole fit in ``extra``; ``axis_fill``: the fit then raises single
    sides of maps while the budget allows (``fit_to_budget``)."""
    step = progress or (lambda message: nullcontext())
    source = resolve_source(source)
    build_args = dict(build_args or {})
    with step(f"building {source}"):
        net, origin = build_with_weights(source, build_args, weights, pretrained)
    placement = policy.pop("placement", None) or default_placement(origin)
    size = check_input_size(input_size) if input_size is not None else default_input_size(source, net)
    at = f"{size[1]}x{size[2]}"
    with step(f"counting FLOPs at {at}"):
        original = int(count_flops(net, size))
    asked, budget = budget, parse_budget(budget, original) if budget is not None else None
    with step(f"tracing, converting and validating at {at}"):
        result = convert(net, size, placement=placement, **policy)
    if _fixed_grid(source, net, build_args, result):
        with step(f"converting again with dynamic_img_size=True at {at}"):
            again_args = {**build_args, "dynamic_img_size": True}
            again_net, again_origin = build_with_weights(source, again_args, weights, pretrained)
            again = convert(again_net, size, placement=placement, **policy)
        before, after = result.plan.summary()["groups"], again.plan.summary()["groups"]
        if after > before:
            as_built = "no learned group" if before == 0 else f"{before} learned group{'s' * (before > 1)}"
            again.plan.notes.append(
                f"{as_built} as built (its grid is fixed: sites reverted), {after} built again with dynamic_img_size=True, "
                "timm's option to accept any grid (--build-arg dynamic_img_size=false keeps the model as built)")
            net, origin, result, build_args = again_net, again_origin, again, again_args
            original = int(count_flops(net, size))
            budget = parse_budget(asked, original) if asked is not None else None
    fit = None
    with step("counting FLOPs" if budget is None else f"fitting to {format_flops(budget)} FLOPs"):
        if budget is None:
            converted = int(count_flops(result.model, size))
        else:
            try:
                fit = fit_to_budget(result.model, budget, size, original_flops=original, axis_fill=axis_fill)
            except UserInputError as err:
                raise _with_input_site_hint(err, result, policy) from err
            converted = fit.converted_flops
    extra = conversion_extra(original, converted, fit, keep_fit=keep_fit, weights=origin)
    return Conversion(result, source, build_args, size, placement, origin, original, converted, fit, extra, budget)


def _with_input_site_hint(err: UserInputError, result: ConversionResult, policy: dict[str, Any]) -> UserInputError:
    """A budget refused for want of a learned group, where ops were pinned or reverted: the input
    resolution may still learn (``--input-site``; pinned ops keep their input sizes)."""
    held = [s for s in result.plan.sites if s.status in ("pinned", "reverted")]
    if result.plan.summary()["groups"] or policy.get("input_site") or not held:
        return err
    return UserInputError(f"{err}; with --input-site the input resolution may learn instead (ops that cannot "
                          f"move, such as {held[0].name} here, are then pinned: their inputs resized back)")


def _fixed_grid(source: str, net: Any, build_args: dict[str, Any], result: ConversionResult) -> bool:
    """Whether a conversion with reverted sites is worth one more try with ``dynamic_img_size``:
    a timm model whose builder takes it (ViT, Eva, Swin: a fixed grid of patches, rotary tables or
    windows breaks every move of the patch embedding; a Swin's fixed windows, those of its patch
    merging) and that the user did not set. Kept where it learns more groups."""
    counts = result.plan.summary()
    return (source.startswith("timm:") and "dynamic_img_size" not in build_args
            and counts["reverted"] > 0 and "dynamic_img_size" in inspect.signature(type(net).__init__).parameters)
