"""Is a conversion exact at init? Outputs and FLOPs of the converted model against the original's
(DESIGN.md §6, "Exact at init"; used by the tests and the coverage sweep).

>>> import timm
>>> check_exact(timm.create_model("resnet18"), (3, 32, 32)).ok   # doctest: +SKIP
True
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from .convert import ConversionResult, convert
from .flops import count_flops

__all__ = ["ExactReport", "check_exact", "max_relative_difference"]

#: the issue's thresholds: outputs within 1e-5 (float32), FLOPs within 1%
REL_TOL, FLOPS_TOL = 1e-5, 0.01


@dataclass
class ExactReport:
    """``rel_diff``: max |converted - original| / max |original| over every output tensor."""

    groups: int
    rel_diff: float
    flops_original: int
    flops_converted: int

    @property
    def flops_ratio(self) -> float:
        return self.flops_converted / self.flops_original if self.flops_original else float("nan")

    @property
    def ok(self) -> bool:
        """At least one learned group, outputs within 1e-5, FLOPs within 1%."""
        return self.groups > 0 and self.rel_diff <= REL_TOL and abs(self.flops_ratio - 1.0) <= FLOPS_TOL

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "flops_ratio": self.flops_ratio, "ok": self.ok}


def _tensors(value: Any) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def max_relative_difference(a: Any, b: Any) -> float:
    """max |b - a| / max |a| over the floating-point tensors of two outputs (same structure)."""
    pairs = [(x, y) for x, y in zip(_tensors(a), _tensors(b)) if x.is_floating_point()]
    if not pairs:
        return 0.0
    diff = max(float((y.float() - x.float()).abs().max()) for x, y in pairs)
    scale = max(float(x.float().abs().max()) for x, _ in pairs)
    return diff / scale if scale > 0 else diff


def check_exact(model: nn.Module, input_size: Sequence[int], result: ConversionResult | None = None,
                batch: int = 2, seed: int = 0) -> ExactReport:
    """Convert ``model`` with placement ``exact`` (or take ``result``) and compare both in eval
    mode on random inputs at ``input_size``, and their fvcore FLOPs there."""
    if result is None:
        result = convert(model, input_size, placement="exact")
    converted = result.model
    was = model.training, converted.training
    model.eval(), converted.eval()
    x = torch.randn(batch, *input_size, generator=torch.Generator().manual_seed(seed))
    try:
        with torch.no_grad():
            rel = max_relative_difference(model(x), converted(x))
    finally:
        model.train(was[0]), converted.train(was[1])
    return ExactReport(result.plan.summary()["groups"], rel, count_flops(model, input_size), count_flops(converted, input_size))
