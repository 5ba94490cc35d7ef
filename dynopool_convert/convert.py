"""The conversion pass: trace -> sites -> groups -> rewrite -> validate (DESIGN.md §2).

>>> import timm
>>> result = convert(timm.create_model("resnet18"), input_size=(3, 64, 64))   # doctest: +SKIP
>>> result.plan.summary()                                                      # doctest: +SKIP
{'converted': 6, 'reverted': 0, 'skipped': 1, 'groups': 5}
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
from torch import Tensor, fx, nn

from ._helpers import node_hw
from .annotated_graph import AnnotatedGraph
from .dynopool import dynopool_output_size
from .errors import UserInputError, input_size_hint
from .group_limits import capped_problem, group_probe, square_problem
from .grouping import TieGraph
from .input_site import insert_input_site
from .moves import CAP_AUDIT_MOVES, JOINT_MOVES, JOINT_MOVES_CAPPED
from .patch_reshape import expose_patch_grids
from .pos_embed import follow_grids
from .rel_pos import follow_rel_biases
from .plan import Group, Plan, Site
from .rewrite import rewrite, site_module_paths
from .site_sizes import follow_site_sizes
from .sites import Candidate, find_candidates
from .sites_unfold import UnfoldHandler
from .sites_unshuffle import UnshuffleHandler
from .skip_sizes import follow_skips
from .token_grid import follow_flattens
from .tracing import trace_model
from .validate import GroupProbe, OutputSpec, ValidationReport, output_spec, quiet, validate as validate_graph

__all__ = ["convert", "apply_plan", "ConversionResult", "Analysis", "analyse", "check_input_size"]

PLACEMENTS = ("exact", "before", "after")
AGGREGATES = ("max", "mean")


@dataclass
class Analysis:
    """A traced model annotated with shapes at the reference input, and its candidate sites."""

    traced: fx.GraphModule
    candidates: list[Candidate]
    example: Tensor
    spec: OutputSpec
    notes: list[str] = field(default_factory=list)


@dataclass
class ConversionResult:
    """The converted model (an fx GraphModule with DynOPool submodules), its plan and tie graph."""

    model: fx.GraphModule
    plan: Plan
    ties: TieGraph

    def site_modules(self) -> dict[str, str]:
        """Site name -> path of its DynOPool module in ``model``."""
        return site_module_paths(self.model)


def check_input_size(input_size: Sequence[int]) -> tuple[int, int, int]:
    """``(C, H, W)`` as ints, or UserInputError."""
    try:
        size = tuple(int(v) for v in input_size)
    except (TypeError, ValueError):
        size = ()
    if len(size) != 3 or min(size) < 1:
        raise UserInputError(f"input size must be (channels, height, width) with positive integers, got {input_size!r}")
    return size  # type: ignore[return-value]


def analyse(model: nn.Module, input_size: Sequence[int], input_site: bool = False) -> Analysis:
    """Trace ``model``, propagate shapes at ``input_size`` (batch 1, eval mode), find the sites
    (with ``input_site``, a learnable input resolution in front: see ``input_site.py``)."""
    size = check_input_size(input_size)
    first = next(iter(model.parameters()), None)  # the example lives where the model does
    device, dtype = (first.device, first.dtype) if first is not None and first.is_floating_point() else ("cpu", torch.float32)
    example = torch.randn(1, *size, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    t = trace_model(model, example)
    if input_site:
        insert_input_site(t.graph_module)
    try:
        with quiet():
            graph = AnnotatedGraph(t, size, example=example)
    except Exception as err:  # the user's model failing at this size is a user-fixable problem
        msg = " ".join(str(err).split())[:200]
        raise UserInputError(
            f"the model fails on an input of size {list(size)} (before conversion): {type(err).__name__}: {msg}; {input_size_hint(msg, size)}"
        ) from err
    patch_notes = expose_patch_grids(graph.gm, graph.node_names)
    if patch_notes:  # new nodes: their shapes, once more
        with quiet():
            graph = AnnotatedGraph(t, size, example=example)
    traced = graph.gm
    candidates = find_candidates(traced, graph.node_names)
    # before any rewrite, so that apply_plan replays them identically
    notes = (list(graph.notes) + patch_notes + follow_skips(traced, candidates) + follow_flattens(traced, candidates)
             + follow_grids(traced, candidates) + follow_rel_biases(traced, candidates) + follow_site_sizes(traced, candidates))
    return Analysis(traced, candidates, example, output_spec(graph.output), notes)


def _matches(cand: Candidate, patterns: Iterable[str]) -> bool:
    for pat in patterns:
        if pat.startswith("kind:"):
            if fnmatch.fnmatchcase(cand.kind, pat[5:]):
                return True
        elif fnmatch.fnmatchcase(cand.name, pat):
            return True
    return False


def _select(candidates: list[Candidate], include: Sequence[str] | None, exclude: Sequence[str] | None) -> None:
    for cand in candidates:
        if cand.skip_reason:
            continue
        if include and not _matches(cand, include):
            cand.skip_reason = "not matched by --include"
        elif exclude and _matches(cand, exclude):
            cand.skip_reason = "matched by --exclude"


def _as_list(hw: tuple[int, int] | None) -> list[int] | None:
    return None if hw is None else list(hw)


def _patch_of_group(members: list[Candidate], policy: dict) -> tuple[int, int] | None:
    """The common patch of a group made only of patchify convs (same kernel), under ``before``
    with the patchify rule on; under any placement for a group with a pixel unshuffle (it has
    no stride-1 form: ``sites_unshuffle.py``)."""
    patches = {c.patch for c in members}
    if len(patches) != 1 or None in patches:
        return None
    forced = any(c.handler in (UnshuffleHandler.name, UnfoldHandler.name) for c in members)
    if not forced and (policy["placement"] != "before" or not policy.get("patchify", True)):
        return None
    return next(iter(patches))


def _exact_multiple(members: list[Candidate], nodes: dict[str, fx.Node]) -> list[int] | None:
    """Placement ``exact``: a group of patchify convs (one patch) resizes to multiples of the
    patch, so that no pixel is dropped at moved strides; only where the reference input is a
    multiple already (the resize must stay the identity at init)."""
    patches = {c.patch for c in members}
    if len(patches) != 1 or None in patches:
        return None
    patch = next(iter(patches))
    for c in members:
        node = nodes[c.node]
        size = node_hw(node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None)
        if size is None or size[0] % patch[0] or size[1] % patch[1]:
            return None
    return list(patch)


def _size_preserving_stride(members: list[Candidate], nodes: dict[str, fx.Node]) -> list[float]:
    """The group's initial stride: the op's stride, unless DynOPool's rounding would then give
    another output size than the op gave (``round(7 / 2) = 4`` where a 2x2 max-pool gives 3):
    then ``H / H_out`` on that axis, so that the converted model starts at the original's sizes
    and FLOPs. Kept as the op's stride where the tied sites disagree."""
    stride = list(members[0].stride)
    for axis in (0, 1):
        wanted = set()
        for c in members:
            node = nodes[c.node]
            first = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
            hw_in, hw_out = node_hw(first), node_hw(node)
            if hw_in is None or hw_out is None:
                return list(members[0].stride)
            wanted.add((hw_in[axis], hw_out[axis]))
        sizes = {(h_in, h_out) for h_in, h_out in wanted if dynopool_output_size(h_in, stride[axis]) != h_out}
        if len(wanted) == 1 and sizes:
            h_in, h_out = sizes.pop()
            stride[axis] = h_in / h_out
    return stride


def _group_stride(groups: list[Group], group_of: dict[str, int], c: Candidate) -> list[float]:
    gid = group_of.get(c.node)
    return list(groups[gid].stride_init) if gid is not None else list(c.stride)


def _initial_plan(analysis: Analysis, ties: TieGraph, policy: dict) -> Plan:
    nodes = {n.name: n for n in analysis.traced.graph.nodes}
    group_of: dict[str, int] = {}
    patch_of: dict[str, tuple[int, int]] = {}  # node -> patch, for sites converted as patchify
    groups = []
    by_node = {c.node: c for c in analysis.candidates}
    for gid, members in enumerate(ties.groups()):
        names = [by_node[m].name for m in members]
        patch = _patch_of_group([by_node[m] for m in members], policy)
        if policy["placement"] == "exact":  # the op keeps its stride: DynResize's base
            groups.append(Group(gid, names, list(by_node[members[0]].stride),
                                multiple=_exact_multiple([by_node[m] for m in members], nodes)))
        elif patch is None:
            groups.append(Group(gid, names, _size_preserving_stride([by_node[m] for m in members], nodes)))
        else:  # DynOPool resizes the input to a multiple of the patch; the conv keeps its stride
            groups.append(Group(gid, names, [1.0, 1.0], multiple=list(patch)))
            patch_of.update({m: patch for m in members})
        group_of.update({m: gid for m in members})
    sites = []
    for c in analysis.candidates:
        node = nodes[c.node]
        first_input = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        patch = patch_of.get(c.node)
        exact = policy["placement"] == "exact" and not c.skip_reason
        aggregate = None if c.skip_reason or exact else (policy["aggregate"] or ("mean" if patch else c.aggregate))
        placement = ("patchify" if patch else policy["placement"]) if c.kind == "conv" and not c.skip_reason else None
        site = Site(
            name=c.name, op=c.op, kind=c.kind, status="skipped" if c.skip_reason else "converted",
            reason=c.skip_reason, group=group_of.get(c.node),
            placement="exact" if exact else placement,
            aggregate=aggregate,
            stride_init=None if c.stride is None else ([1.0, 1.0] if patch else _group_stride(groups, group_of, c)),
            input_size=_as_list(node_hw(first_input)), output_size=_as_list(node_hw(node)),
        )
        if exact:
            site.converted_size = site.output_size  # the op itself, on an unchanged input
        elif site.status == "converted" and site.input_size:
            multiple = patch or (1, 1)
            site.converted_size = [dynopool_output_size(n, s, m) for n, s, m in zip(site.input_size, site.stride_init, multiple)]
        sites.append(site)
    plan = Plan(sites, groups, policy, list(analysis.example.shape[1:]), notes=analysis.notes + list(ties.notes))
    for group in groups:  # an unshuffle runs at its factor only: behind a pool at stride 1
        if policy["placement"] != "exact" and group.multiple is None and any(
                by_node[m].handler == UnshuffleHandler.name for m in ties.groups()[group.id]):
            _revert(plan, group.id, "a pixel unshuffle tied to sites of another stride: it keeps its factor")
    return plan


def _revert(plan: Plan, gid: int, reason: str, status: str = "reverted") -> None:
    group = plan.groups[gid]
    group.status, group.reason = status, reason
    for name in group.sites:
        site = plan.site(name)
        site.status, site.reason = status, reason


def _pin_pass(analysis: Analysis, plan: Plan) -> None:
    """Settle the groups deepest first, each moved on its own with the groups after it settled.

    A group whose per-axis moves (``moves.axis_moves``) break the forward only where its outputs
    grow is capped at its reference scale factor (``Group.r_max``: the layers after it crop a skip
    connection to its size, or slice a table that does not grow); a capped group still learns
    smaller maps, where a multiple would let them grow again by a step. Otherwise it first tries
    output sizes rounded to a multiple (the divisors of its reference size, smallest first: window
    and block sizes), then one stride for both axes (``Group.square``: a layer after it reads one
    axis's size for both, a square-only global pool or a token grid of side ``sqrt(N)``);
    when none works it is pinned: its sites keep their ops behind an adaptive
    pool to their reference input size, so the layers after it see fixed shapes (windowed or
    relative-position attention, fixed token counts) and the groups before it can still move.
    A pin that no kept group's move reaches is reverted to the plain op instead. The caps are
    then audited with the groups before them moving too (``_audit_caps``); where one is refused,
    the groups are settled again from the start without it.
    """
    start = plan.to_dict()
    refused: set[int] = set()  # groups whose cap the audit refused: settled as if uncapped
    while True:
        _settle(analysis, plan, refused)
        audit = _audit_caps(analysis, plan)
        if not audit:
            return
        refused |= audit
        fresh = Plan.from_dict(start)
        plan.sites, plan.groups = fresh.sites, fresh.groups


def _settle(analysis: Analysis, plan: Plan, refused: set[int]) -> None:
    """One pass of ``_pin_pass``: every group moved on its own, deepest first (caps of the groups
    in ``refused`` not tried)."""
    position = {n.name: i for i, n in enumerate(analysis.traced.graph.nodes)}
    node_of = {c.name: c.node for c in analysis.candidates}
    order = sorted(plan.converted_groups(), key=lambda g: max(position[node_of[s]] for s in g.sites), reverse=True)
    failures: dict[int, str] = {}
    used: set[str] = set()
    probe = None
    for group in order:
        if probe is None:
            probe = group_probe(analysis, plan)
            if probe.reference_error:
                return
        if group.id not in probe.groups:
            continue  # unreached: the final validation reverts it
        problem, reached = probe.problem(group.id)
        if not problem:
            used |= reached
            continue
        capped = None if group.id in refused else capped_problem(analysis, plan, group, problem)
        if capped is not None:
            used |= capped
            probe = None  # the graph changed
            continue
        rounded = False
        for multiple in probe.multiples(group.id):
            trouble, reached = probe.problem_with_multiple(group.id, multiple)
            if not trouble:
                group.multiple, rounded = list(multiple), True
                used |= reached
                why = f"output sizes rounded to multiples of {multiple[0]}x{multiple[1]}: without that, {problem}"
                group.reason = why
                for name in group.sites:
                    plan.site(name).reason = why
                break
        probe = None  # the graph changes either way
        if rounded:
            continue
        squared = square_problem(analysis, plan, group, problem, may_cap=group.id not in refused)
        if squared is not None:
            used |= squared
            continue
        if not all(plan.site(name).input_size for name in group.sites):
            _revert(plan, group.id, problem)
        else:
            _revert(plan, group.id, problem, status="pinned")
            failures[group.id] = problem
    for gid, problem in failures.items():
        if not used & set(plan.groups[gid].sites):
            _revert(plan, gid, problem)


def _audit_caps(analysis: Analysis, plan: Plan) -> set[int]:
    """The capped groups that random joint moves of theirs with the uncapped groups break where
    the same moves without theirs do not. A cap is probed with the groups after it settled; the
    ones before it still move (timm's SAM2-Hiera: a shortcut pool the windowed attention's output
    is cropped to, whose windows' count it must match once the patch grid moves too)."""
    capped = [g.id for g in plan.converted_groups() if g.r_max is not None]
    if not capped:
        return set()
    gm = rewrite(analysis.traced, analysis.candidates, plan, share_weights=True)
    probe = GroupProbe(gm, analysis.example, analysis.spec, {})
    free = {g.id for g in plan.converted_groups() if g.r_max is None}
    return {gid for gid in capped if gid in probe.groups and probe.joint_problem(gid, CAP_AUDIT_MOVES, free)}


def _solo_plan(plan: Plan, gid: int) -> Plan:
    solo = Plan.from_dict(plan.to_dict())
    for g in solo.converted_groups():
        if g.id != gid:
            _revert(solo, g.id, "")
    return solo


def _validate_plan(analysis: Analysis, plan: Plan) -> None:
    """Rewrite and validate until every remaining group passes, pinning or reverting the ones
    that break (the models it builds share the traced model's weights; none is kept)."""
    pin_pass_done = False
    while True:
        gm = rewrite(analysis.traced, analysis.candidates, plan, share_weights=True)
        capped = any(g.r_max is not None for g in plan.converted_groups())
        report = validate_graph(gm, analysis.example, analysis.spec, joint=JOINT_MOVES_CAPPED if capped else JOINT_MOVES)
        if report.ok:
            _record_sizes(plan, gm, report)
            return
        if report.reference_error:
            broken = []
            for g in plan.converted_groups():  # which groups break the forward on their own?
                solo = rewrite(analysis.traced, analysis.candidates, _solo_plan(plan, g.id), share_weights=True)
                error = validate_graph(solo, analysis.example, analysis.spec, reference_only=True).reference_error
                if error:
                    broken.append((g.id, error))
            for gid, error in broken:
                _revert(plan, gid, f"breaks the forward at the reference size: {error}")
            if not broken:
                for g in plan.converted_groups():
                    _revert(plan, g.id, f"the converted groups together break the forward: {report.reference_error}")
            continue
        if not pin_pass_done and any(f.kind == "forward" for f in report.failures):
            pin_pass_done = True
            _pin_pass(analysis, plan)
            continue
        for failure in report.failures:
            _revert(plan, failure.group, failure.reason)


def _record_sizes(plan: Plan, gm: fx.GraphModule, report: ValidationReport) -> None:
    for name, path in site_module_paths(gm).items():
        if path in report.sizes and plan.site(name).placement != "exact":  # exact: the op's own output
            plan.site(name).converted_size = list(report.sizes[path][1])


def convert(
    model: nn.Module,
    input_size: Sequence[int] = (3, 224, 224),
    placement: str = "before",
    aggregate: str | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    validate: bool = True,
    patchify: bool = True,
    input_site: bool = False,
) -> ConversionResult:
    """Convert every resizing op of ``model`` into a learnable DynOPool site.

    Args:
        model: any ``nn.Module`` torch.fx can trace with timm's leaf rules (left untouched).
        input_size: reference ``(C, H, W)``; shapes in the plan are given at this size.
        placement: ``"exact"``: every site keeps its op (strided conv or pool, upsampling) behind
            a learnable resize (``DynResize``) that is the identity at the initial stride, so the
            converted model computes what the original did, at the same FLOPs (pass it for a
            trained model); ``"before"`` (DynOPool then the stride-1 conv; the default here,
            whatever the weights) or ``"after"`` for strided convs, where pools and upsamplings
            become DynOPool. ``dynopool convert`` and recipes default to ``"exact"`` when they load
            weights (``--weights``/``--pretrained``) and to ``"before"`` otherwise
            (``weights.default_placement``); this function does not know where the weights came from.
        patchify: under ``"before"``, a patchify conv (kernel == stride, no padding: ViT patch
            embeddings, ConvNeXt stems and downsamplers) keeps its stride behind a DynOPool that
            resizes its input to a multiple of the patch (placement ``"patchify"`` in the plan)
            instead of running its kernel at stride 1 on the pooled map.
        aggregate: ``"max"`` or ``"mean"`` for every site; default per op (max for convs and
            max pools, mean for average pools and interpolations).
        include / exclude: glob patterns on site names (``"layer*.0.*"``), or ``"kind:conv"``,
            ``"kind:pool"``, ``"kind:interpolate"`` on site kinds.
        validate: run the converted model at moved strides and revert groups that break.
        input_site: put a learnable input resolution in front of the model (site
            ``input_resize``: DynOPool(mean) starting at stride 1; under ``exact`` a DynResize,
            the identity at init), so that shrinking the input
            is one of the allocations the budget and the size search can choose.

    Returns a ``ConversionResult`` whose ``model`` holds one DynOPool per converted site (tied
    sites share one stride parameter) and whose ``plan`` is plain data for ``apply_plan``.
    """
    if placement not in PLACEMENTS:
        raise UserInputError(f"placement must be one of {', '.join(PLACEMENTS)}, got {placement!r}")
    if aggregate is not None and aggregate not in AGGREGATES:
        raise UserInputError(f"aggregate must be one of {', '.join(AGGREGATES)}, got {aggregate!r}")
    include, exclude = list(include or []), list(exclude or [])
    analysis = analyse(model, input_size, input_site)
    _select(analysis.candidates, include, exclude)
    ties = TieGraph(analysis.traced, analysis.candidates)
    policy = {"placement": placement, "aggregate": aggregate, "include": include, "exclude": exclude, "trace_mode": "eval",
              "patchify": bool(patchify), "input_site": bool(input_site)}
    plan = _initial_plan(analysis, ties, policy)
    if validate:
        _validate_plan(analysis, plan)
        model.train(model.training)  # validation ran them in eval mode
    gm = rewrite(analysis.traced, analysis.candidates, plan)  # the result owns its weights
    gm.train(model.training)
    return ConversionResult(gm, plan, ties)


def apply_plan(model: nn.Module, plan: Plan) -> fx.GraphModule:
    """Replay ``plan`` on a freshly built ``model`` (no validation): the same converted model
    ``convert`` returned, with freshly initialised strides (load a state dict for the learned ones).

    The returned GraphModule shares (and has modified) ``model``'s submodules: pass a model
    built for the purpose, as ``load_checkpoint`` does.
    """
    analysis = analyse(model, plan.input_size, bool(plan.policy.get("input_site", False)))
    by_name = {c.name: c for c in analysis.candidates}
    for site in plan.converted_sites():
        cand = by_name.get(site.name)
        if cand is None or cand.skip_reason or cand.kind != site.kind:
            why = "not found" if cand is None else f"now {cand.kind}: {cand.skip_reason or 'differs'}"
            raise UserInputError(f"the plan does not match this model: site {site.name!r} ({site.op}) is {why}")
    gm = rewrite(analysis.traced, analysis.candidates, plan, copy_graph=False)  # model is fresh
    gm.train(model.training)
    return gm

