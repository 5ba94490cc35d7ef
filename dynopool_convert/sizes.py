"""The one parser of user-given input sizes (``--input-size`` of every command, recipes)."""
from __future__ import annotations

import re

from .errors import UserInputError

__all__ = ["parse_size", "complete_size"]

_FORMS = re.compile(r"\d+|\d+[x×]\d+|\d+,\d+,\d+")


def parse_size(text: str) -> tuple[int, ...]:
    """``"224"`` (square), ``"224x192"`` (H x W) or ``"1,224,224"`` (C, H, W) -> 1 to 3 ints.

    >>> parse_size("3,64,48"), parse_size("64x48"), parse_size("64")
    ((3, 64, 48), (64, 48), (64,))
    """
    compact = re.sub(r"\s+", "", str(text).lower())
    if not _FORMS.fullmatch(compact) or min(int(p) for p in re.split(r"[x×,]", compact)) < 1:
        raise UserInputError(f"bad input size {text!r}; accepted: H (square), HxW, or C,H,W with positive integers, "
                             "e.g. 224, 224x192, 3,224,224")
    return tuple(int(p) for p in re.split(r"[x×,]", compact))


def complete_size(given: tuple[int, ...], reference: tuple[int, int, int]) -> tuple[int, int, int]:
    """A parsed size as ``(C, H, W)``: the reference's channels unless given (and H for a square size)."""
    if len(given) == 1:
        return (reference[0], given[0], given[0])
    if len(given) == 2:
        return (reference[0], given[0], given[1])
    return (given[0], given[1], given[2])
