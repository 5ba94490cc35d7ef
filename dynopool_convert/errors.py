"""Exceptions the library raises for problems the user can fix (the CLI maps them to exit 2)."""
from __future__ import annotations

__all__ = ["DynopoolError", "UserInputError", "UnsupportedModelError"]


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
