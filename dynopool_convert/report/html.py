"""The report as one self-contained HTML file: inline CSS, PNG figures base64-embedded,
no script and no remote resource, so it opens offline."""
from __future__ import annotations

import base64
from html import escape
from typing import Any, Mapping, Sequence

from . import text
from .figures import CAPTIONS

__all__ = ["to_html"]

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
th { background: #f0f4f8; }
tr.dim td { color: #888; }
figure { margin: 1em 0; }
img { max-width: 100%; }
figcaption { color: #555; font-size: 0.9em; }
"""


def _table(columns: Sequence[str] | None, rows: Sequence[Sequence[str]], dim: Sequence[bool] = ()) -> str:
    head = "" if columns is None else "<tr>" + "".join(f"<th>{escape(c)}</th>" for c in columns) + "</tr>"
    body = []
    for i, row in enumerate(rows):
        cls = ' class="dim"' if i < len(dim) and dim[i] else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>")
    return f"<table>{head}{''.join(body)}</table>"


def to_html(report: dict[str, Any], figures: Mapping[str, bytes] | None = None) -> str:
    """HTML page of ``report``; ``figures`` (name -> PNG bytes) are embedded as data URIs."""
    title = f"dynopool report: {report['model']}"
    parts = [f"<h1>{escape(title)}</h1>", _table(None, [list(r) for r in text.summary_rows(report)])]
    parts.append("<h2>Sites</h2><p>r = 1/stride per axis (h, w); sizes and receptive fields (RF, input pixels) at the input size above.</p>")
    parts.append(_table(text.SITE_COLUMNS, text.site_rows(report), [s["status"] != "converted" for s in report["sites"]]))
    not_converted = text.reasons(report)
    if not_converted:
        parts.append("<ul>" + "".join(f"<li><code>{escape(n)}</code> {escape(st)}: {escape(r)}</li>" for n, st, r in not_converted) + "</ul>")
    if report["groups"]:
        parts.append("<h2>Groups</h2>" + _table(text.GROUP_COLUMNS, text.group_rows(report)))
    if report.get("notes"):
        parts.append("<h3>Notes</h3><ul>" + "".join(f"<li>{escape(n)}</li>" for n in report["notes"]) + "</ul>")
    columns, rows = text.history_rows(report)
    if rows:
        parts.append("<h2>History</h2>" + _table(columns, rows))
    if figures:
        parts.append("<h2>Figures</h2>")
    for name, png in (figures or {}).items():
        data = base64.b64encode(png).decode("ascii")
        caption = escape(CAPTIONS.get(name, name))
        parts.append(f'<figure><img alt="{caption}" src="data:image/png;base64,{data}"><figcaption>{caption}</figcaption></figure>')
    body = "\n".join(parts)
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
        f"<style>{_CSS}</style></head>\n<body>\n{body}\n</body></html>\n"
    )
