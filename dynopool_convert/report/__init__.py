"""``dynopool report``: the learned shapes, receptive fields and FLOPs of a converted model.

``build_report`` assembles the report as plain data (layout: docs/REPORT.md); ``render``
turns it into Markdown, JSON, YAML or HTML, ``to_rich`` into terminal tables.

>>> report = report_from_checkpoint("run/last.pt")
>>> print(render(report, "md"))
"""
from __future__ import annotations

from typing import Any

from .build import FORMAT_VERSION, build_report, report_from_checkpoint
from .figures import figures, write_figures
from .html import to_html
from .markdown import to_markdown
from .receptive_field import receptive_fields
from .serialize import to_json, to_yaml
from .table import to_rich

__all__ = [
    "FORMAT_VERSION",
    "FORMATS",
    "build_report",
    "report_from_checkpoint",
    "render",
    "to_markdown",
    "to_json",
    "to_yaml",
    "to_html",
    "to_rich",
    "figures",
    "write_figures",
    "receptive_fields",
]

#: Text formats ``render`` writes.
FORMATS = ("md", "json", "yaml", "html")


def render(report: dict[str, Any], fmt: str) -> str:
    """``report`` as text in ``fmt`` (one of ``FORMATS``); HTML embeds the figures."""
    if fmt == "md":
        return to_markdown(report)
    if fmt == "json":
        return to_json(report)
    if fmt == "yaml":
        return to_yaml(report)
    if fmt == "html":
        return to_html(report, figures(report))
    from ..errors import UserInputError

    raise UserInputError(f"unknown report format {fmt!r}; accepted: {', '.join(FORMATS)}")
