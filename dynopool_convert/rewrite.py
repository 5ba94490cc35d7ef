"""Rewrite a traced graph: put a DynOPool module at every converted site (DESIGN.md §2).

A pure function of (traced graph, plan): ``rewrite`` deep-copies the traced GraphModule (or, for
validation's short-lived models, copies only its graph and shares its weights) and never touches
the user's model, so validation can rebuild after reverting a group and ``apply_plan`` replays
the same rewrite on a freshly built model. Tied sites share one ``nn.Parameter``. A pinned
site keeps its op; an ``nn.AdaptiveAvgPool2d`` to its reference input size is put in front of it
(an exact identity at the reference size).
"""
from __future__ import annotations

import copy

import torch
from torch import fx, nn

from .dynopool import R_MAX, R_MIN, DynOPool
from .dynresize import DynResize
from .plan import Plan
from .sites import Candidate, handler_for

__all__ = ["rewrite", "r_bounds_for", "pool_path_for", "site_module_paths", "pin_module_paths"]


def r_bounds_for(stride: tuple[float, float] | list[float], r_max: float | None = None) -> tuple[float, float]:
    """Bounds on r for a site starting at ``stride``: the defaults, widened to keep 2x room
    around the initial value (e.g. a 4x upsampling, or a stride-32 patchify conv); ``r_max``
    (a group capped by validation) lowers the upper bound."""
    r_init = [1.0 / float(s) for s in stride]
    lo, hi = min(R_MIN, min(r_init) / 2.0), max(R_MAX, max(r_init) * 2.0)
    return (lo, hi) if r_max is None else (lo, min(hi, float(r_max)))


def _free_path(gm: fx.GraphModule, wanted: str, node: fx.Node) -> str:
    """``wanted`` if no other node calls a module there, else a suffixed variant."""
    path, i = wanted, 0
    while True:
        try:
            gm.get_submodule(path)
        except AttributeError:
            return path
        users = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == path and n is not node]
        if path == node.target and not users:
            return path  # the pool module this node calls is replaced in place
        i += 1
        path = f"{wanted}_dynopool" if i == 1 else f"{wanted}_dynopool{i}"


def pool_path_for(gm: fx.GraphModule, node: fx.Node, site_name: str, kind: str) -> str:
    """Module path of the DynOPool inserted for a site: next to a conv, in place of a pool."""
    wanted = f"{site_name}_dynopool" if kind == "conv" else site_name
    return _free_path(gm, wanted, node)


def _weight_sharing_copy(traced: fx.GraphModule) -> fx.GraphModule | None:
    """A GraphModule over a copy of ``traced``'s graph that calls ``traced``'s own leaf modules
    (no weights copied), or None when a module above the leaves would be shared too (then
    adding or deleting a submodule would change ``traced``)."""
    gm = fx.GraphModule(traced, copy.deepcopy(traced.graph), type(traced).__name__)
    leaves = {n.target for n in gm.graph.nodes if n.op in ("call_module", "get_attr")}
    for name, module in gm.named_modules():
        if not name or name in leaves or any(name.startswith(f"{leaf}.") for leaf in leaves):
            continue
        if module is traced.get_submodule(name):
            return None
    return gm


def _own_module(gm: fx.GraphModule, target: str) -> None:
    """Replace the leaf at ``target`` by a shallow copy (same parameters) that may be changed."""
    parent_name, _, name = target.rpartition(".")
    parent = gm.get_submodule(parent_name) if parent_name else gm
    setattr(parent, name, copy.copy(getattr(parent, name)))


def rewrite(traced: fx.GraphModule, candidates: list[Candidate], plan: Plan, copy_graph: bool = True,
            share_weights: bool = False) -> fx.GraphModule:
    """A converted copy of ``traced`` with the plan's ``converted`` sites rewritten.

    ``candidates`` are the sites found on ``traced`` (they give each site's node and handler).
    ``copy_graph=False`` rewrites ``traced`` itself (and the modules it shares with its model).
    ``share_weights=True`` copies the graph but not the weights: the result calls ``traced``'s
    modules (a changed conv gets a shallow copy), for short-lived models such as validation's.
    """
    gm, shared = traced, False
    if copy_graph:
        sharing = _weight_sharing_copy(traced) if share_weights else None
        gm, shared = (sharing, True) if sharing is not None else (copy.deepcopy(traced), False)
    nodes = {n.name: n for n in gm.graph.nodes}
    by_name = {c.name: c for c in candidates}
    first = next(iter(gm.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    params = {  # strides stay float32 (they are tiny), on the model's device
        g.id: nn.Parameter(torch.tensor([float(v) for v in g.stride_init], dtype=torch.float32, device=device))
        for g in plan.converted_groups()
    }
    bounds = {g.id: r_bounds_for(g.stride_init, g.r_max) for g in plan.converted_groups()}
    multiples = {g.id: tuple(g.multiple or (1, 1)) for g in plan.converted_groups()}
    square = {g.id: g.square for g in plan.converted_groups()}
    stride_init = {g.id: tuple(float(v) for v in g.stride_init) for g in plan.converted_groups()}
    placement = plan.policy.get("placement", "before")
    paths: dict[str, str] = {}
    for site in plan.converted_sites():
        cand = by_name[site.name]
        node = nodes[cand.node]
        handler = handler_for(cand.handler)
        old_target = node.target if node.op == "call_module" else None
        if (site.placement or placement) == "exact":
            # the input site's module keeps the site's own name (budget.py finds it there)
            wanted = site.name if cand.handler == "input_site" else f"{site.name}_dynopool"
            paths[site.name] = _insert_resize(gm, node, wanted, DynResize(
                params[site.group], base=stride_init[site.group], r_bounds=bounds[site.group], group=site.group,
                multiple=multiples[site.group], square=square[site.group]))
            continue
        path = pool_path_for(gm, node, site.name, cand.kind)
        pool = DynOPool(params[site.group], aggregate=site.aggregate, r_bounds=bounds[site.group], group=site.group,
                        multiple=multiples[site.group], square=square[site.group])
        if old_target == path:  # replace the pool module in place
            gm.delete_submodule(path)
        elif shared and cand.kind == "conv" and old_target is not None:
            _own_module(gm, old_target)  # the handler changes its stride and padding
        gm.add_submodule(path, pool)
        handler.apply(gm, node, path, site.placement or placement)
        paths[site.name] = path
    pins: dict[str, str] = {}
    for site in plan.pinned_sites():
        pins[site.name] = _pin(gm, nodes[by_name[site.name].node], site.name, site.input_size)
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    gm.meta["dynopool_sites"] = paths  # site name -> DynOPool module path (plain data)
    gm.meta["dynopool_pins"] = pins  # site name -> path of the pool that holds its input size
    gm.meta["dynopool_input_size"] = list(plan.input_size)  # the reference (C, H, W), for freeze
    return gm


def _insert_resize(gm: fx.GraphModule, node: fx.Node, wanted: str, resize: DynResize) -> str:
    """Placement ``exact``: the op stays as it is, ``resize`` goes in front of its first input
    (at module path ``wanted``, or a free variant of it)."""
    path = _free_path(gm, wanted, node)
    gm.add_submodule(path, resize)
    with gm.graph.inserting_before(node):
        resized = gm.graph.call_module(path, (node.args[0] if node.args else node.kwargs["input"],))
    if node.args:
        node.args = (resized, *node.args[1:])
    else:
        node.kwargs = {**node.kwargs, "input": resized}
    return path


def _pin(gm: fx.GraphModule, node: fx.Node, site_name: str, size: list[int] | None) -> str:
    """Resize the site's input to ``size`` (its reference input size) with an adaptive average pool."""
    if not size or not node.args or not isinstance(node.args[0], fx.Node):
        raise ValueError(f"site {site_name!r} cannot be pinned: its input size is unknown")
    path = _free_path(gm, f"{site_name}_pin", node)
    gm.add_submodule(path, nn.AdaptiveAvgPool2d((int(size[0]), int(size[1]))))
    with gm.graph.inserting_before(node):
        held = gm.graph.call_module(path, (node.args[0],))
    node.args = (held, *node.args[1:])
    return path


def site_module_paths(gm: fx.GraphModule) -> dict[str, str]:
    """Site name -> path of its DynOPool module in a converted GraphModule."""
    return dict(gm.meta.get("dynopool_sites", {}))


def pin_module_paths(gm: fx.GraphModule) -> dict[str, str]:
    """Pinned site name -> path of the adaptive pool in front of it."""
    return dict(gm.meta.get("dynopool_pins", {}))
