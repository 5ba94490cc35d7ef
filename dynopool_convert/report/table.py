"""The report as Rich renderables for the terminal (the CLI prints them)."""
from __future__ import annotations

from typing import Any, Sequence

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from . import text

__all__ = ["to_rich"]

#: columns whose cells read badly when wrapped at a space ("0.39, " / "0.41"): given their width first
_KEEP_WHOLE = {"r (h, w)", "r init", "in → out", "RF (h×w)", "RF init", "FLOPs dep."}


def _table(title: str, columns: Sequence[str], compact: bool) -> Table:
    """A table whose cells wrap (fold) rather than being cut with an ellipsis; ``compact``
    draws lighter borders (two columns of padding less per column)."""
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD if compact else box.HEAVY_HEAD,
                  pad_edge=not compact, collapse_padding=compact)
    for column in columns:
        table.add_column(column, overflow="fold", no_wrap=column in _KEEP_WHOLE)
    return table


def to_rich(report: dict[str, Any], wide: bool = False) -> RenderableType:
    """Summary, sites, groups and history tables of ``report``.

    By default the tables fit a 100-column terminal: the sites table leaves out op, kind and
    the initial values (``r init``, ``RF init``), the history table its constant columns, and
    cells wrap instead of being cut. ``wide`` shows every column.
    """
    compact = not wide
    summary = Table(title=f"dynopool report: {report['model']}", show_header=False, title_justify="left")
    summary.add_column(style="bold")
    summary.add_column(overflow="fold")
    for label, value in text.summary_rows(report):
        summary.add_row(Text(label), Text(value))
    parts: list[RenderableType] = [summary]

    columns = text.COMPACT_SITE_COLUMNS if compact else text.SITE_COLUMNS
    sites = _table("Sites (r = 1/stride, RF in input pixels)", columns, compact)
    for row, site in zip(text.site_rows(report, columns), report["sites"]):
        sites.add_row(*map(Text, row), style=None if site["status"] == "converted" else "dim")
    parts.append(sites)
    for name, status, reason in text.reasons(report):
        parts.append(Text(f"{name}: {status} — {reason}", style="dim"))

    if report["groups"]:
        groups = _table("Groups", text.GROUP_COLUMNS, compact)
        for row in text.group_rows(report):
            groups.add_row(*map(Text, row))
        parts.append(groups)
    for note in report.get("notes") or []:
        parts.append(Text(f"note: {note}", style="dim"))
    columns, rows = text.history_rows(report, compact=compact, sep="\n")
    if rows:
        history = _table("History", columns, compact)
        for row in rows:
            history.add_row(*map(Text, row))
        parts.append(history)
    return Group(*parts)
