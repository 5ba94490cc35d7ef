"""Shared wording of the human-readable formats (Markdown, Rich table, HTML): one place."""
from __future__ import annotations

import re
from typing import Any, Sequence

from ..flops import format_flops
from ..group_ids import format_by_group

__all__ = ["si", "pair", "size", "rf", "site_label", "summary_rows", "reasons", "site_rows", "group_rows", "history_rows",
           "SITE_COLUMNS", "COMPACT_SITE_COLUMNS", "GROUP_COLUMNS"]


def si(value: float | int | None, unit: str = "") -> str:
    """``1234567 -> '1.23M'`` (``-`` for None), as every FLOPs count the CLI prints (``format_flops``)."""
    return "-" if value is None else format_flops(value) + unit


def pair(values: Sequence[float] | None, digits: int = 4) -> str:
    """``[0.5, 0.41666] -> '0.5, 0.4167'``."""
    if values is None:
        return "-"
    return ", ".join(f"{v:.{digits}g}" for v in values)


def size(values: Sequence[int] | None) -> str:
    """``[56, 56] -> '56×56'``."""
    return "-" if values is None else "×".join(str(int(v)) for v in values)


def rf(values: Sequence[float] | None) -> str:
    return "-" if values is None else "×".join(f"{v:.4g}" for v in values)


def site_label(site: dict[str, Any]) -> str:
    """The site's name; a bare index (a layer of an ``nn.Sequential``: ``6``, ``features.4``)
    gets its op's class, so that it reads as a layer: ``6 (MaxPool2d)``."""
    name = str(site["name"])
    if not re.fullmatch(r"(.*\.)?\d+", name) or not site.get("op"):
        return name
    op = re.match(r"[\w.]+", str(site["op"]))
    return f"{name} ({op.group(0).split('.')[-1]})" if op else name


def _metric(name: str, m: dict[str, Any]) -> str:
    return f"{name} {m['last']:.4g} (best {m['best']:.4g})"


def _head_note(report: dict[str, Any]) -> str:
    """Where fine-tuning replaced the classifier: the original's count with the one it had."""
    head = (report.get("extra") or {}).get("head")
    if not head or report["input_size"] != report.get("reference_input_size", report["input_size"]):
        return ""
    (before, after), (flops_before, _) = head["classes"], head["original_flops"]
    had = f"with {before} classes" if before else "without a classifier"
    return f" (with the {after}-class classifier; {si(flops_before)} {had})"


def summary_rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, value) rows of the report's header."""
    flops = report["flops"]
    budget = report.get("budget")
    status = ""
    if flops.get("within_budget") is not None:
        status = " (within budget)" if flops["within_budget"] else " (OVER budget)"
    rows = [
        ("model", str(report["model"])),
        ("source", str(report.get("source") or "-")),
        ("input size", size(report["input_size"])),
        ("parameters", f"{si(report['params'])} ({report['scale_parameters']} scale-factor groups)"),
        ("budget", si(budget) if budget is not None else "none"),
        ("FLOPs original", si(flops.get("original")) + _head_note(report)),
        ("FLOPs converted", si(flops.get("converted"))),
        ("FLOPs current", si(flops.get("current")) + status),
    ]
    if report.get("accuracy"):
        rows.append(("accuracy", "; ".join(_metric(k, m) for k, m in report["accuracy"].items())))
    if report.get("training"):
        rows.append(("training", ", ".join(f"{k} {v}" for k, v in report["training"].items())))
    return rows


SITE_COLUMNS = ["site", "op", "kind", "status", "group", "r (h, w)", "r init", "in → out", "RF (h×w)", "RF init", "FLOPs dep."]
#: the columns that fit a 100-column terminal (``dynopool report --wide`` shows them all)
COMPACT_SITE_COLUMNS = ["site", "status", "group", "r (h, w)", "in → out", "RF (h×w)", "FLOPs dep."]


def site_rows(report: dict[str, Any], columns: Sequence[str] = SITE_COLUMNS) -> list[list[str]]:
    """One row per site, with ``columns`` (names from ``SITE_COLUMNS``)."""
    picked = [SITE_COLUMNS.index(c) for c in columns]
    rows = []
    for s in report["sites"]:
        status = s["status"] or "-"
        row = [
            site_label(s), str(s.get("op") or "-"), str(s.get("kind") or "-"), status,
            "-" if s.get("group") is None else str(s["group"]),
            pair(s["r"]), pair(s["r_init"]),
            f"{size(s['input_size'])} → {size(s['output_size'])}",
            rf(s["receptive_field"]), rf(s["receptive_field_init"]),
            si(s["flops_dependent"]) + ("" if s.get("flops_dependent_share") is None else f" ({s['flops_dependent_share']:.0%})"),
        ]
        rows.append([row[i] for i in picked])
    return rows


def reasons(report: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(site, status, reason) of every site that was not converted."""
    return [(site_label(s), s["status"], s["reason"] or "") for s in report["sites"] if s["status"] != "converted"]


GROUP_COLUMNS = ["group", "sites", "r (h, w)", "r init", "r at most", "sizes in steps of", "one r (square)", "FLOPs dep."]


def group_rows(report: dict[str, Any]) -> list[list[str]]:
    labels = {s["name"]: site_label(s) for s in report["sites"]}
    return [[str(g["id"]), ", ".join(labels.get(n, n) for n in g["sites"]), pair(g["r"]), pair(g["r_init"]),
             "-" if g.get("r_max") is None else f"{g['r_max']:.4g}", size(g.get("multiple")),
             "yes" if g.get("square") else "-", si(g["flops_dependent"])] for g in report["groups"]]


def _cell(key: str, value: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and ("flops" in key.lower() or key == "budget"):
        return si(value)  # as everywhere else on the page: 5.04M
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def history_rows(report: dict[str, Any], limit: int = 20, compact: bool = False,
                 sep: str = "; ") -> tuple[list[str], list[list[str]]]:
    """Columns and rows of the history table (scalars, and ``r`` per group in group order,
    each labelled: an epoch's the saved, budget-projected model's (``r_saved``), as its FLOPs are;
    at most ``limit`` evenly spaced rows). ``compact`` leaves out the columns
    whose value is the same in every row (shown elsewhere: kind, budget); ``sep`` joins the
    groups of one cell (a newline in a narrow terminal)."""
    history = report.get("history") or []
    if not isinstance(history, list) or not history:
        return [], []
    columns = [k for k in history[0] if isinstance(history[0][k], (int, float, str))]
    has_r = any(isinstance(h.get("r"), dict) for h in history if isinstance(h, dict))
    step = max(1, -(-len(history) // limit))
    picked = history[::step] if history[::step][-1] is history[-1] else history[::step] + [history[-1]]
    if compact and len(picked) > 1:
        columns = [c for c in columns if len({str(h.get(c)) for h in picked}) > 1]
    rows = []
    for h in picked:
        row = [_cell(c, h[c]) if c in h and h[c] is not None else "-" for c in columns]
        if has_r:
            r = h.get("r_saved") if isinstance(h.get("r_saved"), dict) else h.get("r")
            row.append(format_by_group(r or {}, lambda v: pair(v, 3), sep=sep))
        rows.append(row)
    return columns + (["r (h, w)"] if has_r else []), rows
