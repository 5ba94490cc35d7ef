"""Exceptions the library raises for problems the user can fix (the CLI maps them to exit 2)."""
from __future__ import annotations

__all__ = ["DynopoolError", "UserInputError"]


class DynopoolError(Exception):
    """Base class of every error dynopool raises on purpose."""


class UserInputError(DynopoolError, ValueError):
    """Bad input from the user (model name, budget, path, file, option value).

    The message is one line that says what is wrong and what is accepted; the CLI prints it
    and exits with code 2, without a traceback.
    """
