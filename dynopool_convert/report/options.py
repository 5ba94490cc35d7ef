"""Parsing of the report's user-facing options (shared by the CLI and the Python API)."""
from __future__ import annotations

import re
from pathlib import Path

from ..errors import UserInputError

__all__ = ["parse_input_size", "merge_input_size", "format_from_path"]


def parse_input_size(text: str) -> tuple[int, ...]:
    """``"224"``, ``"224x192"`` (H x W) or ``"3,224,224"`` (C, H, W) -> a tuple of 1 to 3 ints.

    >>> parse_input_size("3,64,48"), parse_input_size("64x48"), parse_input_size("64")
    ((3, 64, 48), (64, 48), (64,))
    """
    compact = re.sub(r"\s+", "", text.lower())
    parts = re.split(r"[x×,]", compact)
    if not re.fullmatch(r"\d+([x×,]\d+){0,2}", compact) or min(int(p) for p in parts) < 1:
        raise UserInputError(f"bad input size {text!r}; accepted: H (square), HxW, or C,H,W with positive integers, e.g. 224, 224x192, 3,224,224")
    return tuple(int(p) for p in parts)


def merge_input_size(given: tuple[int, ...], reference: tuple[int, int, int]) -> tuple[int, int, int]:
    """Complete a parsed size with the reference's channels (and H for a square size)."""
    if len(given) == 1:
        return (reference[0], given[0], given[0])
    if len(given) == 2:
        return (reference[0], given[0], given[1])
    return (given[0], given[1], given[2])


_SUFFIXES = {".md": "md", ".markdown": "md", ".json": "json", ".yaml": "yaml", ".yml": "yaml", ".html": "html", ".htm": "html"}


def format_from_path(path: str | Path) -> str | None:
    """Report format implied by a file name's suffix (``None`` when it implies none)."""
    return _SUFFIXES.get(Path(path).suffix.lower())
