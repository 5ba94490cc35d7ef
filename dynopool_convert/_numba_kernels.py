"""numba loops behind ``_fast_cpu`` (imported only when numba is installed).

Arrays: ``x`` is (planes, H, W) for NCHW or (N, H, W, C) for channels-last; per-axis tables
``i0, i1, w`` (pixel pair and weight of the second pixel for each of the 2*out queries) and
``dq`` (d position / d cell, zero where clamped). Arithmetic follows the reference's order
(rows first, then columns; ``a + (b - a) * w``) so that results match it, bit-exactly where
the weights are 0 (stride 2). ``fastmath`` stays off for the same reason.
"""
from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

_JIT = dict(cache=True, fastmath=False, nogil=True)


@njit(inline="always", **_JIT)
def _bilerp_backward(xp, gxp, g, y0, y1, wy, x0, x1, wx):
    """Scatter ``g`` (gradient of one query) into ``gxp``; return (d/d wy, d/d wx) times g."""
    a0 = xp[y0, x0]
    b0 = xp[y1, x0]
    a1 = xp[y0, x1]
    b1 = xp[y1, x1]
    r0 = a0 + (b0 - a0) * wy
    r1 = a1 + (b1 - a1) * wy
    g1 = g * wx  # autograd's order for r0 + (r1 - r0) * wx
    g0 = g - g1
    e0 = g0 * wy
    e1 = g1 * wy
    gxp[y0, x0] += g0 - e0
    gxp[y1, x0] += e0
    gxp[y0, x1] += g1 - e1
    gxp[y1, x1] += e1
    return g0 * (b0 - a0) + g1 * (b1 - a1), g * (r1 - r0)


@njit(**_JIT)
def forward_planes(x, ri0, ri1, rw, ci0, ci1, cw, out, code, mean, quarter):
    """Serial forward over a run of NCHW planes (row pass into a buffer, then columns)."""
    planes, oh, ow = out.shape
    w = x.shape[2]
    nq = 2 * ow
    rb = np.empty(w, x.dtype)  # one query row, interpolated along H, at every input column
    qv = np.empty((2, nq), x.dtype)  # the two query rows of an output row, at every query column
    for p in range(planes):
        xp = x[p]
        for i in range(oh):
            for a in range(2):
                r = 2 * i + a
                top = xp[ri0[r]]
                bot = xp[ri1[r]]
                wy = rw[r]
                for col in range(w):
                    t = top[col]
                    rb[col] = t + (bot[col] - t) * wy
                qa = qv[a]
                for c in range(nq):
                    t = rb[ci0[c]]
                    qa[c] = t + (rb[ci1[c]] - t) * cw[c]
            q0 = qv[0]
            q1 = qv[1]
            op = out[p, i]
            if mean:
                for j in range(ow):
                    op[j] = (((q0[2 * j] + q0[2 * j + 1]) + q1[2 * j]) + q1[2 * j + 1]) * quarter[0]
            else:
                cp = code[p, i]
                for j in range(ow):
                    # max_pool2d's rule: first maximum in row-major order; NaN wins (v != v)
                    best = q0[2 * j]
                    k = 0
                    v = q0[2 * j + 1]
                    if v > best or v != v:
                        best = v
                        k = 1
                    v = q1[2 * j]
                    if v > best or v != v:
                        best = v
                        k = 2
                    v = q1[2 * j + 1]
                    if v > best or v != v:
                        best = v
                        k = 3
                    op[j] = best
                    cp[j] = k


@njit(parallel=True, **_JIT)
def forward_nchw(x, ri0, ri1, rw, ci0, ci1, cw, out, code, mean, quarter, chunks):
    planes = x.shape[0]
    for t in prange(chunks):
        lo = t * planes // chunks
        hi = (t + 1) * planes // chunks
        forward_planes(x[lo:hi], ri0, ri1, rw, ci0, ci1, cw, out[lo:hi], code[lo:hi], mean, quarter)


@njit(**_JIT)
def backward_planes(x, g, code, ri0, ri1, rw, rdq, ci0, ci1, cw, cdq, gx, part_h, part_w, mean, quarter):
    """Serial backward over a run of NCHW planes: recompute the winning query, scatter."""
    planes, oh, ow = g.shape
    for p in range(planes):
        xp = x[p]
        gxp = gx[p]
        gxp[:, :] = 0
        sh = 0.0
        sw = 0.0
        for i in range(oh):
            for j in range(ow):
                gij = g[p, i, j]
                if mean:
                    gq = gij * quarter[0]
                    for k in range(4):
                        r = 2 * i + (k >> 1)
                        c = 2 * j + (k & 1)
                        dh, dw = _bilerp_backward(xp, gxp, gq, ri0[r], ri1[r], rw[r], ci0[c], ci1[c], cw[c])
                        sh += dh * rdq[r]
                        sw += dw * cdq[c]
                else:
                    k = code[p, i, j]
                    r = 2 * i + (k >> 1)
                    c = 2 * j + (k & 1)
                    dh, dw = _bilerp_backward(xp, gxp, gij, ri0[r], ri1[r], rw[r], ci0[c], ci1[c], cw[c])
                    sh += dh * rdq[r]
                    sw += dw * cdq[c]
        part_h[p] = sh
        part_w[p] = sw


@njit(parallel=True, **_JIT)
def backward_nchw(x, g, code, ri0, ri1, rw, rdq, ci0, ci1, cw, cdq, gx, part_h, part_w, mean, quarter, chunks):
    planes = x.shape[0]
    for t in prange(chunks):
        lo = t * planes // chunks
        hi = (t + 1) * planes // chunks
        backward_planes(
            x[lo:hi], g[lo:hi], code[lo:hi], ri0, ri1, rw, rdq, ci0, ci1, cw, cdq,
            gx[lo:hi], part_h[lo:hi], part_w[lo:hi], mean, quarter,
        )


@njit(**_JIT)
def forward_rows_nhwc(x, ri0, ri1, rw, ci0, ci1, cw, out, code, mean, quarter, lo, hi):
    """Serial channels-last forward of output rows ``lo..hi`` (flat over N*out_h); loops over C innermost."""
    n, oh, ow, nc = out.shape
    w = x.shape[2]
    nq = 2 * ow
    rb = np.empty((w, nc), x.dtype)
    qv = np.empty((2, nq, nc), x.dtype)
    for t in range(lo, hi):
        b = t // oh
        i = t % oh
        for a in range(2):
            r = 2 * i + a
            top = x[b, ri0[r]]
            bot = x[b, ri1[r]]
            wy = rw[r]
            for col in range(w):
                for ch in range(nc):
                    u = top[col, ch]
                    rb[col, ch] = u + (bot[col, ch] - u) * wy
            for c in range(nq):
                x0 = ci0[c]
                x1 = ci1[c]
                wx = cw[c]
                for ch in range(nc):
                    u = rb[x0, ch]
                    qv[a, c, ch] = u + (rb[x1, ch] - u) * wx
        for j in range(ow):
            v0 = qv[0, 2 * j]
            v1 = qv[0, 2 * j + 1]
            v2 = qv[1, 2 * j]
            v3 = qv[1, 2 * j + 1]
            op = out[b, i, j]
            if mean:
                for ch in range(nc):
                    op[ch] = (((v0[ch] + v1[ch]) + v2[ch]) + v3[ch]) * quarter[0]
            else:
                cp = code[b, i, j]
                for ch in range(nc):
                    best = v0[ch]
                    k = 0
                    v = v1[ch]
                    if v > best or v != v:
                        best = v
                        k = 1
                    v = v2[ch]
                    if v > best or v != v:
                        best = v
                        k = 2
                    v = v3[ch]
                    if v > best or v != v:
                        best = v
                        k = 3
                    op[ch] = best
                    cp[ch] = k


@njit(parallel=True, **_JIT)
def forward_nhwc(x, ri0, ri1, rw, ci0, ci1, cw, out, code, mean, quarter, chunks):
    rows = out.shape[0] * out.shape[1]
    for t in prange(chunks):
        forward_rows_nhwc(x, ri0, ri1, rw, ci0, ci1, cw, out, code, mean, quarter, t * rows // chunks, (t + 1) * rows // chunks)


@njit(**_JIT)
def _backward_block_nhwc(x, g, code, ri0, ri1, rw, rdq, ci0, ci1, cw, cdq, gx, mean, quarter, b, c0, c1):
    """Serial channels-last backward of image ``b``, channels ``c0..c1`` (the pixels this task owns).

    Transposes the forward: per-query gradients, then the column pass into a row buffer, then
    the row pass into ``gx`` (as the reference's autograd). Returns the two cell gradients.
    """
    _, oh, ow, _ = g.shape
    w = x.shape[2]
    nq = 2 * ow
    cb = c1 - c0
    rb = np.empty((w, cb), x.dtype)
    gb = np.empty((w, cb), x.dtype)
    gq = np.empty((2, nq, cb), x.dtype)
    # per-element partial sums in the data's dtype keep the loops vectorised (float64 costs 30%)
    acc_h = np.zeros((w, cb), x.dtype)
    acc_w = np.zeros((nq, cb), x.dtype)
    gx[b, :, :, c0:c1] = 0
    for i in range(oh):
        for j in range(ow):
            gp = g[b, i, j]
            if mean:
                for ch in range(cb):
                    u = gp[c0 + ch] * quarter[0]
                    gq[0, 2 * j, ch] = u
                    gq[0, 2 * j + 1, ch] = u
                    gq[1, 2 * j, ch] = u
                    gq[1, 2 * j + 1, ch] = u
            else:
                cp = code[b, i, j]
                for ch in range(cb):
                    k = cp[c0 + ch]
                    u = gp[c0 + ch]
                    gq[0, 2 * j, ch] = u if k == 0 else 0
                    gq[0, 2 * j + 1, ch] = u if k == 1 else 0
                    gq[1, 2 * j, ch] = u if k == 2 else 0
                    gq[1, 2 * j + 1, ch] = u if k == 3 else 0
        for a in range(2):
            r = 2 * i + a
            top = x[b, ri0[r]]
            bot = x[b, ri1[r]]
            wy = rw[r]
            for col in range(w):
                for ch in range(cb):
                    u = top[col, c0 + ch]
                    rb[col, ch] = u + (bot[col, c0 + ch] - u) * wy
                    gb[col, ch] = 0
            for c in range(nq):
                x0 = ci0[c]
                x1 = ci1[c]
                wx = cw[c]
                for ch in range(cb):
                    u = gq[a, c, ch]
                    e = u * wx
                    gb[x0, ch] += u - e
                    gb[x1, ch] += e
                    acc_w[c, ch] += u * (rb[x1, ch] - rb[x0, ch])
            gtop = gx[b, ri0[r]]
            gbot = gx[b, ri1[r]]
            dq = rdq[r]
            for col in range(w):
                for ch in range(cb):
                    u = gb[col, ch]
                    e = u * wy
                    gtop[col, c0 + ch] += u - e
                    gbot[col, c0 + ch] += e
                    acc_h[col, ch] += u * (bot[col, c0 + ch] - top[col, c0 + ch]) * dq
    sh = 0.0
    for col in range(w):
        for ch in range(cb):
            sh += acc_h[col, ch]
    sw = 0.0
    for c in range(nq):
        for ch in range(cb):
            sw += acc_w[c, ch] * cdq[c]
    return sh, sw


@njit(**_JIT)
def backward_nhwc_serial(x, g, code, ri0, ri1, rw, rdq, ci0, ci1, cw, cdq, gx, part_h, part_w, mean, quarter, block):
    """``backward_nhwc`` on the calling thread (small tensors: no thread start-up)."""
    nc = g.shape[3]
    blocks = (nc + block - 1) // block
    for t in range(g.shape[0] * blocks):
        c0 = (t % blocks) * block
        part_h[t], part_w[t] = _backward_block_nhwc(
            x, g, code, ri0, ri1, rw, rdq, ci0, ci1, cw, cdq, gx, mean, quarter, t // blocks, c0, min(c0 + block, nc)
        )


@njit(parallel=True, **_JIT)
def backward_nhwc(x, g, code, ri0, ri1, rw, rdq, ci0, ci1, cw, cdq, gx, part_h, part_w, mean, quarter, block):
    n = g.shape[0]
    nc = g.shape[3]
    blocks = (nc + block - 1) // block
    for t in prange(n * blocks):
        b = t // blocks
        c0 = (t % blocks) * block
        c1 = min(c0 + block, nc)
        sh, sw = _backward_block_nhwc(x, g, code, ri0, ri1, rw, rdq, ci0, ci1, cw, cdq, gx, mean, quarter, b, c0, c1)
        part_h[t] = sh
        part_w[t] = sw


__all__ = [
    "numba",
    "forward_planes",
    "forward_nchw",
    "backward_planes",
    "backward_nchw",
    "forward_rows_nhwc",
    "forward_nhwc",
    "backward_nhwc_serial",
    "backward_nhwc",
]
