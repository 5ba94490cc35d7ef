"""The ways a group whose moves break the forward keeps learning, short of a pin (``convert``'s
pin pass, DESIGN.md §2 "Validation"): a cap at its reference scale factor (only its larger
outputs break), one stride for both axes (a layer after it reads one axis's size for both), or
both. Each tries the change on a rewritten copy of the plan and keeps it only where the group's
moves then pass; it returns the watched pins those moves reach, or None.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .plan import Group, Plan
from .rewrite import pin_module_paths, rewrite
from .validate import GroupProbe

if TYPE_CHECKING:
    from .convert import Analysis

__all__ = ["capped_problem", "square_problem", "group_probe"]


def capped_problem(analysis: Analysis, plan: Plan, group: Group, problem: str) -> set[str] | None:
    """Cap ``group``'s scale factor at its reference value when only its larger outputs break the
    forward (the layers after it crop a skip connection to its size: the original U-Net), so that
    it can still learn smaller maps; the watched pins its moves reach, or None (no cap) when a
    smaller output breaks the forward too."""
    if not problem.startswith("larger output"):
        return None
    group.r_max = max(1.0 / float(s) for s in group.stride_init)
    probe = group_probe(analysis, plan)
    trouble, reached = probe.problem(group.id)
    # a cap lets a budget fit shrink the group far: its maps must still mean what they did
    trouble = trouble or probe.shrink_problem(group.id)
    if trouble:
        group.r_max = None
        return None
    why = f"scale factor capped at its reference value {group.r_max:.4g} (its outputs may shrink, not grow): without that, {problem}"
    group.reason = why
    for name in group.sites:
        plan.site(name).reason = why
    return reached


def square_problem(analysis: Analysis, plan: Plan, group: Group, problem: str, may_cap: bool = True) -> set[str] | None:
    """Give ``group``'s axes one stride (``Group.square``) when its per-axis moves break the
    forward but its moves on both axes alike do not (a layer after it reads one axis's size for
    both: akamaster's CIFAR ResNets pool with ``F.avg_pool2d(out, out.size()[3])``, an SE gate
    with ``F.avg_pool2d(out, out.size(2))``), capped at its reference scale factor too where only
    its larger outputs still break (``may_cap``); the watched pins its moves reach, or None (not
    square) when that does not help or the group is not square at the reference (unequal strides
    or a non-square input)."""
    sizes = [plan.site(name).input_size for name in group.sites]
    if group.stride_init[0] != group.stride_init[1] or not all(s and s[0] == s[1] for s in sizes):
        return None
    group.square = True
    probe = group_probe(analysis, plan)
    trouble, reached = probe.problem(group.id)
    if trouble.startswith("larger output") and may_cap:
        group.r_max = max(1.0 / float(s) for s in group.stride_init)
        probe = group_probe(analysis, plan)
        trouble, reached = probe.problem(group.id)
        trouble = trouble or probe.shrink_problem(group.id)
    if trouble:
        group.square, group.r_max = False, None
        return None
    cap = "" if group.r_max is None else (f" and its scale factor is capped at its reference value {group.r_max:.4g} "
                                          "(its outputs may shrink, not grow)")
    why = f"both axes share one stride (its maps stay square){cap}: without that, {problem}"
    group.reason = why
    for name in group.sites:
        plan.site(name).reason = why
    return reached


def group_probe(analysis: Analysis, plan: Plan) -> GroupProbe:
    """A probe of ``plan`` rewritten (sharing the traced model's weights), watching its pins."""
    gm = rewrite(analysis.traced, analysis.candidates, plan, share_weights=True)
    watch = {name: gm.get_submodule(path) for name, path in pin_module_paths(gm).items()}
    return GroupProbe(gm, analysis.example, analysis.spec, watch)
