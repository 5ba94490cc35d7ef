"""Device-agnostic fast path for DynOPool from PyTorch's native kernels (DESIGN.md §1).

``resample_pool_native`` has the signature and the result of
``dynopool.resample_pool_reference`` and is differentiable in ``x`` and both cell sizes
through one ``torch.autograd.Function``; it runs wherever ``upsample_bilinear2d`` and
``max_pool2d`` do (CUDA, CPU bfloat16/float16, ...).

Forward: the query points ``(k + 1/2) * c/2 - 1/2`` are interpolate's half-pixel rule, border
clamped, so the operator is ``max_pool2d(upsample_bilinear2d(x, (2H', 2W'), scales=2/c), 2)``
(``avg_pool2d`` for ``mean``). The scales are passed explicitly so that the query positions
follow the given cell sizes, not only the output size.

Backward (no autograd graph is kept; saved: ``x`` and, for ``max``, the pooling indices):
``G`` = gradient w.r.t. the upsampled map U (max_unpool, or nearest upsampling / 4 for mean).
U is separable, U = rows(cols(x)), so its adjoint runs in two ``upsample_bilinear2d_backward``
steps: ``G_c`` (2H' x W, columns undone) then ``grad_x``. The cell gradients need only native
ops: ``d U / d q_row`` at query row ``k`` is the column interpolation of the difference of its
two neighbouring input rows, so ``grad_cell_h = sum_k w_k * sum(G_c[k] * (x[i1(k)] - x[i0(k)]))``
with ``w_k = d q_k / d c = (k + 1/2) / 2`` (0 where the position was clamped, by the reference's
``clamp`` convention, probed once by ``_fast_cpu``); columns likewise with ``G_r`` (H x 2W').
This is the full-map sum, so ``max`` and ``mean`` share it. Inputs in bfloat16/float16 get
their whole backward in float32 (as the reference) and ``grad_x`` cast back.
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ._fast_cpu import _clamp_passes_gradient_at_bounds

__all__ = ["resample_pool_native", "shortcut_conflict"]

_upsample = torch.ops.aten.upsample_bilinear2d.default
_upsample_backward = torch.ops.aten.upsample_bilinear2d_backward.default


def _no_autocast(device_type: str):
    """Run the kernels in the tensor's own dtype even inside an autocast region."""
    try:
        return torch.autocast(device_type=device_type, enabled=False)
    except RuntimeError:  # a device type autocast does not know: nothing to disable
        return contextlib.nullcontext()


def shortcut_conflict(size_h: int, size_w: int, out_h: int, out_w: int, cell_h: float, cell_w: float) -> bool:
    """Whether PyTorch's upsampling shortcut would ignore a cell size.

    ``upsample_bilinear2d`` copies its input when the output size equals the input size,
    whatever the scales. Along an axis with ``2 * out == size`` that is right only for a cell
    of exactly 2 (always the case through ``dynopool2d``, where ``c = size / out``); other
    cells (direct calls) take the reference.
    """
    return (2 * out_h == size_h and cell_h != 2.0) or (2 * out_w == size_w and cell_w != 2.0)


def _axis(n_out: int, cell: float, size: int, dtype: torch.dtype, device):
    """``(i0, i1, weight)`` of the 2*n_out queries along one axis, on ``device``.

    Positions as the reference's ``_axis_queries`` (same dtype and operation order);
    ``weight = d q / d cell`` where ``clamp`` passes the gradient (and the two neighbours
    differ), else 0.
    """
    k = torch.arange(2 * n_out, dtype=dtype)
    raw = (k + 0.5) * (torch.tensor(cell, dtype=dtype) * 0.5) - 0.5
    q = raw.clamp(0.0, float(size - 1))
    i0 = q.floor().long().clamp_(max=size - 1)
    i1 = (i0 + 1).clamp_(max=size - 1)
    lo_ok, hi_ok = _clamp_passes_gradient_at_bounds()
    inside = (raw >= 0.0 if lo_ok else raw > 0.0) & (raw <= size - 1.0 if hi_ok else raw < size - 1.0)
    weight = torch.where(inside & (i1 != i0), (k + 0.5) * 0.5, torch.zeros((), dtype=dtype))
    return i0.to(device), i1.to(device), weight.to(device)


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class _ResamplePoolNative(torch.autograd.Function):
    """x (N,C,H,W), 0-d cell sizes -> (N,C,out_h,out_w) from native upsample + pool kernels."""

    @staticmethod
    def forward(ctx, x: Tensor, cell_h: Tensor, cell_w: Tensor, out_h: int, out_w: int, aggregate: str, cells: tuple[float, float]) -> Tensor:
        xd = x.detach()
        scales = (2.0 / cells[0], 2.0 / cells[1])
        with _no_autocast(x.device.type):
            up = _upsample(xd, [2 * out_h, 2 * out_w], False, *scales)
            if aggregate == "max":
                out, idx = torch.ops.aten.max_pool2d_with_indices.default(up, [2, 2], [2, 2])
            else:
                out, idx = torch.ops.aten.avg_pool2d.default(up, [2, 2], [2, 2]), None
        del up
        ctx.save_for_backward(xd, idx)
        # the cell gradients go back with each cell's dtype and device (a CPU stride may drive CUDA data)
        ctx.meta = (out_h, out_w, aggregate, cells, scales, (cell_h.dtype, cell_h.device), (cell_w.dtype, cell_w.device))
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        xd, idx = ctx.saved_tensors
        out_h, out_w, aggregate, cells, scales, (dtype_h, dev_h), (dtype_w, dev_w) = ctx.meta
        needs = ctx.needs_input_grad
        n, c, h, w = xd.shape
        big = [2 * out_h, 2 * out_w]
        grad_h = grad_w = None
        cd = _compute_dtype(xd)
        with _no_autocast(xd.device.type):
            g = grad_out.to(cd)
            if aggregate == "max":
                G = torch.ops.aten.max_unpool2d.default(g, idx, big)
            else:
                G = torch.ops.aten.upsample_nearest2d.default(g, big) * 0.25
            # the bilinear map is separable: U = rows(cols(x)). Its adjoint in two steps gives
            # grad_x, and the column step's result is what the row-position gradient needs.
            g_cols = _upsample_backward(G, big, [n, c, big[0], w], False, 1.0, scales[1])  # 2H' x W
            if needs[2]:
                g_rows = _upsample_backward(G, big, [n, c, h, big[1]], False, scales[0], 1.0)  # H x 2W'
                del G
                grad_w = _position_grad(xd, g_rows, 3, out_w, cells[1], w).to(dev_w, dtype_w)
                del g_rows
            else:
                del G
            if needs[1]:
                grad_h = _position_grad(xd, g_cols, 2, out_h, cells[0], h).to(dev_h, dtype_h)
            grad_x = _upsample_backward(g_cols, [big[0], w], [n, c, h, w], False, scales[0], 1.0).to(xd.dtype) if needs[0] else None
        return grad_x, grad_h, grad_w, None, None, None, None


def _position_grad(x: Tensor, g_axis: Tensor, dim: int, n_out: int, cell: float, size: int) -> Tensor:
    """Gradient of the cell size along ``dim`` (2: rows, 3: columns).

    ``g_axis`` is the gradient w.r.t. the map interpolated along ``dim`` only (2*n_out entries
    along ``dim``, the other axis still at input resolution). ``d map / d q_k`` = difference of
    the two pixels around query ``k``; times ``d q_k / d cell`` (the weights), summed.
    """
    cd = g_axis.dtype
    if size == 1:  # every query is clamped onto the one pixel
        return g_axis.new_zeros(())
    i0, _, wt = _axis(n_out, cell, size, cd, x.device)
    shape = [1, 1, 1, 1]
    shape[dim] = -1
    # differences of neighbouring pixels (in the compute dtype), read at each query's first
    # pixel; where both neighbours are the last pixel the weight is already 0
    diff = x.narrow(dim, 1, size - 1).to(cd) - x.narrow(dim, 0, size - 1).to(cd)
    at_q = torch.gather(diff, dim, i0.clamp(max=size - 2).view(shape).expand(list(g_axis.shape)))
    del diff
    other = 5 - dim  # the axis not interpolated (3 for rows, 2 for columns)
    return at_q.mul_(g_axis).sum(dim=(0, 1, other)).dot(wt)


def resample_pool_native(x: Tensor, cell_h: Tensor, cell_w: Tensor, out_h: int, out_w: int, aggregate: str) -> Tensor:
    """Native-kernel twin of ``resample_pool_reference`` (same arguments, same result).

    Any device and floating dtype, any layout (channels-last stays channels-last).
    ``cell_h``, ``cell_w``: 0-d tensors, differentiable; their values are read on the host
    (one device sync). Cells that upsampling's equal-size shortcut would ignore
    (:func:`shortcut_conflict`), and non-CPU tensors under
    ``torch.use_deterministic_algorithms(True)``, take the reference.
    """
    from .dynopool import resample_pool_reference

    out_h, out_w = int(out_h), int(out_w)
    # the reference computes positions from the cells cast to its working dtype: do the same
    dtype = torch.promote_types(x.dtype, torch.float32)
    ch, cw = torch.stack([cell_h.detach().to(dtype), cell_w.detach().to(dtype)]).tolist()
    _, _, h, w = x.shape
    # CUDA's upsample_bilinear2d_backward accumulates with atomics and refuses deterministic mode
    deterministic = torch.are_deterministic_algorithms_enabled() and x.device.type != "cpu"
    if deterministic or shortcut_conflict(h, w, out_h, out_w, ch, cw):
        return resample_pool_reference(x, cell_h, cell_w, out_h, out_w, aggregate)
    return _ResamplePoolNative.apply(x, cell_h, cell_w, out_h, out_w, aggregate, (ch, cw))
