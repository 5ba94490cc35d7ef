"""The compute budget (DESIGN.md §3): parsing, fitting at convert time, the fine-tuning
penalty, and the final projection that guarantees fvcore's count <= budget.

Every budget is in fvcore FLOPs (one multiply-add = one FLOP) at a reference input size.
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation

import torch
from torch import Tensor, nn

from .allocation import (feasible_floor, flops_path_factors, log_resolution, one_group_factors, resolution_path_factors,
                         scaled)
from .axis_fill import fill_axes
from .cost_model import INFEASIBLE, CostModel
from .errors import UserInputError
from .group_ids import group_ids
from .flops import count_flops, format_flops

__all__ = ["parse_budget", "budget_fraction", "check_budget", "budget_penalty", "fit_to_budget", "project_to_budget", "check_reachable", "BUDGET_FORMS", "BudgetFit",
           "BudgetProjection"]

#: The accepted forms, as shown in every error message.
BUDGET_FORMS = ("a positive number of FLOPs with an optional k/M/G/T unit and 'FLOPs' suffix, e.g. 4G, 4.1G, 500M, 750k, "
                "4.1e9, 3000000, 4GFLOPs, or a share of the original model's FLOPs: 0.7x, 70%")

_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_RELATIVE_RE = re.compile(r"(?P<num>\d+\.?\d*|\.\d+)(?P<unit>x|%)")  # lower-case x: '4X' stays a typo
_BUDGET_RE = re.compile(r"(?P<num>(?:\d+\.?\d*|\.\d+)(?:e[+-]?\d+)?)(?P<unit>[kmgt]?)(?:flops?)?", re.IGNORECASE)


def budget_fraction(text: object) -> float | None:
    """The share of the original model's FLOPs that a relative budget names (``0.7x``, ``70%``:
    0.7), or None for any other text (an absolute budget, or one ``parse_budget`` refuses)."""
    if not isinstance(text, str):
        return None
    match = _RELATIVE_RE.fullmatch(text.strip())
    if match is None:
        return None
    return float(match["num"]) / (100.0 if match["unit"] == "%" else 1.0)


def check_budget(text: str | int) -> None:
    """``UserInputError`` unless ``parse_budget`` can read ``text`` (a share: once the original
    model's FLOPs are known), so a bad budget is refused before any work."""
    fraction = budget_fraction(text)
    if fraction is None or fraction <= 0:
        parse_budget(text, original=0)


def parse_budget(text: str | int, original: int | None = None) -> int:
    """FLOPs (an int) from a budget string such as ``4G``, ``4.1G``, ``500M``, ``750k``,
    ``4.1e9``, ``3000000`` or ``4GFLOPs`` (case-insensitive; ``M`` is mega), or a share of
    ``original`` (the unconverted model's FLOPs) written ``0.7x`` or ``70%``.

    Anything else (``4X``, ``-1G``, ``nanG``, ``inf``, ``4 G``, empty, zero, a share without
    ``original``) raises ``UserInputError`` with the accepted forms.

    >>> parse_budget("4.1G"), parse_budget("750k"), parse_budget("4GFLOPs"), parse_budget("70%", original=1000)
    (4100000000, 750000, 4000000000, 700)
    """
    fraction = budget_fraction(text)
    if fraction is not None:
        if fraction <= 0:
            raise UserInputError(f"invalid budget {text!r}: a share must be above 0; expected {BUDGET_FORMS}")
        if original is None:
            raise UserInputError(f"budget {text!r} is a share of the original model's FLOPs, which are not known here "
                                 "(a checkpoint that does not record them): give FLOPs, e.g. 4G")
        flops = round(fraction * original)
        if flops < 1:
            raise UserInputError(f"invalid budget {text!r}: it must be at least 1 FLOP; expected {BUDGET_FORMS}")
        return flops
    if isinstance(text, bool):
        raise UserInputError(f"invalid budget {text!r}: expected {BUDGET_FORMS}")
    if isinstance(text, int):
        text = str(text)
    if not isinstance(text, str):
        raise UserInputError(f"invalid budget {text!r}: expected {BUDGET_FORMS}")
    match = _BUDGET_RE.fullmatch(text.strip())
    if match is None:
        raise UserInputError(f"invalid budget {text!r}: expected {BUDGET_FORMS}")
    try:
        value = Decimal(match["num"]) * _UNITS[match["unit"].lower()]
    except InvalidOperation:  # pragma: no cover - the regex admits only valid decimals
        raise UserInputError(f"invalid budget {text!r}: expected {BUDGET_FORMS}") from None
    flops = int(value.to_integral_value())
    if flops < 1:
        raise UserInputError(f"invalid budget {text!r}: it must be at least 1 FLOP; expected {BUDGET_FORMS}")
    return flops


@dataclasses.dataclass
class _BudgetResult:
    """Where the strides landed: fvcore's count there, how they were lowered, per group."""

    budget: int
    input_size: list[int]
    final_flops: int  # fvcore's count at the returned strides
    method: str  # none | common | per-group | input (the input site alone; see INPUT_FIRST_SLACK)
    factor: float  # the best common multiplier of every group's r
    group_factors: list[float]  # the multipliers applied, per group
    strides: list[list[float]]  # the final (s_h, s_w) per group
    fvcore_checks: int
    groups: list[int] = dataclasses.field(default_factory=list)  # the group id of each entry above
    # one-axis moves (``axis_fill``) made after ``group_factors``: the strides are then not
    # ``group_factors`` applied alike on both axes
    axes_raised: int = 0

    def __getitem__(self, key: str):
        """Read as a mapping too (``fit["final_flops"]``), as the results once were."""
        try:
            return getattr(self, key)
        except AttributeError:
            raise KeyError(key) from None

    def as_dict(self) -> dict:
        """Plain data (for checkpoints and JSON)."""
        return dataclasses.asdict(self)


@dataclasses.dataclass
class BudgetFit(_BudgetResult):
    """``fit_to_budget``'s result: also the FLOPs before fitting and the original model's."""

    converted_flops: int = 0
    original_flops: int | None = None


@dataclasses.dataclass
class BudgetProjection(_BudgetResult):
    """``project_to_budget``'s result: also the FLOPs before and whether the strides moved."""

    flops_before: int = 0
    moved: bool = False


BUDGET_MODES = ("ceiling", "target")


def budget_penalty(flops: Tensor, budget: float, mode: str = "ceiling") -> Tensor:
    """``relu(F / B - 1) ** 2`` (``ceiling``): zero inside the budget, growing smoothly outside;
    ``(F / B - 1) ** 2`` (``target``): also pulls a model under its budget back up to it.

    The square makes it continuously differentiable at ``F = B`` (its gradient starts at 0)
    and scale-free (5% over budget costs 0.0025 whatever the model). Multiply by ``lambda``
    in the training loss.
    """
    if budget <= 0:
        raise UserInputError(f"budget must be positive, got {budget}")
    if mode not in BUDGET_MODES:
        raise UserInputError(f"budget mode must be one of {', '.join(BUDGET_MODES)}, got {mode!r}")
    excess = flops / float(budget) - 1.0
    return (torch.relu(excess) if mode == "ceiling" else excess) ** 2


# --------------------------------------------------------------------------------------------
# common scaling of every group's r


def _set_strides(params: Sequence[nn.Parameter], strides: Sequence[tuple[float, float]]) -> None:
    with torch.no_grad():
        for p, s in zip(params, strides):
            p.copy_(torch.tensor(s, dtype=p.dtype, device=p.device).reshape(p.shape))


# lowering the input alone may give up at most this fraction of the budget more than the
# plain fit (common or per-group factors) before the plain fit is taken instead
INPUT_FIRST_SLACK = 0.05


# the fit gives way to an allocation that keeps at least this much more resolution (the log of
# the product of the maps' areas: as much as one map's area twice as large); below it the two
# differ by a pixel here and there, and spending the most of the budget measured better
# (placement exact at half budget on the toy VGG: 86.00% against 85.17%, docs/RESULTS.md §6.6)
RESOLUTION_GAIN = math.log(2.0)
#: the fit's rules for choosing among allocations (``fit_to_budget(allocation=...)``)
ALLOCATIONS = ("resolution", "flops", "most-resolution")


def _keep_resolution(cost: CostModel, base, bounds, budget: int, floor: float, factors: list[float], method: str,
                     others: list[list[float]]) -> tuple[list[float], str]:
    """``factors`` (the allocation spending the most of the budget), or the one keeping the most
    resolution (``allocation.log_resolution``) at a cost within ``INPUT_FIRST_SLACK`` of the
    budget below it, when that keeps ``RESOLUTION_GAIN`` more. Spending the most FLOPs picks
    among allocations of nearly equal cost by accident: the toy VGG at half budget ended at
    25 -> 10 -> 3 -> 1 (its last map 1x1) and lost to the lower input resolution; 20 -> 9 -> 5 -> 3
    costs as much and beat it (docs/RESULTS.md §6.6)."""
    spent = cost.flops(scaled(base, bounds, factors))
    kept = log_resolution(cost, scaled(base, bounds, factors))
    found = resolution_path_factors(cost, base, bounds, budget, floor, [factors, *others],
                                    min_flops=spent - INPUT_FIRST_SLACK * budget)
    if found is not None and log_resolution(cost, scaled(base, bounds, found)) >= kept + RESOLUTION_GAIN:
        return found, "resolution"
    return factors, method


def _input_resolution_factors(model: nn.Module, cost: CostModel, base, bounds, budget: int) -> list[float] | None:
    """Per-group factors that lower only the input site's ``r`` (``convert(input_site=True)``)
    to the largest value that fits, or None (no input site, or it cannot reach the budget alone).

    Lowering every group's ``r`` by one factor compounds along the network (each group's size
    is relative to its input): the last maps shrink most. Lowering the input alone is "lower the
    input resolution", the simple alternative DynOPool must start from and then beat.
    """
    from .dynopool import dynopool_modules
    from .input_site import INPUT_SITE

    site = dict(dynopool_modules(model)).get(INPUT_SITE)
    index = next((i for i, p in enumerate(cost.parameters) if site is not None and p is site.stride), None)
    return None if index is None else one_group_factors(cost, base, bounds, budget, index)


def _largest_fitting_factor(cost: CostModel, base, bounds, target: float, lo: float, hi: float) -> float:
    """Largest common factor in ``[lo, hi)`` whose cost-model FLOPs are <= ``target``
    (``cost(lo) <= target`` is assumed; the cost is non-increasing as the factor drops)."""
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if cost.flops(scaled(base, bounds, mid)) <= target:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-9 * hi:
            break
    return lo


def _no_group_error(budget: int, flops: int, input_size) -> UserInputError:
    return UserInputError(
        f"budget {format_flops(budget)} FLOPs ({budget}) cannot be met: the model has no learned group (no site "
        f"to resize), so its {format_flops(flops)} FLOPs ({flops}) at {input_size[-2]}x{input_size[-1]} cannot move")


def _raise_impossible(model, budget, input_size, params, base, lowest, limited: bool = False) -> None:
    """Restore ``base`` and refuse, quoting fvcore's count at the minimum (every r at r_min), or
    (``limited``) at the smallest maps one factor for all reaches before some map empties."""
    if not params:  # nothing moves: "every scale factor at its lower bound" would say there is one
        raise _no_group_error(budget, count_flops(model, input_size), input_size)
    _set_strides(params, lowest)
    try:
        minimum = count_flops(model, input_size)
    finally:
        _set_strides(params, base)
    h, w = input_size[-2:]
    where = ("with every scale factor lowered by one factor until the next step would empty a map"
             if limited else "with every scale factor at its lower bound")
    raise UserInputError(
        f"budget {format_flops(budget)} FLOPs ({budget}) cannot be met: the minimum achievable at {h}x{w} "
        f"is {format_flops(minimum)} FLOPs ({minimum}), {where}; give a budget of at least {minimum}"
    )


def _choose_factors(model: nn.Module, cost: CostModel, base, bounds, budget: int, floor: float,
                    common: list[float] | None, allocation: str) -> tuple[list[float] | None, str]:
    """The allocation the fit takes, and its method: the most expensive within the budget of the
    common factor (``common``, or None where it does not fit), the greedy path and each group
    lowered alone (the greedy path can end on a cliff where every move drops far below the
    budget: RegNetY-200MF at 64 px, 0.65x for a 0.8x budget, where its stem alone reaches
    0.79x); the input lowered alone when it gives up little more; then (``allocation``
    "resolution") an allocation that keeps much more resolution at nearly the same cost."""
    factors, method = common, "common"
    plain = cost.flops(scaled(base, bounds, common)) if common is not None else -1
    per_group = [flops_path_factors(cost, base, bounds, budget, floor)]
    per_group += [one_group_factors(cost, base, bounds, budget, g) for g in range(len(base))]
    for candidate in filter(None, per_group):
        flops = cost.flops(scaled(base, bounds, candidate))
        if flops > plain:
            factors, method, plain = candidate, "per-group", flops
    by_input = _input_resolution_factors(model, cost, base, bounds, budget)
    # a learnable input resolution: lower it alone first, unless its sizes are coarse steps that
    # give up much more of the budget (ResNet-18 at 32 px under 0.7x: 16 px costs 0.42x, 17 px
    # is just over; the common factor lands at 0.67x)
    if by_input is not None and cost.flops(scaled(base, bounds, by_input)) >= plain - INPUT_FIRST_SLACK * budget:
        factors, method = by_input, "input"
    if allocation == "most-resolution":  # the ablation of RESULTS §6.6: resolution alone decides
        starts = [c for c in [common, *per_group, by_input] if c is not None]
        found = resolution_path_factors(cost, base, bounds, budget, floor, starts, exchange_starts=3)
        return (found, "resolution") if found is not None else (factors, method)
    if allocation == "resolution" and factors is not None:
        factors, method = _keep_resolution(cost, base, bounds, budget, floor, factors, method,
                                           [c for c in [*per_group, by_input] if c is not None])
    return factors, method


def _fit_common_factor(model: nn.Module, budget: int, input_size, cost: CostModel, allocation: str = "resolution",
                       fill: bool = False) -> dict:
    """Scale every group's r by one factor <= 1 so that fvcore's count is <= ``budget``; then
    (``fill``) raise single axes while the budget allows (``axis_fill``)."""
    params = cost.parameters
    bounds = cost.bounds
    base = cost.clamp(cost.current_strides())
    # fvcore's count from the cost model's build if the strides have not moved since, else
    # the cost model's (exact) value; fvcore confirms whatever is returned
    unmoved = base == cost.clamp(cost.reference_strides) and tuple(input_size) == cost.input_size
    start = cost.reference_flops if unmoved else cost.flops(base)
    result = {"budget": int(budget), "input_size": list(input_size), "start_flops": start, "factor": 1.0,
              "method": "none", "groups": group_ids(model, params)}
    if start <= budget:
        final = count_flops(model, input_size)
        if final <= budget:
            result.update(method="none", group_factors=[1.0] * len(base), final_flops=final,
                          strides=[list(s) for s in base], fvcore_checks=1)
            return result
    if not base:
        raise _no_group_error(budget, start, input_size)
    # below f_min every stride sits at its upper bound: the cost is the minimum there, unless
    # some map is empty before (the lowest feasible common factor is the floor then)
    f_min = min(1.0, min(min(s_h, s_w) / hi for (s_h, s_w), (_, hi) in zip(base, bounds)))
    floor = feasible_floor(cost, base, bounds, [1.0] * len(base), -1, 0.5 * f_min)
    limited = floor > 0.5 * f_min
    lowest = scaled(base, bounds, floor) if limited else [(hi, hi) for _, hi in bounds]
    common_fits = cost.flops(lowest) <= budget
    if not common_fits and not limited:
        _raise_impossible(model, budget, input_size, params, base, lowest)
    factor = _largest_fitting_factor(cost, base, bounds, float(budget), floor, 1.0) if common_fits else floor
    factors, method = _choose_factors(model, cost, base, bounds, budget, floor,
                                      [factor] * len(base) if common_fits else None, allocation)
    if factors is None:  # where maps empty, one factor for all cannot reach the budget; nor any group
        _raise_impossible(model, budget, input_size, params, base, lowest, limited=True)
    strides, raised = scaled(base, bounds, factors), 0
    if fill:
        # the input lowered alone stays the input alone (the simple alternative, RESULTS §6.2)
        movable = [g for g, f in enumerate(factors) if f != 1.0] if method == "input" else None
        strides, raised = fill_axes(cost, base, bounds, strides, budget, groups=movable)
    _set_strides(params, strides)
    final = count_flops(model, input_size)
    checks = 1
    while final > budget:
        # the count disagrees with the cost model (never seen): plain common scaling,
        # stepping down one cost level at a time until fvcore confirms
        strides = scaled(base, bounds, factor)
        factors, method, raised = [factor] * len(base), "common", 0
        _set_strides(params, strides)
        final = count_flops(model, input_size)
        checks += 1
        if final <= budget:
            break
        if factor <= floor:  # the cost model's minimum does not fit by fvcore's count
            _raise_impossible(model, budget, input_size, params, base, lowest, limited)
        # the count disagrees with the cost model: step down to the next lower cost level
        factor = _largest_fitting_factor(cost, base, bounds, cost.flops(strides) - 1, floor, factor)
    result.update(factor=factor, method=method, group_factors=factors, axes_raised=raised, final_flops=final,
                  strides=[list(s) for s in strides], fvcore_checks=checks)
    return result


def check_reachable(model: nn.Module, budget: int, input_size: Sequence[int], cost_model: CostModel) -> None:
    """UserInputError (with the minimum achievable FLOPs) when ``budget`` cannot be met even with
    every scale factor at its lower bound; checked before fine-tuning starts. (Where some map
    empties first, the fit itself refuses what no allocation reaches.)"""
    base = cost_model.clamp(cost_model.current_strides())
    lowest = [(hi, hi) for _, hi in cost_model.bounds]
    if INFEASIBLE > cost_model.flops(lowest) > budget:
        _raise_impossible(model, int(budget), tuple(input_size), cost_model.parameters, base, lowest)


def fit_to_budget(
    model: nn.Module,
    budget: int,
    input_size: Sequence[int] = (3, 224, 224),
    cost_model: CostModel | None = None,
    original_flops: int | None = None,
    allocation: str = "resolution",
    axis_fill: bool = False,
) -> BudgetFit:
    """Fit a converted model into ``budget`` FLOPs by lowering the groups' scale factors ``r``.

    If the model is over budget: the largest common factor on every group's ``r`` that fits
    (bisection on the cost model), and per-group alternatives (``allocation.py``: one group
    one size step at a time, one group alone, the input alone) used when they land closer
    below the budget -- rounding can make common scaling jump far below it (ResNet-50 at 224:
    4.12G, then 3.63G). ``allocation``: ``"resolution"`` (default) then takes an allocation that
    keeps ``RESOLUTION_GAIN`` more log-resolution at a cost within ``INPUT_FIRST_SLACK`` of the
    budget below; ``"flops"`` does not (the fit until session 8); ``"most-resolution"`` takes the
    allocation keeping the most resolution whatever it spends (an ablation). ``axis_fill``
    (off by default): one axis of one group at a time is then raised one pixel while the budget
    allows (``axis_fill.fill_axes``; where a step on both axes falls far below the budget, as a
    ViT's 7x7 patch grid going to 4x4; on the one model measured the FLOPs it adds bought no
    accuracy: docs/RESULTS.md §6.7). The result is confirmed with fvcore (stepping further down
    if ever needed). Raises ``UserInputError`` with the minimum achievable FLOPs when no
    allocation fits. Returns a ``BudgetFit``: ``budget``,
    ``input_size``, ``original_flops`` (as given), ``converted_flops`` (before fitting),
    ``final_flops`` (fvcore, after), ``method`` (``none``/``common``/``per-group``/``input``/
    ``resolution``), ``factor`` (the best common
    multiplier of ``r``), ``group_factors`` (the multipliers applied, per group, on both axes),
    ``axes_raised`` (the one-axis moves made after them), ``groups`` (the group id of each entry of
    ``group_factors`` and ``strides``) and the final ``strides`` per group.
    """
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {', '.join(ALLOCATIONS)}, got {allocation!r}")
    cost = cost_model or CostModel(model, input_size)
    out = _fit_common_factor(model, int(budget), tuple(input_size), cost, allocation, fill=axis_fill)
    start = out.pop("start_flops")
    return BudgetFit(**out, converted_flops=start, original_flops=original_flops)


def project_to_budget(
    model: nn.Module,
    budget: int,
    input_size: Sequence[int] = (3, 224, 224),
    cost_model: CostModel | None = None,
) -> BudgetProjection:
    """After training: make fvcore's count of ``model`` <= ``budget``, moving the strides least.

    Strides are first clamped into their bounds (as the forward pass uses them). If the model
    is over budget, the scale factors are lowered as ``fit_to_budget(allocation="flops")`` does
    (the smallest common reduction of every ``r``, or one group at a time when that gives up
    fewer FLOPs); the result is confirmed by ``count_flops`` and the loop only ends on a
    confirmed count.
    Raises ``UserInputError`` if no strides within the bounds fit. Returns a
    ``BudgetProjection``: ``budget``, ``input_size``, ``flops_before``, ``final_flops``, ``method``, ``factor``,
    ``group_factors``, ``axes_raised`` (0), ``groups``, ``moved`` and the final ``strides``.
    """
    cost = cost_model or CostModel(model, input_size)
    base = cost.clamp(cost.current_strides())
    _set_strides(cost.parameters, base)
    # the learned strides are the reference: no allocation is preferred for the resolution it
    # keeps over the one spending the budget (that rule is for the sizes training starts from)
    out = _fit_common_factor(model, int(budget), tuple(input_size), cost, allocation="flops")
    start = out.pop("start_flops")
    return BudgetProjection(**out, flops_before=start, moved=out["method"] != "none")
