"""Which of a model's outputs fine-tuning trains on (``--output``, recipe ``train.output``).

A model whose forward returns a tuple, list, namedtuple or dict (logits and features, logits
and auxiliary logits) trains on one element of it. ``auto`` (the default) uses a tensor output
as it is, otherwise the first element, in the output's own order, that is an ``N x classes``
tensor; an integer picks by position (negative from the end), a string by dict key or
namedtuple field. The converted model is an fx GraphModule, so its output structure is fixed:
the selection is resolved once on a probe forward to a concrete key, and every forward of the
run reads that key (:func:`select_logits`).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import UserInputError

__all__ = ["AUTO", "Key", "normalize_output", "select_logits", "logits_only", "resolve_output", "pick_classes",
           "describe", "describe_key"]

AUTO = "auto"
#: where the logits are in the output: None (the output is the logits), a position, a dict key or a field name
Key = int | str | None


def normalize_output(value: str | int) -> str:
    """The recipe/flag value as the string that is saved and compared on resume ("auto", "0", "logits")."""
    text = str(value).strip()
    if not text:
        raise UserInputError("recipe key 'train.output' (--output) is empty: give auto, an index or a key")
    return text


def _is_namedtuple(out: object) -> bool:
    return isinstance(out, tuple) and hasattr(out, "_fields")


def _elements(out: object) -> list[tuple[Key, object]]:
    """(key, value) of every element of a structured output, in its own order."""
    if isinstance(out, dict):
        return list(out.items())
    if _is_namedtuple(out):
        return [(name, getattr(out, name)) for name in out._fields]
    if isinstance(out, (tuple, list)):
        return list(enumerate(out))
    return []


def select_logits(out: Any, key: Key) -> torch.Tensor:
    """The element ``key`` (from :func:`resolve_output`) of a forward's output; the output itself for None."""
    if key is None:
        return out
    if isinstance(key, str) and not isinstance(out, dict):
        return getattr(out, key)  # a namedtuple field
    return out[key]


class _Logits(nn.Module):
    """A model whose forward returns only the element ``key`` of the wrapped model's output."""

    def __init__(self, model: nn.Module, key: Key) -> None:
        super().__init__()
        self.model, self.key = model, key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return select_logits(self.model(x), self.key)


def logits_only(model: nn.Module, key: Key) -> nn.Module:
    """``model`` returning its logits alone: itself where its output is the logits (``key`` None)."""
    return model if key is None else _Logits(model, key)


def describe(out: object) -> str:
    """What a model returned, in a few words (for messages)."""
    if isinstance(out, torch.Tensor):
        return f"a tensor of shape {tuple(out.shape)}"
    if not isinstance(out, (tuple, list, dict)):
        return f"a {type(out).__name__}"
    items = _elements(out)
    named = isinstance(out, dict) or _is_namedtuple(out)
    parts = [(f"{k!r}: " if named else "") + (f"shape {tuple(v.shape)}" if isinstance(v, torch.Tensor)
                                              else type(v).__name__) for k, v in items[:4]]
    return f"{_kind(out)} of {len(items)} ({', '.join(parts)}{', ...' if len(items) > 4 else ''})"


def _kind(out: object) -> str:
    if _is_namedtuple(out):
        return f"a namedtuple {type(out).__name__}"
    return "a dict" if isinstance(out, dict) else "a list" if isinstance(out, list) else "a tuple"


def describe_key(key: Key) -> str:
    """``[0]`` / ``['logits']`` (how --output's choice is shown)."""
    return f"[{key!r}]"


def _is_logits(value: object, num_classes: int | None) -> bool:
    return (isinstance(value, torch.Tensor) and value.dim() == 2
            and (num_classes is None or int(value.shape[1]) == num_classes))


def _explicit(out: object, sel: str) -> tuple[Key, object] | None:
    """The element ``sel`` names (a key or field first, else a position), None where there is none."""
    items = _elements(out)
    for key, value in items:
        if (isinstance(out, dict) or not isinstance(key, int)) and str(key) == sel:
            return key, value
    try:
        index = int(sel)
    except ValueError:
        return None
    return items[index] if -len(items) <= index < len(items) else None


def pick_classes(out: object, sel: str, prefer: tuple[int, ...] = ()) -> int | None:
    """The class count of the element ``sel`` would train on, before the class count is settled
    (``auto``: the first 2-D element with ``prefer[0]`` columns, else ``prefer[1]``..., else the
    first 2-D one); None where there is none (:func:`resolve_output` then says why)."""
    if isinstance(out, torch.Tensor):
        return int(out.shape[1]) if out.dim() == 2 and sel == AUTO else None
    if sel != AUTO:
        found = _explicit(out, sel)
        return int(found[1].shape[1]) if found is not None and _is_logits(found[1], None) else None
    widths = [int(v.shape[1]) for _, v in _elements(out) if _is_logits(v, None)]
    return next((w for w in prefer if w in widths), widths[0] if widths else None)


def resolve_output(out: object, sel: str, num_classes: int) -> tuple[Key, str | None]:
    """The key of the ``N x num_classes`` logits in ``out`` (a probe forward's output) chosen by
    ``sel``, and the line that says which one (None for a plain tensor); UserInputError if none."""
    if isinstance(out, torch.Tensor):
        if sel != AUTO:
            raise UserInputError(f"--output {sel} picks an element of a tuple, list or dict output, but the model "
                                 f"returns {describe(out)}: drop --output")
        return None, None
    if sel == AUTO:
        found = next(((k, v) for k, v in _elements(out) if _is_logits(v, num_classes)), None)
        if found is None:
            raise UserInputError(
                f"dynopool finetune trains image classifiers (outputs N x classes); this model returns {describe(out)}, "
                f"none of it an N x {num_classes} tensor: pass --output INDEX|KEY to pick the logits, or train "
                f"it in your own loop with dynopool_convert's CostModel, budget_penalty and project_to_budget "
                f"(README, 'Compute budget')")
        how = "--output selects another"
    else:
        found = _explicit(out, sel)
        if found is None:
            raise UserInputError(f"--output {sel}: the model returns {describe(out)}, which has no element {sel!r}")
        if not _is_logits(found[1], num_classes):
            raise UserInputError(f"--output {sel}: {describe_key(found[0])} is {describe(found[1])}, not N x "
                                 f"{num_classes} (the data's classes); the model returns {describe(out)}")
        how = "chosen by --output"
    key, value = found
    return key, (f"the model returns {_kind(out)} of {len(_elements(out))}; training on output "
                 f"{describe_key(key)}, shape {tuple(value.shape)}; {how}")
