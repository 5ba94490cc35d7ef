"""Triton kernels behind ``_fast_triton`` (imported only when triton imports).

One program handles ``BLOCK`` output cells, enumerated in the output's memory order (NCHW:
columns fastest; channels-last: channels fastest, so neighbouring lanes read neighbouring
bytes). Any input strides are read through the stride arguments. The query positions are
computed in the kernel from the cell sizes (read from device memory: no host sync) with the
reference's float32 arithmetic and order of operations (rows first, ``a + (b - a) * w``).

Forward: the four quarter-centre queries of a cell are interpolated and reduced by ``max``
(first maximum in row-major order, NaN wins: ``max_pool2d``'s rule; a one-byte code of the
winner is kept) or ``mean``. Backward: the winner (max) or all four queries (mean) are
recomputed, the gradient is added into their pixels with float32 atomics, and each program
writes its partial sums of both cell gradients (reduced afterwards in a fixed order).

Only builtins of ``triton.language`` and this module's functions are called (``tl.reduce``
with ``_add``, not ``tl.sum``): the library's own jitted helpers are decorated when triton is
imported, so under an interpreter switched on later (the tests) they could not run.
"""
from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["forward_kernel", "backward_kernel"]


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _axis_query(r, cell, size, LO_OK: tl.constexpr, HI_OK: tl.constexpr):
    """Query ``r`` along one axis: (first pixel, second pixel, weight of the second, d pos / d cell)."""
    rf = r.to(tl.float32) + 0.5
    raw = rf * (cell * 0.5) - 0.5
    hi = (size - 1).to(tl.float32)
    q = tl.minimum(tl.maximum(raw, 0.0), hi)
    i0 = tl.minimum(tl.floor(q).to(tl.int64), size - 1)
    i1 = tl.minimum(i0 + 1, size - 1)
    w1 = q - i0.to(tl.float32)
    # clamp's backward passes the gradient strictly inside, and at a bound where torch says so
    if LO_OK:
        inside = raw >= 0.0
    else:
        inside = raw > 0.0
    if HI_OK:
        inside = inside & (raw <= hi)
    else:
        inside = inside & (raw < hi)
    dq = tl.where(inside, rf * 0.5, 0.0)
    return i0, i1, w1, dq


@triton.jit
def _pixels(base, y0, y1, x0, x1, sh, sw, mask):
    """The four pixels around a query, in float32: (top-left, bottom-left, top-right, bottom-right)."""
    a0 = tl.load(base + y0 * sh + x0 * sw, mask=mask, other=0.0).to(tl.float32)
    b0 = tl.load(base + y1 * sh + x0 * sw, mask=mask, other=0.0).to(tl.float32)
    a1 = tl.load(base + y0 * sh + x1 * sw, mask=mask, other=0.0).to(tl.float32)
    b1 = tl.load(base + y1 * sh + x1 * sw, mask=mask, other=0.0).to(tl.float32)
    return a0, b0, a1, b1


@triton.jit
def _bilerp(base, y0, y1, wy, x0, x1, wx, sh, sw, mask):
    a0, b0, a1, b1 = _pixels(base, y0, y1, x0, x1, sh, sw, mask)
    r0 = a0 + (b0 - a0) * wy
    r1 = a1 + (b1 - a1) * wy
    return r0 + (r1 - r0) * wx


@triton.jit
def _bilerp_backward(base, gbase, g, y0, y1, wy, x0, x1, wx, sh, sw, gsh, gsw, mask):
    """Add ``g`` (gradient of one query) into its four pixels; return (d/d wy, d/d wx) times g.

    The same arithmetic as ``_numba_kernels._bilerp_backward`` (the CPU kernel), in Triton."""
    a0, b0, a1, b1 = _pixels(base, y0, y1, x0, x1, sh, sw, mask)
    r0 = a0 + (b0 - a0) * wy
    r1 = a1 + (b1 - a1) * wy
    g1 = g * wx  # autograd's order for r0 + (r1 - r0) * wx
    g0 = g - g1
    e0 = g0 * wy
    e1 = g1 * wy
    tl.atomic_add(gbase + y0 * gsh + x0 * gsw, g0 - e0, mask=mask, sem="relaxed")
    tl.atomic_add(gbase + y1 * gsh + x0 * gsw, e0, mask=mask, sem="relaxed")
    tl.atomic_add(gbase + y0 * gsh + x1 * gsw, g1 - e1, mask=mask, sem="relaxed")
    tl.atomic_add(gbase + y1 * gsh + x1 * gsw, e1, mask=mask, sem="relaxed")
    return g0 * (b0 - a0) + g1 * (b1 - a1), g * (r1 - r0)


@triton.jit
def _cells(total, C, OH, OW, cell_h_ptr, cell_w_ptr, BLOCK: tl.constexpr, CL: tl.constexpr):
    """This program's cells: flat indices, mask, (n, c, i, j) in the output's memory order, and
    the two cell sizes (float32, read from the device)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    if CL:
        c = offs % C
        t = offs // C
        j = t % OW
        t = t // OW
        i = t % OH
        n = t // OH
    else:
        j = offs % OW
        t = offs // OW
        i = t % OH
        t = t // OH
        c = t % C
        n = t // C
    ch = tl.load(cell_h_ptr).to(tl.float32)
    cw = tl.load(cell_w_ptr).to(tl.float32)
    return offs, offs < total, n, c, i, j, ch, cw


# sizes and strides vary with every stride and layer: one compiled kernel for all of them
# (triton would otherwise compile a variant per pattern of ==1 / divisible-by-16 integers)
_SIZES = ["total", "C", "H", "W", "OH", "OW"]


@triton.jit(do_not_specialize=_SIZES + ["sxn", "sxc", "sxh", "sxw", "son", "soc", "soh", "sow"])
def forward_kernel(
    x_ptr, out_ptr, code_ptr, cell_h_ptr, cell_w_ptr,
    total, C, H, W, OH, OW,
    sxn, sxc, sxh, sxw, son, soc, soh, sow,
    MEAN: tl.constexpr, CL: tl.constexpr, LO_OK: tl.constexpr, HI_OK: tl.constexpr, BLOCK: tl.constexpr,
):
    offs, mask, n, c, i, j, ch, cw = _cells(total, C, OH, OW, cell_h_ptr, cell_w_ptr, BLOCK, CL)
    base = x_ptr + n * sxn + c * sxc
    ya0, ya1, wya, _dya = _axis_query(2 * i, ch, H, LO_OK, HI_OK)
    yb0, yb1, wyb, _dyb = _axis_query(2 * i + 1, ch, H, LO_OK, HI_OK)
    xa0, xa1, wxa, _dxa = _axis_query(2 * j, cw, W, LO_OK, HI_OK)
    xb0, xb1, wxb, _dxb = _axis_query(2 * j + 1, cw, W, LO_OK, HI_OK)
    v0 = _bilerp(base, ya0, ya1, wya, xa0, xa1, wxa, sxh, sxw, mask)
    v1 = _bilerp(base, ya0, ya1, wya, xb0, xb1, wxb, sxh, sxw, mask)
    v2 = _bilerp(base, yb0, yb1, wyb, xa0, xa1, wxa, sxh, sxw, mask)
    v3 = _bilerp(base, yb0, yb1, wyb, xb0, xb1, wxb, sxh, sxw, mask)
    if MEAN:
        res = (((v0 + v1) + v2) + v3) * 0.25
    else:
        # max_pool2d's rule: the first maximum in row-major order; NaN wins (v != v)
        res = v0
        k = (offs * 0).to(tl.int32)
        take = (v1 > res) | (v1 != v1)
        res = tl.where(take, v1, res)
        k = tl.where(take, 1, k)
        take = (v2 > res) | (v2 != v2)
        res = tl.where(take, v2, res)
        k = tl.where(take, 2, k)
        take = (v3 > res) | (v3 != v3)
        res = tl.where(take, v3, res)
        k = tl.where(take, 3, k)
        tl.store(code_ptr + offs, k.to(tl.uint8), mask=mask)
    out = out_ptr + n * son + c * soc + i * soh + j * sow
    tl.store(out, res.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=_SIZES + ["sxn", "sxc", "sxh", "sxw", "sgn", "sgc", "sgh", "sgw", "gxn", "gxc", "gxh", "gxw"])
def backward_kernel(
    x_ptr, g_ptr, code_ptr, gx_ptr, part_ptr, cell_h_ptr, cell_w_ptr,
    total, C, H, W, OH, OW,
    sxn, sxc, sxh, sxw, sgn, sgc, sgh, sgw, gxn, gxc, gxh, gxw,
    MEAN: tl.constexpr, CL: tl.constexpr, LO_OK: tl.constexpr, HI_OK: tl.constexpr, BLOCK: tl.constexpr,
):
    offs, mask, n, c, i, j, ch, cw = _cells(total, C, OH, OW, cell_h_ptr, cell_w_ptr, BLOCK, CL)
    pid = tl.program_id(0)
    base = x_ptr + n * sxn + c * sxc
    gbase = gx_ptr + n * gxn + c * gxc
    g = tl.load(g_ptr + n * sgn + c * sgc + i * sgh + j * sgw, mask=mask, other=0.0).to(tl.float32)
    if MEAN:
        gq = g * 0.25
        ya0, ya1, wya, dya = _axis_query(2 * i, ch, H, LO_OK, HI_OK)
        yb0, yb1, wyb, dyb = _axis_query(2 * i + 1, ch, H, LO_OK, HI_OK)
        xa0, xa1, wxa, dxa = _axis_query(2 * j, cw, W, LO_OK, HI_OK)
        xb0, xb1, wxb, dxb = _axis_query(2 * j + 1, cw, W, LO_OK, HI_OK)
        dh, dw = _bilerp_backward(base, gbase, gq, ya0, ya1, wya, xa0, xa1, wxa, sxh, sxw, gxh, gxw, mask)
        acc_h = dh * dya
        acc_w = dw * dxa
        dh, dw = _bilerp_backward(base, gbase, gq, ya0, ya1, wya, xb0, xb1, wxb, sxh, sxw, gxh, gxw, mask)
        acc_h += dh * dya
        acc_w += dw * dxb
        dh, dw = _bilerp_backward(base, gbase, gq, yb0, yb1, wyb, xa0, xa1, wxa, sxh, sxw, gxh, gxw, mask)
        acc_h += dh * dyb
        acc_w += dw * dxa
        dh, dw = _bilerp_backward(base, gbase, gq, yb0, yb1, wyb, xb0, xb1, wxb, sxh, sxw, gxh, gxw, mask)
        acc_h += dh * dyb
        acc_w += dw * dxb
    else:
        k = tl.load(code_ptr + offs, mask=mask, other=0).to(tl.int32)
        y0, y1, wy, dy = _axis_query(2 * i + (k >> 1), ch, H, LO_OK, HI_OK)
        x0, x1, wx, dx = _axis_query(2 * j + (k & 1), cw, W, LO_OK, HI_OK)
        dh, dw = _bilerp_backward(base, gbase, g, y0, y1, wy, x0, x1, wx, sxh, sxw, gxh, gxw, mask)
        acc_h = dh * dy
        acc_w = dw * dx
    tl.store(part_ptr + 2 * pid, tl.reduce(tl.where(mask, acc_h, 0.0), 0, _add))
    tl.store(part_ptr + 2 * pid + 1, tl.reduce(tl.where(mask, acc_w, 0.0), 0, _add))
