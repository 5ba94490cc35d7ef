"""Checkpoints: one file with source, build arguments, plan, reference size, budget and weights.

``torch.save`` of plain data and tensors only, read back with ``torch.load(weights_only=True)``;
loading rebuilds the model from its source, replays the plan and loads the state dict strictly
(DESIGN.md §4). A ``package.module:factory`` source is only imported with ``trust_source=True``.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .convert import apply_plan, check_input_size
from .errors import UserInputError
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

    path = Path(path)
    if path.parent and not path.parent.exists():
        raise UserInputError(f"cannot write checkpoint {str(path)!r}: folder {str(path.parent)!r} does not exist")
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
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


save = save_checkpoint


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserInputError(f"checkpoint {str(path)!r} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        msg = " ".join(str(err).split())[:160]
        raise UserInputError(f"{str(path)!r} is not a readable dynopool checkpoint ({type(err).__name__}: {msg})") from err
    if not isinstance(payload, dict) or payload.get("format") != _MAGIC:
        raise UserInputError(f"{str(path)!r} is not a dynopool checkpoint")
    version = payload.get("format_version")
    if not isinstance(version, int) or not 1 <= version <= CHECKPOINT_FORMAT_VERSION:
        raise UserInputError(
            f"{str(path)!r} has checkpoint format version {version}; this dynopool reads 1..{CHECKPOINT_FORMAT_VERSION}"
        )
    return payload


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
    plan = Plan.from_dict(payload["plan"])
    model = apply_plan(build_model(source, payload["build_args"]), plan)
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as err:
        msg = " ".join(str(err).split())[:200]
        raise UserInputError(f"checkpoint {str(path)!r} does not match the model rebuilt from {source!r}: {msg}") from err
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
