"""Fused GPU kernel for DynOPool (Triton): DESIGN.md §1 and §7.

``resample_pool_triton`` has the signature and the result of
``dynopool.resample_pool_reference`` and is differentiable in ``x`` and both cell sizes through
one ``torch.autograd.Function``. It is the CUDA twin of the numba kernel (``_fast_cpu``): the
forward reads the four quarter-centre queries of each output cell and keeps the max and a
one-byte code of the winner (or the mean); the backward recomputes only the needed queries,
adds the gradient into their pixels and reduces both cell gradients in the kernel (one partial
sum per program, summed in a fixed order afterwards). The cell sizes stay on the device: no
host synchronisation.

float32, bfloat16 and float16 (computed in float32, as the reference), any layout
(channels-last keeps its layout). ``grad_x`` is accumulated with float32 atomics, so it is
not bit-reproducible; under ``torch.use_deterministic_algorithms(True)`` the reference runs.
Tests run the kernels on CPU tensors through Triton's interpreter (``TRITON_INTERPRET=1``).
"""
from __future__ import annotations

import functools
import os

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ._fast_cpu import _clamp_passes_gradient_at_bounds, _is_channels_last, usable

__all__ = ["applies", "resample_pool_triton", "triton_available"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_BLOCK = 512


@functools.cache
def triton_available() -> bool:
    """Whether triton imports (it ships with PyTorch's Linux CUDA wheels); checked once."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _unusable_reason(x: Tensor) -> str | None:
    if torch.compiler.is_compiling():
        return "torch.compile traces the PyTorch formulation"
    if x.device.type != "cuda" and not (x.device.type == "cpu" and _interpreting()):
        return f"the Triton kernel runs on CUDA tensors (CPU only under TRITON_INTERPRET=1), got device {x.device.type!r}"
    if x.dtype not in _DTYPES:
        return f"the Triton kernel supports float32, bfloat16 and float16, got {x.dtype}"
    if x.layout != torch.strided:
        return "the Triton kernel needs a dense (strided) tensor"
    if torch.are_deterministic_algorithms_enabled():
        return "its grad_x uses atomics, refused by torch.use_deterministic_algorithms(True)"
    if not triton_available():
        return "the Triton kernel needs triton (shipped with PyTorch's Linux CUDA wheels)"
    return None


def applies(x: Tensor, required: bool = False) -> bool:
    """Whether the Triton kernel can run on ``x``.

    True for CUDA float32/bfloat16/float16 tensors when triton imports (CPU tensors too under
    ``TRITON_INTERPRET=1``), outside deterministic mode and ``torch.compile`` tracing. With
    ``required`` (``backend="triton"``) an unusable kernel raises :class:`UserInputError`.
    """
    return usable(_unusable_reason(x), required, "triton")


def _launch_args(x: Tensor, out_h: int, out_w: int, aggregate: str) -> tuple[int, tuple, dict]:
    n, c, h, w = x.shape
    total = n * c * out_h * out_w
    lo_ok, hi_ok = _clamp_passes_gradient_at_bounds()
    meta = dict(MEAN=aggregate == "mean", CL=_is_channels_last(x), LO_OK=lo_ok, HI_OK=hi_ok, BLOCK=_BLOCK)
    return total, (total, c, h, w, out_h, out_w), meta


def _cells_on(x: Tensor, cell_h: Tensor, cell_w: Tensor) -> tuple[Tensor, Tensor]:
    # the reference computes positions in float32 from the cells cast to float32: same here
    return (cell_h.detach().to(x.device, torch.float32).reshape(()), cell_w.detach().to(x.device, torch.float32).reshape(()))


class _ResamplePoolTriton(torch.autograd.Function):
    """x (N,C,H,W), 0-d cell sizes -> (N,C,out_h,out_w) through the Triton kernels."""

    @staticmethod
    def forward(ctx, x: Tensor, cell_h: Tensor, cell_w: Tensor, out_h: int, out_w: int, aggregate: str) -> Tensor:
        from . import _triton_kernels as tk

        xd = x.detach()
        n, c, _, _ = xd.shape
        total, sizes, meta = _launch_args(xd, out_h, out_w, aggregate)
        fmt = torch.channels_last if meta["CL"] else torch.contiguous_format
        out = torch.empty((n, c, out_h, out_w), dtype=xd.dtype, device=xd.device, memory_format=fmt)
        code = torch.empty(0 if meta["MEAN"] else total, dtype=torch.uint8, device=xd.device)
        ch, cw = _cells_on(xd, cell_h, cell_w)
        if total:
            grid = (triton_cdiv(total, _BLOCK),)
            tk.forward_kernel[grid](xd, out, code, ch, cw, *sizes, *xd.stride(), *out.stride(), **meta)
        ctx.save_for_backward(xd, code, ch, cw)
        ctx.meta = (out_h, out_w, aggregate, (cell_h.dtype, cell_h.device), (cell_w.dtype, cell_w.device))
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        from . import _triton_kernels as tk

        xd, code, ch, cw = ctx.saved_tensors
        out_h, out_w, aggregate, (dtype_h, dev_h), (dtype_w, dev_w) = ctx.meta
        total, sizes, meta = _launch_args(xd, out_h, out_w, aggregate)
        fmt = torch.channels_last if meta["CL"] else torch.contiguous_format
        gx = torch.zeros(xd.shape, dtype=torch.float32, device=xd.device).to(memory_format=fmt)
        programs = triton_cdiv(total, _BLOCK)
        part = torch.zeros(max(programs, 1), 2, dtype=torch.float32, device=xd.device)
        if total:
            tk.backward_kernel[(programs,)](
                xd, grad_out, code, gx, part, ch, cw, *sizes, *xd.stride(), *grad_out.stride(), *gx.stride(), **meta
            )
        cells = part.sum(0, dtype=torch.float64)
        needs = ctx.needs_input_grad
        return (
            gx.to(xd.dtype) if needs[0] else None,
            cells[0].to(dev_h, dtype_h) if needs[1] else None,
            cells[1].to(dev_w, dtype_w) if needs[2] else None,
            None,
            None,
            None,
        )


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def resample_pool_triton(x: Tensor, cell_h: Tensor, cell_w: Tensor, out_h: int, out_w: int, aggregate: str) -> Tensor:
    """Triton twin of ``resample_pool_reference`` (same arguments, same result up to float rounding).

    ``x``: CUDA float32/bfloat16/float16 N x C x H x W, any strides (CPU tensors under
    ``TRITON_INTERPRET=1``). ``cell_h``, ``cell_w``: 0-d tensors, differentiable; they are
    never read on the host.
    """
    return _ResamplePoolTriton.apply(x, cell_h, cell_w, int(out_h), int(out_w), aggregate)
