"""The report as Rich renderables for the terminal (the CLI prints them)."""
from __future__ import annotations

from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from . import text

__all__ = ["to_rich"]


def to_rich(report: dict[str, Any]) -> RenderableType:
    """Summary, sites, groups and history tables of ``report``."""
    summary = Table(title=f"dynopool report: {report['model']}", show_header=False, title_justify="left")
    summary.add_column(style="bold")
    summary.add_column()
    for label, value in text.summary_rows(report):
        summary.add_row(Text(label), Text(value))
    parts: list[RenderableType] = [summary]

    sites = Table(title="Sites (r = 1/stride, RF in input pixels)", title_justify="left")
    for column in text.SITE_COLUMNS:
        sites.add_column(column, no_wrap=column in ("r (h, w)", "in → out"))
    for row, site in zip(text.site_rows(report), report["sites"]):
        sites.add_row(*map(Text, row), style=None if site["status"] == "converted" else "dim")
    parts.append(sites)
    for name, status, reason in text.reasons(report):
        parts.append(Text(f"{name}: {status} — {reason}", style="dim"))

    if report["groups"]:
        groups = Table(title="Groups", title_justify="left")
        for column in text.GROUP_COLUMNS:
            groups.add_column(column)
        for row in text.group_rows(report):
            groups.add_row(*map(Text, row))
        parts.append(groups)
    for note in report.get("notes") or []:
        parts.append(Text(f"note: {note}", style="dim"))
    columns, rows = text.history_rows(report)
    if rows:
        history = Table(title="History", title_justify="left")
        for column in columns:
            history.add_column(column)
        for row in rows:
            history.add_row(*map(Text, row))
        parts.append(history)
    return Group(*parts)
