"""Fused CPU kernel for DynOPool (numba): DESIGN.md §1, "one fused loop per plane".

``resample_pool_fast`` has the signature and the result of ``dynopool.resample_pool_reference``
and is differentiable in ``x`` and both cell sizes through one ``torch.autograd.Function``.

Forward: for each output row, the two query rows are interpolated along H into a row buffer,
then read at the query columns (the reference's order of operations, so the values are the
same bits); the 2x2 queries are reduced by mean, or by max keeping a one-byte code of the
winner (first maximum in row-major order, NaN wins: ``max_pool2d``'s rule, so stride 2
reproduces it bit-exactly, gradient routing included). Backward: the winner's four pixels and
weights are recomputed from the code, the gradient is scattered into them, and the gradients
of both cell sizes are accumulated (the query positions are linear in the cell size; zero where
a position was clamped). ``mean`` sends g/4 to each query.

Layouts: contiguous NCHW runs over runs of N*C planes; channels-last runs natively (rows x
channels, vectorised over C) and keeps its layout; any other strides are made contiguous.
Each parallel task owns the pixels it writes and its own partial cell gradients, reduced in a
fixed order: race-free and deterministic. Small inputs run on the calling thread. numba compiles
each (dtype, layout) on first use and caches the machine code on disk (``cache=True``).
"""
from __future__ import annotations

import functools

import numpy as np
import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .errors import UserInputError

__all__ = ["applies", "resample_pool_fast", "numba_available"]

_DTYPES = (torch.float32, torch.float64)
_CHANNEL_BLOCK = 16  # channels per task in the channels-last backward for small batches
_SERIAL_NUMEL = 1 << 15  # smaller inputs run on the calling thread (thread start-up dominates)


@functools.cache
def numba_available() -> bool:
    """Whether numba imports (the fused kernel's only extra dependency); checked once."""
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


def _unusable_reason(x: Tensor) -> str | None:
    if torch.compiler.is_compiling():
        return "torch.compile traces the PyTorch formulation"
    if x.device.type != "cpu":
        return f"the fused kernel runs on CPU tensors only, got device {x.device.type!r}"
    if x.dtype not in _DTYPES:
        return f"the fused kernel supports float32 and float64, got {x.dtype}"
    if x.layout != torch.strided:
        return "the fused kernel needs a dense (strided) tensor"
    if not numba_available():
        return "the fused kernel needs numba (pip install numba)"
    return None


def applies(x: Tensor, required: bool = False) -> bool:
    """Whether the fused kernel can run on ``x``.

    True for CPU float32/float64 tensors when numba imports. While ``torch.compile`` traces,
    always False (the compiler traces the pure-PyTorch formulation instead, whatever the
    backend). With ``required`` (``backend="fast"``) an unusable kernel raises
    :class:`UserInputError` saying why.
    """
    return usable(_unusable_reason(x), required, "fast")


def usable(reason: str | None, required: bool, backend: str) -> bool:
    """True without a ``reason`` against a fused kernel; else False, or (``required``, outside
    ``torch.compile`` tracing) a :class:`UserInputError` naming ``backend`` and the reason."""
    if reason is None:
        return True
    if required and not torch.compiler.is_compiling():
        raise UserInputError(f"backend={backend!r} is unavailable: {reason}; use backend='auto' or 'reference'")
    return False


@functools.cache
def _clamp_passes_gradient_at_bounds() -> tuple[bool, bool]:
    """Whether ``Tensor.clamp(lo, hi)``'s backward lets the gradient through at ``lo`` / at ``hi``.

    The reference differentiates its clamped query positions with autograd; the convention at
    the exact bounds (hit at stride 2 by the first and last queries) has changed between torch
    versions, so ask torch once instead of assuming one.
    """
    with torch.inference_mode(False), torch.enable_grad():  # the first call may come from eval code
        probe = torch.tensor([0.0, 1.0], dtype=torch.float64, requires_grad=True)
        (grad,) = torch.autograd.grad(probe.clamp(0.0, 1.0).sum(), probe)
    return bool(grad[0] != 0), bool(grad[1] != 0)


def _axis_table(n_out: int, cell: Tensor, size: int, dtype: torch.dtype) -> tuple[Tensor, ...]:
    """Per-query pixel indices, weight and d(position)/d(cell) along one axis.

    Same arithmetic as the reference's ``_axis_queries`` (so the weights are bit-identical);
    the derivative is zero where the position was clamped, as ``clamp``'s backward.
    """
    k = torch.arange(2 * n_out, dtype=dtype)
    raw = (k + 0.5) * (cell.detach().to(dtype) * 0.5) - 0.5
    q = raw.clamp(0.0, float(size - 1))
    i0 = q.floor().long().clamp_(max=size - 1)
    i1 = (i0 + 1).clamp_(max=size - 1)
    w1 = q - i0.to(dtype)
    lo_ok, hi_ok = _clamp_passes_gradient_at_bounds()
    inside = (raw >= 0.0 if lo_ok else raw > 0.0) & (raw <= size - 1.0 if hi_ok else raw < size - 1.0)
    dq = torch.where(inside, (k + 0.5) * 0.5, torch.zeros((), dtype=dtype))
    return i0.numpy(), i1.numpy(), w1.numpy(), dq.numpy()


def _quarter(dtype: torch.dtype):
    # 1/4 as a one-element array of the data's dtype: numba would promote a literal to float64
    return np.full(1, 0.25, dtype=np.float32 if dtype == torch.float32 else np.float64)


def _chunks(tasks: int) -> int:
    # a few runs of planes per thread: amortises the per-run buffers, balances shared cores
    return max(1, min(tasks, 4 * torch.get_num_threads()))


def _parallel(x: Tensor) -> bool:
    """Run the threaded kernels (after syncing numba's thread count with torch's)?"""
    if x.numel() < _SERIAL_NUMEL or torch.get_num_threads() == 1:
        return False
    from ._numba_kernels import numba

    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
    return True


def _forward(x: Tensor, rows, cols, out_h: int, out_w: int, mean: bool) -> tuple[Tensor, Tensor]:
    """Run the forward kernel; returns ``(out, code)`` (``code`` empty for ``mean``)."""
    from . import _numba_kernels as nk

    n, c, h, w = x.shape
    quarter = _quarter(x.dtype)
    par = _parallel(x)
    if _is_channels_last(x):
        out = torch.empty((n, c, out_h, out_w), dtype=x.dtype, memory_format=torch.channels_last)
        code = torch.empty((0, 0, 0, 0) if mean else (n, out_h, out_w, c), dtype=torch.uint8)
        args = (x.permute(0, 2, 3, 1).numpy(), *rows[:3], *cols[:3], out.permute(0, 2, 3, 1).numpy(), code.numpy(), mean, quarter)
        if par:
            nk.forward_nhwc(*args, _chunks(n * out_h))
        else:
            nk.forward_rows_nhwc(*args, 0, n * out_h)
    else:
        out = torch.empty((n, c, out_h, out_w), dtype=x.dtype)
        code = torch.empty((0, 0, 0) if mean else (n * c, out_h, out_w), dtype=torch.uint8)
        args = (x.view(n * c, h, w).numpy(), *rows[:3], *cols[:3], out.view(n * c, out_h, out_w).numpy(), code.numpy(), mean, quarter)
        if par:
            nk.forward_nchw(*args, _chunks(n * c))
        else:
            nk.forward_planes(*args)
    return out, code


def _backward(x: Tensor, grad_out: Tensor, code: Tensor, rows, cols, mean: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Run the backward kernel; returns ``(grad_x, grad_cell_h, grad_cell_w)`` (cells in float64)."""
    from . import _numba_kernels as nk

    n, c, h, w = x.shape
    out_h, out_w = grad_out.shape[-2:]
    quarter = _quarter(x.dtype)
    par = _parallel(x)
    if _is_channels_last(x):
        g = grad_out.permute(0, 2, 3, 1).contiguous()  # NHWC
        grad_x = torch.empty((n, c, h, w), dtype=x.dtype, memory_format=torch.channels_last)
        # whole images per task when the batch feeds every thread: longer, vectorised channel loops
        block = c if n >= 4 * torch.get_num_threads() else min(c, _CHANNEL_BLOCK)
        tasks = n * -(-c // block)
        part_h, part_w = torch.empty(tasks, dtype=torch.float64), torch.empty(tasks, dtype=torch.float64)
        args = (
            x.permute(0, 2, 3, 1).numpy(), g.numpy(), code.numpy(), *rows, *cols,
            grad_x.permute(0, 2, 3, 1).numpy(), part_h.numpy(), part_w.numpy(), mean, quarter, block,
        )
        (nk.backward_nhwc if par else nk.backward_nhwc_serial)(*args)
    else:
        g = grad_out.contiguous().view(n * c, out_h, out_w)
        grad_x = torch.empty((n, c, h, w), dtype=x.dtype)
        part_h, part_w = torch.empty(n * c, dtype=torch.float64), torch.empty(n * c, dtype=torch.float64)
        args = (
            x.view(n * c, h, w).numpy(), g.numpy(), code.numpy(), *rows, *cols,
            grad_x.view(n * c, h, w).numpy(), part_h.numpy(), part_w.numpy(), mean, quarter,
        )
        if par:
            nk.backward_nchw(*args, _chunks(n * c))
        else:
            nk.backward_planes(*args)
    # per-task partial sums reduced in a fixed order: deterministic whatever the thread count
    return grad_x, part_h.sum(), part_w.sum()


class _ResamplePool(torch.autograd.Function):
    """Autograd wrapper: x (N,C,H,W), 0-d cell sizes -> (N,C,out_h,out_w)."""

    @staticmethod
    def forward(ctx, x: Tensor, cell_h: Tensor, cell_w: Tensor, out_h: int, out_w: int, aggregate: str) -> Tensor:
        _, _, h, w = x.shape
        xd = x.detach()
        if not (_is_channels_last(xd) or xd.is_contiguous()):
            xd = xd.contiguous()
        rows = _axis_table(out_h, cell_h, h, x.dtype)
        cols = _axis_table(out_w, cell_w, w, x.dtype)
        mean = aggregate == "mean"
        out, code = _forward(xd, rows, cols, out_h, out_w, mean)
        ctx.save_for_backward(xd, code)
        ctx.tables = (rows, cols)
        ctx.meta = (mean, cell_h.dtype, cell_w.dtype)
        return out

    @staticmethod
    @once_differentiable  # the kernel's backward is not itself differentiable: say so loudly
    def backward(ctx, grad_out: Tensor):
        xd, code = ctx.saved_tensors
        rows, cols = ctx.tables
        mean, dtype_h, dtype_w = ctx.meta
        grad_x, grad_h, grad_w = _backward(xd, grad_out, code, rows, cols, mean)
        needs = ctx.needs_input_grad
        return (
            grad_x if needs[0] else None,
            grad_h.to(dtype_h) if needs[1] else None,
            grad_w.to(dtype_w) if needs[2] else None,
            None,
            None,
            None,
        )


def _is_channels_last(x: Tensor) -> bool:
    # a tensor that is contiguous in both layouts (C == 1 or H == W == 1) takes the NCHW path
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def resample_pool_fast(x: Tensor, cell_h: Tensor, cell_w: Tensor, out_h: int, out_w: int, aggregate: str) -> Tensor:
    """Fused-kernel twin of ``resample_pool_reference`` (same arguments, same result).

    ``x``: CPU float32/float64, N x C x H x W (any strides; channels-last runs natively,
    other layouts are made contiguous). ``cell_h``, ``cell_w``: 0-d tensors, differentiable.
    """
    return _ResamplePool.apply(x, cell_h, cell_w, int(out_h), int(out_w), aggregate)
