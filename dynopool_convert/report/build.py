"""Assemble the report as plain data (dicts, lists, numbers, strings) from a converted model.

``build_report`` takes the pieces (model, plan dict, source, ...) so it can be used on any
converted model; ``report_from_checkpoint`` loads them from a checkpoint file. The layout is
documented in ``docs/REPORT.md`` (``FORMAT_VERSION``).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import fx, nn

from ..checkpoint_extra import original_flops as extra_original_flops
from ..dynopool import DynOPool, dynopool_modules
from ..errors import UserInputError
from ..group_ids import by_group, group_ids, stride_groups
from .flops import count_flops, flops_by_module
from .graph import ReportGraph, strides_set_to
from .options import merge_input_size
from .receptive_field import Field, receptive_fields

__all__ = ["FORMAT_VERSION", "build_report", "report_from_checkpoint"]

#: Version of the report's data layout (docs/REPORT.md); bump on any incompatible change.
FORMAT_VERSION = 1

_CONV_TARGETS = (torch.conv2d, torch.nn.functional.conv2d)
#: entries of ``training`` that are state, not summary (the finetune helper's layout included)
_STATE_KEYS = {"optimizer", "scheduler", "rng", "rng_state", "scaler", "history", "summary", "progress", "raw_strides", "config", "epoch_sums"}


def _pair(value) -> list[float]:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().tolist()
    if isinstance(value, (list, tuple)):
        return [float(value[0]), float(value[-1])]
    return [float(value), float(value)]


def _plain(value: Any) -> Any:
    """``value`` as JSON/YAML-able plain data (tensors to numbers/lists, tuples to lists)."""
    if isinstance(value, torch.Tensor):
        return _plain(value.item() if value.numel() == 1 else value.detach().cpu().tolist())
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "item"):  # numpy scalars
        return _plain(value.item())
    return str(value)


def _normalise(name: str) -> str:
    return name.replace(".", "_")


def _match_pool(site: Mapping[str, Any], pools: list[str]) -> str | None:
    """The DynOPool module qualname that implements ``site`` (plan site names vs module names)."""
    wanted = [site.get("module"), site.get("name")]
    for w in wanted:
        if w in pools:
            return w
    name = _normalise(str(site.get("name", "")))
    exact = [p for p in pools if _normalise(p) == name]
    if exact:
        return exact[0]
    prefixed = sorted((p for p in pools if _normalise(p).startswith(name + "_")), key=len)
    return prefixed[0] if prefixed else None


def _site_output_node(graph: ReportGraph, pool_node: fx.Node, placement: str) -> fx.Node:
    """The node whose output is the site's feature map (the conv after DynOPool for ``before``)."""
    users = list(pool_node.users)
    if placement == "exact" and len(users) == 1:
        return users[0]  # the op kept behind its DynResize
    if placement in ("before", "patchify") and len(users) == 1:
        user = users[0]
        if isinstance(graph.module_of(user), nn.Conv2d) or (user.op == "call_function" and user.target in _CONV_TARGETS):
            return user
    return pool_node


def _find_node(graph: ReportGraph, name: str) -> fx.Node | None:
    for n in graph.nodes:
        if n.target == name or n.name == name or n.name == _normalise(name):
            return n
    return None


def _rf(f: Field | None) -> list[float] | None:
    return None if f is None else [float(f.size[0]), float(f.size[1])]


def _hw(shape) -> list[int] | None:
    hw = ReportGraph.spatial(shape)
    return None if hw is None else [hw[0], hw[1]]


def _plan_groups(plan: Mapping[str, Any]) -> dict[int, tuple[list[str], str | None]]:
    """Group id -> (site names, status) from the plan's ``groups`` (a list of dicts or a mapping)."""
    groups = plan.get("groups") or []
    if isinstance(groups, Mapping):
        items = [(k, v) for k, v in groups.items()]
    else:
        items = [(g.get("id", i), g) for i, g in enumerate(groups)]
    out: dict[int, tuple[list[str], str | None]] = {}
    for gid, g in items:
        sites = g.get("sites", []) if isinstance(g, Mapping) else list(g)
        status = g.get("status") if isinstance(g, Mapping) else None
        out[int(gid)] = ([s if isinstance(s, str) else s.get("name") for s in sites], status)
    return out


def _dependent_nodes(graph: ReportGraph, base: Mapping[str, Any]) -> dict[int, set[str]]:
    """Per group (by its stride parameter's id): the nodes whose input or output size moves with that stride."""
    changed: dict[int, set[str]] = {}
    for group in stride_groups(graph.gm):
        name, s = group.path, group.first.stride_value
        lo, hi = group.bounds
        found: set[str] = set()
        node = graph.pool_nodes[name].name
        for factor in (1 / 1.5, 1.5):  # a step that enlarges the output; the other way at a bound
            trial = (min(max(s[0] * factor, lo), hi), min(max(s[1] * factor, lo), hi))
            shapes = graph.propagate({name: trial})
            found = {n for n, shape in shapes.items() if shape != base[n]}
            if node in found:
                break
        # an op depends on the stride when its output or any of its inputs changes size
        changed[id(group.param)] = found | {n.name for n in graph.nodes if any(i.name in found for i in n.all_input_nodes)}
    return changed


def _node_flops(graph: ReportGraph, by_module: Mapping[str, int], names: set[str]) -> int:
    return sum(by_module.get(n.target, 0) for n in graph.nodes if n.name in names and n.op == "call_module")


def _scalars(data: Any) -> dict[str, Any]:
    if not isinstance(data, Mapping):
        return {}
    out = {}
    for k, v in data.items():
        if k in _STATE_KEYS:
            continue
        v = _plain(v) if isinstance(v, torch.Tensor) and v.numel() == 1 else v
        if v is None or isinstance(v, (bool, int, float, str)):
            out[str(k)] = v
    return out


def _training_summary(training: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Scalar entries of ``training`` and of its ``progress`` dict, plus its ``summary`` dict."""
    if not training:
        return None
    summary = _scalars(training)
    summary.update(_scalars(training.get("progress")))
    summary.update(_plain(training.get("summary") or {}))
    return summary or None


def _history(training: Mapping[str, Any] | None, group_order: list[int | None]) -> list[dict[str, Any]] | None:
    """``training["history"]`` (or ``training["progress"]["history"]``) as plain data.

    Scale factors stored as lists in ``scale_parameters`` order (``r``, ``r_saved``) are keyed
    by group id instead (``{"3": [r_h, r_w]}``, in group order), so that scripts need not know that order.
    """
    if not training:
        return None
    raw = training.get("history")
    if raw is None and isinstance(training.get("progress"), Mapping):
        raw = training["progress"].get("history")
    if raw is None:
        return None
    rows = _plain(raw)
    if not isinstance(rows, list):
        return None
    for row in rows:
        if not isinstance(row, dict):
            continue
        for key in ("r", "r_saved", "strides"):
            value = row.get(key)
            if isinstance(value, list) and len(value) == len(group_order) and all(isinstance(v, list) for v in value):
                row[key] = by_group(value, group_order)
    return rows


def _accuracy(summary: Mapping[str, Any] | None, history: list[Mapping[str, Any]] | None) -> dict[str, Any] | None:
    """Accuracy-like metrics (keys with ``acc`` or ``top``): last value and best over history."""
    def is_metric(k: str) -> bool:
        return "acc" in k.lower() or "top" in k.lower()

    out: dict[str, Any] = {}
    if history:
        keys = {k for h in history for k, v in h.items() if is_metric(k) and isinstance(v, (int, float))}
        for k in sorted(keys):
            values = [h[k] for h in history if isinstance(h.get(k), (int, float))]
            out[k] = {"last": values[-1], "best": max(values)}
    for k, v in (summary or {}).items():
        if is_metric(k) and isinstance(v, (int, float)) and k not in out:
            out[k] = {"last": v, "best": v}
    return out or None


def _site_pools(gm: fx.GraphModule, pools: dict[str, DynOPool], plan_sites: list) -> tuple[dict, dict]:
    """Site name -> its DynOPool module path (None: not converted), and the initial strides by module."""
    recorded = dict(gm.meta.get("dynopool_sites", {}))  # site -> module path, kept by the rewrite
    site_pool = {
        s["name"]: recorded[s["name"]] if recorded.get(s["name"]) in pools else _match_pool(s, list(pools))
        for s in plan_sites
        if s.get("status", "converted") == "converted" or s["name"] in recorded
    }
    site_pool.update({s["name"]: None for s in plan_sites if s["name"] not in site_pool})
    init_strides = {
        site_pool[s["name"]]: tuple(_pair(s["stride_init"]))
        for s in plan_sites
        if site_pool[s["name"]] and s.get("stride_init") is not None
    }
    return site_pool, init_strides


def _site_entry(s: Mapping[str, Any], pool_name: str | None, pool: DynOPool | None) -> dict[str, Any]:
    """A site's report entry from its plan entry (sizes and fields filled in by the caller)."""
    stride_init = s.get("stride_init")
    return {
        "name": s["name"],
        "module": pool_name,
        "op": s.get("op"),
        "kind": s.get("kind"),
        "status": s.get("status"),
        "reason": s.get("reason") or None,
        "group": s.get("group"),
        "placement": s.get("placement"),
        "aggregate": pool.aggregate if pool is not None else None,
        "r": None,
        "r_init": None if stride_init is None else [1.0 / v for v in _pair(stride_init)],
        "stride": None,
        "input_size": _plain(s.get("input_size")),
        "output_size": _plain(s.get("output_size")),
        "output_size_init": _plain(s.get("output_size")),
        "receptive_field": None,
        "receptive_field_init": None,
        "flops_dependent": None,
        "flops_dependent_share": None,
    }


def _site_entries(graph: ReportGraph, pools, plan_sites, site_pool, dependent, now, init, by_module):
    """Every site's entry (``now``/``init``: node shapes and receptive fields at the present and
    initial strides), the graph nodes each group's FLOPs depend on, and the groups' size multiples."""
    (shapes_now, rf_now), (shapes_init, rf_init) = now, init
    flops_current = by_module.get("", 0)
    sites: list[dict[str, Any]] = []
    group_nodes: dict[int, set[str]] = {}
    group_multiple: dict[int, list[int]] = {}  # groups whose sizes are rounded to a multiple
    for s in plan_sites:
        pool_name = site_pool[s["name"]]
        pool = pools.get(pool_name) if pool_name else None
        entry = _site_entry(s, pool_name, pool)
        if pool is not None:
            node = graph.pool_nodes[pool_name]
            src = node.args[0]
            placement = str(s.get("placement"))
            out_node = _site_output_node(graph, node, placement) if s.get("kind") == "conv" or placement == "exact" else node
            r_h, r_w = pool.r
            affected = dependent[id(pool.stride)] & graph.descendants(node)
            entry.update(
                r=[r_h, r_w],
                stride=list(pool.stride_value),
                input_size=_hw(shapes_now[src.name]),
                output_size=_hw(shapes_now[out_node.name]),
                output_size_init=_hw(shapes_init[out_node.name]),
                receptive_field=_rf(rf_now.fields.get(out_node.name)),
                receptive_field_init=_rf(rf_init.fields.get(out_node.name)),
                flops_dependent=_node_flops(graph, by_module, affected),
            )
            entry["flops_dependent_share"] = entry["flops_dependent"] / flops_current if flops_current else None
            if s.get("group") is not None:
                group_nodes.setdefault(int(s["group"]), set()).update(affected)
                if tuple(pool.multiple) != (1, 1):
                    group_multiple[int(s["group"])] = list(pool.multiple)
        else:
            node = _find_node(graph, s["name"])  # a reverted/skipped site keeps its original op
            if node is not None:
                inputs = [n for n in node.all_input_nodes if n.op != "get_attr"]
                if inputs:
                    entry["input_size"] = _hw(shapes_now[inputs[0].name])
                entry.update(
                    output_size=_hw(shapes_now[node.name]),
                    output_size_init=_hw(shapes_init[node.name]),
                    receptive_field=_rf(rf_now.fields.get(node.name)),
                    receptive_field_init=_rf(rf_init.fields.get(node.name)),
                )
        sites.append(entry)

    return sites, group_nodes, group_multiple


def _group_entries(graph: ReportGraph, plan_dict, sites, group_nodes, group_multiple, by_module) -> list[dict[str, Any]]:
    """One entry per group: its sites, status, present and initial r, FLOPs that depend on it."""
    groups = []
    declared = _plan_groups(plan_dict)
    plan_groups = {int(g.get("id", i)): g for i, g in enumerate(plan_dict.get("groups") or []) if isinstance(g, Mapping)}
    for gid in sorted(set(declared) | {int(s["group"]) for s in sites if s["group"] is not None}):
        members, status = declared.get(gid) or ([s["name"] for s in sites if s["group"] == gid], None)
        live = [s for s in sites if s["name"] in members and s["r"] is not None]
        groups.append(
            {
                "id": gid,
                "status": status or ("converted" if live else "reverted"),
                "sites": members,
                "r": live[0]["r"] if live else None,
                "r_init": next((s["r_init"] for s in sites if s["name"] in members and s["r_init"]), None),
                "multiple": group_multiple.get(gid),
                "r_max": plan_groups.get(gid, {}).get("r_max"),
                "square": bool(plan_groups.get(gid, {}).get("square", False)),
                "flops_dependent": _node_flops(graph, by_module, group_nodes[gid]) if gid in group_nodes else None,
            }
        )

    return groups


def build_report(
    model: nn.Module,
    plan_dict: Mapping[str, Any],
    *,
    source: str | None,
    input_size: tuple[int, int, int] | list[int],
    budget: int | None = None,
    training: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    original_flops: int | None = None,
    reference_input_size: tuple[int, int, int] | list[int] | None = None,
) -> dict[str, Any]:
    """The report of a converted ``model`` and its conversion plan, as plain data.

    ``input_size`` (C, H, W) is the reference size at which sizes, receptive fields and FLOPs
    are given. ``original_flops`` (the unconverted model's count) falls back to
    ``extra["flops"]["original"]`` (or the older ``extra["flops_original"]``); None when unknown.
    ``reference_input_size`` is the size the budget is defined at (default ``input_size``):
    ``within_budget`` is only given at that size.

    >>> report = build_report(gm, plan.to_dict(), source="timm:resnet18", input_size=(3, 64, 64))
    >>> report["sites"][0]["r"], report["flops"]["current"]
    """
    input_size = tuple(int(v) for v in input_size)
    reference = input_size if reference_input_size is None else tuple(int(v) for v in reference_input_size)
    if len(input_size) != 3 or min(input_size) < 1:
        raise UserInputError(f"input size must be C,H,W with positive values, got {list(input_size)}")
    graph = ReportGraph(model, input_size)
    gm = graph.gm
    pools = dict(dynopool_modules(gm))
    plan_sites = list(plan_dict.get("sites", []))

    site_pool, init_strides = _site_pools(gm, pools, plan_sites)
    shapes_now = graph.shapes
    rf_now = receptive_fields(graph, shapes_now)
    by_module = flops_by_module(gm, input_size)
    flops_current = by_module.get("", 0)
    moved = any(tuple(pools[name].stride_value) != tuple(s) for name, s in init_strides.items())
    if moved:
        shapes_init = graph.propagate(init_strides)
        rf_init = receptive_fields(graph, shapes_init)
        with strides_set_to(gm, init_strides):
            flops_converted = count_flops(gm, input_size)
    else:  # every stride is still at its initial value
        shapes_init, rf_init, flops_converted = shapes_now, rf_now, flops_current
    dependent = _dependent_nodes(graph, shapes_now)

    now, init = (shapes_now, rf_now), (shapes_init, rf_init)
    sites, group_nodes, group_multiple = _site_entries(graph, pools, plan_sites, site_pool, dependent, now, init, by_module)
    groups = _group_entries(graph, plan_dict, sites, group_nodes, group_multiple, by_module)
    extra = extra or {}
    if original_flops is None:
        original_flops = extra_original_flops(extra)
    history = _history(training, group_ids(gm))
    summary = _training_summary(training)
    params = sum(p.numel() for p in gm.parameters())
    return {
        "format_version": FORMAT_VERSION,
        "model": (source.rsplit(":", 1)[-1] if source else type(model).__name__),
        "source": source,
        "input_size": list(input_size),
        "reference_input_size": list(reference),
        "params": int(params),
        "scale_parameters": len(stride_groups(gm)),
        "budget": _budget_flops(budget),
        "flops": _flops_summary(original_flops, flops_converted, flops_current, budget if reference == input_size else None),
        "policy": _plain(plan_dict.get("policy")),
        "notes": [str(n) for n in plan_dict.get("notes") or []],
        "accuracy": _accuracy(summary, history),
        "training": summary,
        "sites": sites,
        "groups": groups,
        "history": history,
        "stages": _stages(graph, sites, shapes_now, shapes_init),
        "approximate_receptive_fields": sorted(set(rf_now.approximate)),
        "extra": _plain({k: v for k, v in extra.items() if k not in ("flops_original",)}) or None,
    }


def _flops_summary(original: int | None, converted: int, current: int, budget: Any) -> dict[str, Any]:
    """The report's FLOPs (``budget``: None where it does not apply, e.g. at another input size)."""
    limit = _budget_flops(budget)
    return {
        "original": None if original is None else int(original),
        "converted": int(converted),
        "current": int(current),
        "within_budget": None if limit is None else bool(current <= limit),
    }


def _budget_flops(budget: Any) -> int | None:
    """The budget as FLOPs: a number, or a budget string (``"4G"``) read by the budget module."""
    if budget is None:
        return None
    if isinstance(budget, (int, float)) and not isinstance(budget, bool):
        return int(budget)
    from ..budget import parse_budget

    return int(parse_budget(str(budget)))


def _stages(graph: ReportGraph, sites: list[dict[str, Any]], now, init) -> list[dict[str, Any]]:
    """Feature-map size per stage: the input, then one entry per group (or ungrouped site)."""
    c, h, w = graph.input_size
    stages = [{"name": "input", "group": None, "size": [h, w], "size_init": [h, w]}]
    seen: set = set()
    for s in sites:
        if s["r"] is None:
            continue
        key = ("g", s["group"]) if s["group"] is not None else ("s", s["name"])
        if key in seen:
            continue
        seen.add(key)
        stages.append({"name": s["name"], "group": s["group"], "size": s["output_size"], "size_init": s["output_size_init"]})
    return stages


def report_from_checkpoint(
    path: str | Path, input_size: tuple[int, ...] | None = None, trust_source: bool = False
) -> dict[str, Any]:
    """The report of a checkpoint written by ``dynopool_convert.checkpoint.save_checkpoint``.

    ``input_size`` overrides the checkpoint's reference size: ``(C, H, W)``, ``(H, W)`` or
    ``(S,)`` for a square (missing channels come from the checkpoint). ``trust_source`` lets a
    ``package.module:factory`` source be imported (see ``load_checkpoint``).
    """
    from ..checkpoint import load_checkpoint

    ckpt = load_checkpoint(Path(path), trust_source=trust_source)  # a missing file: the same message as every command
    plan = ckpt.plan.to_dict() if hasattr(ckpt.plan, "to_dict") else dict(ckpt.plan)
    reference = tuple(int(v) for v in ckpt.input_size)
    size = merge_input_size(tuple(input_size), reference) if input_size is not None else reference
    if size[0] != reference[0]:  # the first layer's weights fix the channel count
        raise UserInputError(f"input size {','.join(map(str, size))} has {size[0]} channels; this model takes {reference[0]}")
    extra = dict(ckpt.extra or {})
    original = extra_original_flops(extra)
    if original is None or size != reference:
        original = _original_flops(ckpt.source, ckpt.build_args, size)
    return build_report(
        ckpt.model, plan, source=ckpt.source, input_size=size, budget=ckpt.budget,
        training=ckpt.training, extra=extra, original_flops=original,
        reference_input_size=reference,
    )


def _original_flops(source: str | None, build_args, input_size) -> int | None:
    """FLOPs of the unconverted model, rebuilt from its source (None when it cannot be built)."""
    if not source:
        return None
    from ..models import build_model

    return count_flops(build_model(source, build_args), input_size)
