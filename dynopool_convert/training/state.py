"""Progress and RNG state of a fine-tuning run, as plain data (for ``torch.load(weights_only=True)``)."""
from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..files import atomic_write_text  # the one atomic writer (fsync, keeps the file's mode)

__all__ = ["TrainProgress", "capture_rng", "restore_rng", "atomic_write_text", "read_jsonl", "remove_stale_temp_files"]


@dataclass
class TrainProgress:
    """Where a run stands: ``step`` optimiser steps done, ``step_in_epoch`` of them in ``epoch``."""

    epoch: int = 0
    step: int = 0
    step_in_epoch: int = 0
    best_metric: float | None = None
    best_epoch: int | None = None
    history: list[dict[str, Any]] = field(default_factory=list)  # one row per finished epoch
    epoch_sums: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])  # loss*n, correct, n so far

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainProgress":
        return cls(**data)


def capture_rng() -> dict[str, Any]:
    """torch (CPU and CUDA), numpy and python ``random`` states as tensors and plain data."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(_plain, np_state[2:])],
        "python": [py_version, list(py_internal), py_gauss],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`."""
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file (empty list if it does not exist)."""
    if not Path(path).is_file():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def remove_stale_temp_files(out_dir: Path, names: tuple[str, ...]) -> None:
    """Temporary files of atomic writes that a killed run left behind (``.last.pt.XXXX.tmp``)."""
    for name in names:
        for stale in out_dir.glob(f".{name}.*.tmp"):
            stale.unlink(missing_ok=True)
