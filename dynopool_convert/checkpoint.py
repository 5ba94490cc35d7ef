"""Checkpoints: one file with source, build arguments, plan, reference size, budget and weights.

``torch.save`` of plain data and tensors only, read back with ``torch.load(weights_only=True)``;
loading rebuilds the model from its source, replays the plan and loads the state dict strictly
(DESIGN.md §4). A ``package.module:factory`` source is only imported with ``trust_source=True``.
"""
from __future__ import annotations

import os
import pickle
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .convert import apply_plan, check_input_size
from .dynopool import dynopool_modules
from .errors import UserInputError, one_line
from .files import atomic_write, check_output_path
from .models import build_model, is_trusted_source
from .plan import Plan

__all__ = ["CHECKPOINT_FORMAT_VERSION", "Checkpoint", "save_checkpoint", "load_checkpoint", "load", "save"]

CHECKPOINT_FORMAT_VERSION: int = 1
_MAGIC = "dynopool-checkpoint"


@dataclass
class Checkpoint:
    """A loaded checkpoint: the rebuilt converted model and the plain data saved with it."""

    model: nn.Module
    plan: Plan
    source: str
    build_args: dict[str, Any]
    input_size: tuple[int, int, int]
    budget: Any
    training: dict[str, Any] | None
    extra: Any
    format_version: int


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    plan: Plan,
    source: str,
    build_args: dict[str, Any] | None = None,
    input_size: Sequence[int] = (3, 224, 224),
    budget: Any = None,
    training: dict[str, Any] | None = None,
    extra: Any = None,
) -> Path:
    """Write a checkpoint atomically (temporary file in the same folder, then ``os.replace``).

    ``training`` and ``extra`` must be plain data and tensors (what ``weights_only`` loads).
    """
    from . import __version__

    path = check_output_path(path, "checkpoint")
    payload = {
        "format": _MAGIC,
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "dynopool_version": __version__,
        "source": source,
        "build_args": dict(build_args or {}),
        "plan": plan.to_dict(),
        "input_size": list(check_input_size(input_size)),
        "budget": budget,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "training": training,
        "extra": extra,
    }
    try:
        atomic_write(path, lambda tmp: torch.save(payload, tmp))
    except OSError as err:
        raise UserInputError(f"cannot write checkpoint {str(path)!r}: {err.strerror or err}") from err
    return path


save = save_checkpoint


_UNSAFE_GLOBAL = re.compile(r"unsupported GLOBAL ([\w.]+)|Unsupported global: GLOBAL ([\w.]+)")
_UNPICKLER_DETAIL = re.compile(r"Unsupported operand \d+|Unsupported class [\w.]+")


def _torch_load(path: Path, what: str = "dynopool checkpoint") -> Any:
    """``torch.load(weights_only=True)`` with its failures turned into one-line UserInputErrors
    (``what`` the file should be, for the messages)."""
    name = str(path)
    try:
        if path.stat().st_size == 0:
            raise UserInputError(f"{name!r} is empty, not a {what}")
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": one line on stderr only
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except UserInputError:
        raise
    except OSError as err:
        raise UserInputError(f"cannot read {what.split()[-1]} {name!r}: {err.strerror or err}") from err
    except pickle.UnpicklingError as err:
        unsafe = _UNSAFE_GLOBAL.search(str(err))
        if unsafe:
            raise UserInputError(
                f"refusing to load {name!r}: it references the Python object {unsafe.group(1) or unsafe.group(2)}, and unpickling it "
                "could run code (dynopool loads files weights-only: tensors and plain data; a whole model saved with "
                "torch.save(model)? save torch.save(model.state_dict(), PATH) once, where the model is trusted, and give that file)"
            ) from err
        detail = _UNPICKLER_DETAIL.search(str(err))
        raise UserInputError(
            f"{name!r} is not a readable {what} (corrupt, or a pickle beyond tensors and plain data, "
            f"which dynopool never loads: {detail.group(0) if detail else one_line(err, 160)})"
        ) from err
    except Exception as err:  # torch raises RuntimeError, EOFError, KeyError... for truncated or foreign bytes
        raise UserInputError(
            f"{name!r} is not a readable {what} (truncated or not a torch.save file: {type(err).__name__}: {one_line(err, 160)})"
        ) from err


def _read(path: Path) -> dict[str, Any]:
    if not path.exists():
        # the one wording for every command (finetune, report, ...): they all load through here
        raise UserInputError(f"checkpoint {str(path)!r} does not exist (give the path of a .pt file written by "
                             f"'dynopool convert' or 'dynopool finetune')")
    if not path.is_file():
        raise UserInputError(f"checkpoint {str(path)!r} is not a file")
    payload = _torch_load(path)
    if not isinstance(payload, dict) or payload.get("format") != _MAGIC:
        raise UserInputError(f"{str(path)!r} is not a dynopool checkpoint (a torch.save file without dynopool's header)")
    version = payload.get("format_version")
    if not isinstance(version, int) or not 1 <= version <= CHECKPOINT_FORMAT_VERSION:
        raise UserInputError(
            f"{str(path)!r} has checkpoint format version {version}; this dynopool reads 1..{CHECKPOINT_FORMAT_VERSION}"
        )
    _check_fields(path, payload)
    return payload


def _check_fields(path: Path, payload: dict[str, Any]) -> None:
    """The header fields have the types ``save_checkpoint`` writes (a hand-edited file may not)."""
    expected = {"source": str, "build_args": dict, "plan": dict, "state_dict": dict, "input_size": (list, tuple)}
    for key, kind in expected.items():
        if not isinstance(payload.get(key), kind):
            got = "missing" if key not in payload else type(payload[key]).__name__
            raise UserInputError(f"checkpoint {str(path)!r} is corrupt: field {key!r} is {got}")
    if not all(isinstance(v, torch.Tensor) for v in payload["state_dict"].values()):
        raise UserInputError(f"checkpoint {str(path)!r} is corrupt: its state_dict holds values that are not tensors")
    try:
        check_input_size(payload["input_size"])
    except UserInputError as err:
        raise UserInputError(f"checkpoint {str(path)!r} is corrupt: {err}") from None


def load_checkpoint(path: str | os.PathLike, trust_source: bool = False) -> Checkpoint:
    """Rebuild the converted model saved in ``path`` (source -> plan -> strict state dict).

    A ``package.module:factory`` source is imported (running its code) only with
    ``trust_source=True``.
    """
    path = Path(path)
    payload = _read(path)
    source = payload["source"]
    if not is_trusted_source(source) and not trust_source:
        raise UserInputError(
            f"checkpoint {str(path)!r} builds its model with {source!r}, which imports and runs that Python code; "
            "pass trust_source=True (CLI: --trust-source) if you trust it"
        )
    try:
        plan = Plan.from_dict(payload["plan"])
    except UserInputError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise UserInputError(f"checkpoint {str(path)!r} is corrupt: its plan cannot be read ({type(err).__name__}: {one_line(err, 160)})") from err
    model = build_model(source, payload["build_args"])
    try:
        model = apply_plan(model, plan)
    except UserInputError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as err:
        raise UserInputError(
            f"checkpoint {str(path)!r}: its plan does not fit the model rebuilt from {source!r} ({type(err).__name__}: {one_line(err, 160)})"
        ) from err
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as err:
        msg = " ".join(str(err).split())[:200]
        raise UserInputError(f"checkpoint {str(path)!r} does not match the model rebuilt from {source!r}: {msg}") from err
    bad = [name for name, m in dynopool_modules(model) if not torch.isfinite(m.stride).all()]
    if bad:
        raise UserInputError(f"checkpoint {str(path)!r} is corrupt: non-finite scale factors in {', '.join(bad[:3])}")
    return Checkpoint(
        model=model,
        plan=plan,
        source=source,
        build_args=dict(payload["build_args"]),
        input_size=tuple(payload["input_size"]),
        budget=payload.get("budget"),
        training=payload.get("training"),
        extra=payload.get("extra"),
        format_version=payload["format_version"],
    )


def load(path: str | os.PathLike, trust_source: bool = False) -> nn.Module:
    """The converted model saved in ``path`` (see ``load_checkpoint``)."""
    return load_checkpoint(path, trust_source=trust_source).model
