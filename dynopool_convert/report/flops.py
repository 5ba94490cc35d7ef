"""FLOPs for the report, by fvcore's convention (one fused multiply-add = one FLOP).

``count_flops`` is a stand-in for the budget helper's ``dynopool_convert.flops.count_flops``
(swap the one line in ``count_flops`` once it is on main). fvcore's jit trace cannot run
DynOPool's forward (it reads the stride as Python floats), so the stand-in counts a copy-free
variant of the model in which every DynOPool is temporarily replaced by a fixed-size adaptive
max pool of the same output size: every other op's count is exact; DynOPool's own (small)
cost is left out.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)  # fvcore imports torch.jit.script, deprecated in torch 2.x
    from fvcore.nn import FlopCountAnalysis

from ..dynopool import DynOPool, dynopool_modules, dynopool_output_size

__all__ = ["count_flops", "flops_by_module"]


class _FixedResize(nn.Module):
    """Traceable stand-in for a DynOPool at a frozen stride (same output size, no FLOPs counted)."""

    def __init__(self, stride: tuple[float, float]) -> None:
        super().__init__()
        self.stride_hw = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = int(x.shape[-2]), int(x.shape[-1])
        size = (dynopool_output_size(h, self.stride_hw[0]), dynopool_output_size(w, self.stride_hw[1]))
        return F.adaptive_max_pool2d(x, size)


@contextmanager
def _traceable(model: nn.Module) -> Iterator[nn.Module]:
    swapped: list[tuple[nn.Module, str, DynOPool]] = []
    try:
        for name, pool in dynopool_modules(model):
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, _FixedResize(pool.stride_value))
            swapped.append((parent, attr, pool))
        yield model
    finally:
        for parent, attr, pool in swapped:
            setattr(parent, attr, pool)


def _analysis(model: nn.Module, input_size: tuple[int, int, int]) -> FlopCountAnalysis:
    analysis = FlopCountAnalysis(model, torch.zeros(1, *input_size))
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
    return analysis


@torch.no_grad()
def _counted(model: nn.Module, input_size: tuple[int, int, int]) -> tuple[int, dict[str, int]]:
    was_training = model.training
    model.eval()
    try:
        with _traceable(model), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # jit tracer chatter; the counts are what matter
            analysis = _analysis(model, input_size)
            return int(analysis.total()), {k: int(v) for k, v in analysis.by_module().items()}
    finally:
        model.train(was_training)


def count_flops(model: nn.Module, input_size: tuple[int, int, int]) -> int:
    """fvcore FLOPs of ``model`` for one input of ``input_size`` (C, H, W) at its present strides."""
    return _counted(model, input_size)[0]


def flops_by_module(model: nn.Module, input_size: tuple[int, int, int]) -> dict[str, int]:
    """fvcore FLOPs per module qualname (parents include their children; ``""`` is the total)."""
    return _counted(model, input_size)[1]
