"""Exceptions the library raises for problems the user can fix (the CLI maps them to exit 2)."""
from __future__ import annotations

import re

__all__ = ["DynopoolError", "UserInputError", "UnsupportedModelError", "one_line", "input_size_hint"]


class DynopoolError(Exception):
    """Base class of every error dynopool raises on purpose."""


class UserInputError(DynopoolError, ValueError):
    """Bad input from the user (model name, budget, path, file, option value).

    The message is one line that says what is wrong and what is accepted; the CLI prints it
    and exits with code 2, without a traceback.
    """


class UnsupportedModelError(UserInputError):
    """A valid model that one feature (e.g. the FLOPs budget's cost model) does not support yet.

    Raised with a one-line message that names the part of the model and what to do instead;
    the CLI treats it like other input the user can change (exit code 2).
    """


def one_line(value: object, limit: int | None = None) -> str:
    """``str(value)`` on one line (runs of whitespace collapsed), cut at ``limit`` characters
    with ``...`` when longer: for messages that quote another error."""
    text = " ".join(str(value).split())
    return text if limit is None or len(text) <= limit else f"{text[:limit]}..."


def input_size_hint(message: str, size) -> str:
    """What to try when a model fails at an input size: a timm model built for another size
    (its patch embedding asserts the size it was built for) takes ``img_size`` or
    ``dynamic_img_size``; otherwise another ``--input-size``."""
    if "doesn't match model" in message:
        h, w = size[-2], size[-1]
        img = h if h == w else f"[{h},{w}]"
        return (f"the model was built for another input size: build it for this one (--build-arg img_size={img}) "
                f"or for any (--build-arg dynamic_img_size=true), or give its own --input-size")
    channels = re.search(r"to have (\d+) channels, but got (\d+) channels", message)
    if channels:
        want, got = channels.groups()
        return (f"the model takes {want} channels: give --input-size {want},{size[-2]},{size[-1]}, or build it for "
                f"{got} (timm models: --build-arg in_chans={got})")
    if re.search(r"missing \d+ required (positional|keyword-only) argument|Expected positional argument for parameter", message):
        return ("dynopool calls a model with one image batch: give the forward's other arguments defaults, or wrap "
                "the model in a module whose forward takes the images alone")
    return "try another --input-size"
