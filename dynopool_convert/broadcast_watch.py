"""Operands that broadcast after a move: a forward that runs but no longer means what it did.

A binary elementwise op (``a + b``, ``a * b``, ...) whose operands had the same shape at the
reference strides, and different shapes once a group moved, has broadcast one of them: a map
shrunk to 1x1 added to another branch's 2x2 map (timm's HRNet fusing its branches) runs without
error, every pixel of the other branch getting the same value. Validation's forward-only moves
cannot see it; ``ElementwiseShapes`` records the operands' shapes of every such call in order,
and ``broadcast_problem`` compares a moved run's record with the reference run's.
Package-internal.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

_BINARY = {
    torch.add, torch.sub, torch.mul, torch.div, torch.maximum, torch.minimum,
    Tensor.add, Tensor.sub, Tensor.mul, Tensor.div, Tensor.add_, Tensor.sub_, Tensor.mul_, Tensor.div_,
    Tensor.__add__, Tensor.__radd__, Tensor.__iadd__, Tensor.__sub__, Tensor.__rsub__, Tensor.__isub__,
    Tensor.__mul__, Tensor.__rmul__, Tensor.__imul__, Tensor.__truediv__, Tensor.__rtruediv__, Tensor.__itruediv__,
}


class ElementwiseShapes(TorchFunctionMode):
    """Records ``(shape, shape)`` of the two tensor operands of each binary elementwise call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[tuple[int, ...], tuple[int, ...]]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _BINARY and len(args) >= 2 and isinstance(args[0], Tensor) and isinstance(args[1], Tensor):
            self.calls.append((tuple(args[0].shape), tuple(args[1].shape)))
        return func(*args, **(kwargs or {}))


def broadcast_problem(reference: list[tuple[tuple[int, ...], tuple[int, ...]]],
                      moved: list[tuple[tuple[int, ...], tuple[int, ...]]]) -> str:
    """Why the moved run broadcasts operands that were equal at the reference ("" if none)."""
    for k, ((a0, b0), (a1, b1)) in enumerate(zip(reference, moved)):
        if a0 == b0 and a1 != b1:
            return f"elementwise op {k + 1} broadcasts operands equal at the reference: {list(a1)} and {list(b1)}"
    return ""
