"""The report as Markdown (for terminals without a TTY, READMEs and pull requests)."""
from __future__ import annotations

from typing import Any, Sequence

from . import text

__all__ = ["to_markdown"]

#: nodes named in the line on approximate receptive fields (a Swin has hundreds)
_NAMED = 8


def _escape(cell: str) -> str:
    return cell.replace("|", "\\|").replace("\n", " ")


def _table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(_escape(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_escape(c) for c in row) + " |" for row in rows]
    return lines


def to_markdown(report: dict[str, Any]) -> str:
    """Markdown text of ``report`` (as built by ``build_report``)."""
    lines = [f"# dynopool report: {report['model']}", ""]
    lines += _table(["", ""], text.summary_rows(report)) + [""]
    lines += ["## Sites", "", "r = 1/stride per axis (h, w); sizes and receptive fields (RF, input pixels) at the input size above.", ""]
    lines += _table(text.SITE_COLUMNS, text.site_rows(report)) + [""]
    not_converted = text.reasons(report)
    if not_converted:
        lines += ["Not converted:", ""] + [f"- `{n}` {st}: {r}" for n, st, r in not_converted] + [""]
    if report["groups"]:
        lines += ["## Groups", ""] + _table(text.GROUP_COLUMNS, text.group_rows(report)) + [""]
    if report.get("notes"):
        lines += ["Notes:", ""] + [f"- {n}" for n in report["notes"]] + [""]
    columns, rows = text.history_rows(report)
    if rows:
        lines += ["## History", ""] + _table(columns, rows) + [""]
    approximate = report.get("approximate_receptive_fields") or []
    if approximate:
        more = f" and {len(approximate) - _NAMED} more (all in the JSON report)" if len(approximate) > _NAMED else ""
        lines += [f"Receptive fields through unknown resizing ops are approximate: {', '.join(approximate[:_NAMED])}{more}", ""]
    return "\n".join(lines)
