"""Shared random cases and tolerances for the fast-path tests (numba kernel, native path)."""
from __future__ import annotations

import random

import torch

TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-6, atol=1e-6)}
# the fast backwards sum the same terms in another order than autograd's index_add
GRAD_TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-4)}


def random_cases(count: int, seed: int):
    """Random (N, C, H, W, out_h, out_w, cell_h, cell_w): 1x1 to 40 px, strides 0.5 to 16."""
    rng = random.Random(seed)
    for idx in range(count):
        h, w = rng.choice([1, 2, 3, 5, 7, 12, 17, 23, 40]), rng.choice([1, 2, 4, 9, 13, 16, 31])
        # output sizes as dynopool2d makes them, from strides 0.5 (2x up) to 16 (clamped to >= 1)
        s_h, s_w = rng.uniform(0.5, 16.0 if idx % 3 == 0 else 3.0), rng.uniform(0.5, 3.0)
        out_h, out_w = max(1, round(h / s_h)), max(1, round(w / s_w))
        # cells exactly H/H' as dynopool2d makes them, or perturbed (positions move, clamps kick in)
        jit = (lambda: 1.0) if idx % 2 == 0 else (lambda: rng.uniform(0.8, 1.3))
        yield rng.randint(1, 3), rng.randint(1, 5), h, w, out_h, out_w, h / out_h * jit(), w / out_w * jit()


def run_with_grads(fn, x, cells, out_h, out_w, aggregate, grad_out):
    """``fn(x, cell_h, cell_w, ...)`` forward + backward: (output, grad x, grad cell_h, grad cell_w).

    ``cells`` are floats (taken as float64) or tensors (their dtype kept)."""
    x = x.detach().clone().requires_grad_()
    ch, cw = (c.detach().clone().requires_grad_() if isinstance(c, torch.Tensor)
              else torch.tensor(c, dtype=torch.float64, requires_grad=True) for c in cells)
    y = fn(x, ch, cw, out_h, out_w, aggregate)
    y.backward(grad_out)
    return y.detach(), x.grad, ch.grad, cw.grad
