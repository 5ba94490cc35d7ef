"""Fused CPU kernel for DynOPool (numba). Placeholder until the kernel lands: never applies."""
from __future__ import annotations

from torch import Tensor


def applies(x: Tensor, required: bool = False) -> bool:
    """Whether the fused kernel can run on ``x``; with ``required`` an unusable kernel raises."""
    if required:
        raise RuntimeError("the fused CPU DynOPool kernel is not available")
    return False


def resample_pool_fast(x: Tensor, cell_h: Tensor, cell_w: Tensor, out_h: int, out_w: int, aggregate: str) -> Tensor:
    raise RuntimeError("the fused CPU DynOPool kernel is not available")
