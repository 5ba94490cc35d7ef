"""FLOPs for the report, by fvcore's convention (one fused multiply-add = one FLOP).

``count_flops``/``flops_by_module`` are the budget helper's (``dynopool_convert.flops``) when
that module is present; until it is merged, a stand-in with the same API (delete it then). fvcore's jit trace cannot run
DynOPool's forward (it reads the stride as Python floats), so the stand-in counts the model
with every DynOPool temporarily replaced by a ``FixedResize`` of the same output size (no copy):
every other op's count is exact; DynOPool's own (small) cost is left out.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)  # fvcore imports torch.jit.script, deprecated in torch 2.x
    from fvcore.nn import FlopCountAnalysis

from .graph import frozen_pools

__all__ = ["count_flops", "flops_by_module"]


def _analysis(model: nn.Module, input_size: tuple[int, int, int]) -> FlopCountAnalysis:
    analysis = FlopCountAnalysis(model, torch.zeros(1, *input_size))
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
    return analysis


@torch.no_grad()
def _counted(model: nn.Module, input_size: tuple[int, int, int]) -> tuple[int, dict[str, int]]:
    was_training = model.training
    model.eval()
    try:
        with frozen_pools(model), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # jit tracer chatter; the counts are what matter
            analysis = _analysis(model, input_size)
            return int(analysis.total()), {k: int(v) for k, v in analysis.by_module().items()}
    finally:
        model.train(was_training)


def _standin_count_flops(model: nn.Module, input_size: tuple[int, int, int]) -> int:
    """fvcore FLOPs of ``model`` for one input of ``input_size`` (C, H, W) at its present strides."""
    return _counted(model, input_size)[0]


def _standin_flops_by_module(model: nn.Module, input_size: tuple[int, int, int]) -> dict[str, int]:
    """fvcore FLOPs per module qualname (parents include their children; ``""`` is the total)."""
    return _counted(model, input_size)[1]


try:  # the budget helper's counter (DynOPool counted by its handle), once it is on main
    from ..flops import count_flops, flops_by_module
except ImportError:  # until then: the stand-in above (same API, DynOPool's own cost left out)
    count_flops, flops_by_module = _standin_count_flops, _standin_flops_by_module
