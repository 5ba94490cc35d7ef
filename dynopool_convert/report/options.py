"""Parsing of the report's user-facing options (shared by the CLI and the Python API)."""
from __future__ import annotations

from pathlib import Path

from ..sizes import complete_size as merge_input_size, parse_size as parse_input_size

__all__ = ["parse_input_size", "merge_input_size", "format_from_path"]


_SUFFIXES = {".md": "md", ".markdown": "md", ".json": "json", ".yaml": "yaml", ".yml": "yaml", ".html": "html", ".htm": "html"}


def format_from_path(path: str | Path) -> str | None:
    """Report format implied by a file name's suffix (``None`` when it implies none)."""
    return _SUFFIXES.get(Path(path).suffix.lower())
