"""The fused numba kernel (``_fast_cpu``) against the PyTorch reference and max_pool2d."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dynopool_convert import _fast_cpu, dynopool2d
from dynopool_convert.dynopool import resample_pool_reference

from _fast_path_cases import GRAD_TOL, TOL, random_cases, run_with_grads
from dynopool_convert.errors import UserInputError

pytestmark = pytest.mark.skipif(not _fast_cpu.numba_available(), reason="numba is not installed")

fast = _fast_cpu.resample_pool_fast
ref = resample_pool_reference


def _cells(ch: float, cw: float, dtype=torch.float64, grad=True):
    return (torch.tensor(ch, dtype=dtype, requires_grad=grad), torch.tensor(cw, dtype=dtype, requires_grad=grad))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("aggregate", ["max", "mean"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_forward_and_backward_match_reference(dtype, aggregate, channels_last):
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for n, c, h, w, oh, ow, ch, cw in random_cases(25, seed=4 * (dtype == torch.float32) + 2 * (aggregate == "mean") + channels_last):
        x = torch.randn(n, c, h, w, dtype=dtype).to(memory_format=fmt)
        g = torch.randn(n, c, oh, ow, dtype=dtype)
        cells = _cells(ch, cw, dtype)
        y, gx, gch, gcw = run_with_grads(fast, x, cells, oh, ow, aggregate, g)
        y_r, gx_r, gch_r, gcw_r = run_with_grads(ref, x, cells, oh, ow, aggregate, g)
        msg = f"{(n, c, h, w)} -> {(oh, ow)} cells {(ch, cw)}"
        torch.testing.assert_close(y, y_r, **TOL[dtype], msg=msg)
        torch.testing.assert_close(gx, gx_r, **GRAD_TOL[dtype], msg=msg)
        # cell gradients are sums over the whole tensor: compare relative to the summed magnitude
        scale = float(g.abs().sum()) * max(h, w)
        for got, want in ((gch, gch_r), (gcw, gcw_r)):
            assert got.dtype == want.dtype and got.shape == want.shape == ()
            assert abs(float(got) - float(want)) <= GRAD_TOL[dtype]["rtol"] * scale, msg


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (1, 4, 6, 10), (2, 1, 2, 2), (1, 16, 14, 12)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_stride_two_is_max_pool_bit_exact_with_gradient_routing(shape, channels_last):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    torch.manual_seed(1)
    # small integers: many exact ties inside the 2x2 windows
    x = torch.randint(-2, 3, shape).float().to(memory_format=fmt)
    g = torch.randn(shape[0], shape[1], shape[2] // 2, shape[3] // 2)
    xa = x.clone().requires_grad_()
    y = dynopool2d(xa, torch.tensor([2.0, 2.0]), "max", backend="fast")
    y.backward(g)
    xb = x.clone().requires_grad_()
    y_mp = F.max_pool2d(xb, 2)
    y_mp.backward(g)
    assert torch.equal(y, y_mp)
    assert torch.equal(xa.grad, xb.grad)


def test_stride_two_mean_is_avg_pool_bit_exact():
    torch.manual_seed(2)
    x = torch.randn(2, 5, 10, 14)
    g = torch.randn(2, 5, 5, 7)
    xa = x.clone().requires_grad_()
    dynopool2d(xa, torch.tensor([2.0, 2.0]), "mean", backend="fast").backward(g)
    xb = x.clone().requires_grad_()
    F.avg_pool2d(xb, 2).backward(g)
    assert torch.equal(dynopool2d(x, torch.tensor([2.0, 2.0]), "mean", backend="fast"), F.avg_pool2d(x, 2))
    assert torch.equal(xa.grad, xb.grad)


@pytest.mark.parametrize("aggregate", ["max", "mean"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_gradcheck_fast_function(aggregate, channels_last):
    torch.manual_seed(3)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64).to(memory_format=fmt).requires_grad_()
    # downsampling, upsampling along H with a clamped border, a single large cell
    for (oh, ow), cells in [((3, 4), (2.2, 1.45)), ((10, 3), (0.71, 2.35)), ((1, 1), (5.3, 4.1))]:
        ch, cw = _cells(*cells)
        assert torch.autograd.gradcheck(lambda a, b, c: fast(a, b, c, oh, ow, aggregate), (x, ch, cw))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ties_pick_the_first_query_like_the_reference(dtype):
    # constant and integer-valued images at fractional strides: exact ties between the four queries
    for x in (torch.full((1, 2, 9, 7), 3.0, dtype=dtype), torch.randint(0, 2, (2, 3, 11, 10)).to(dtype)):
        for oh, ow in [(5, 4), (3, 6), (9, 7)]:
            cells = _cells(x.shape[2] / oh, x.shape[3] / ow, dtype)
            g = torch.randn(x.shape[0], x.shape[1], oh, ow, dtype=dtype)
            y, gx, gch, gcw = run_with_grads(fast, x, cells, oh, ow, "max", g)
            y_r, gx_r, gch_r, gcw_r = run_with_grads(ref, x, cells, oh, ow, "max", g)
            assert torch.equal(y, y_r)
            torch.testing.assert_close(gx, gx_r, **GRAD_TOL[dtype])
            torch.testing.assert_close(gch, gch_r, **GRAD_TOL[dtype])
            torch.testing.assert_close(gcw, gcw_r, **GRAD_TOL[dtype])


def test_channels_last_matches_contiguous_and_keeps_layout():
    torch.manual_seed(4)
    x = torch.randn(2, 20, 15, 19)
    s = torch.tensor([1.7, 2.3], requires_grad=True)
    g = torch.randn(2, 20, 9, 8)
    grads = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        xi = x.clone(memory_format=fmt).requires_grad_()
        y = dynopool2d(xi, s, "max", backend="fast")
        assert y.is_contiguous(memory_format=fmt)
        y.backward(g)
        grads.append((y.detach(), xi.grad, s.grad.clone()))
        s.grad = None
    (y0, gx0, gs0), (y1, gx1, gs1) = grads
    assert torch.equal(y0, y1)
    torch.testing.assert_close(gx1, gx0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gs1, gs0, rtol=1e-5, atol=1e-5)


def test_non_contiguous_input_and_nan():
    x = torch.randn(2, 3, 16, 20)[:, :, ::2, 1::2]  # neither layout: made contiguous
    s = torch.tensor([1.5, 1.2])
    torch.testing.assert_close(dynopool2d(x, s, backend="fast"), dynopool2d(x, s, backend="reference"), rtol=1e-6, atol=1e-6)
    x = torch.randn(1, 1, 8, 8)
    x[0, 0, 3, 4] = float("nan")
    for s in (torch.tensor([2.0, 2.0]), torch.tensor([1.7, 2.9])):
        # a NaN poisons every query that reads it (NaN * 0 weight is NaN) and wins the max
        y = dynopool2d(x, s, backend="fast")
        assert torch.equal(y.isnan(), dynopool2d(x, s, backend="reference").isnan()) and y.isnan().any()


def test_double_backward_is_refused():
    x = torch.randn(1, 1, 6, 6, dtype=torch.float64, requires_grad=True)
    ch, cw = _cells(1.5, 1.5)
    v = torch.randn(1, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    (gx,) = torch.autograd.grad(fast(x, ch, cw, 4, 4, "max"), x, grad_outputs=v, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        gx.sum().backward()


def test_deterministic_across_runs():
    torch.manual_seed(5)
    x = torch.randn(4, 8, 23, 17, requires_grad=True)
    s = torch.tensor([1.3, 2.1], requires_grad=True)
    runs = []
    for _ in range(2):
        x.grad = s.grad = None
        dynopool2d(x, s, "max", backend="fast").square().sum().backward()
        runs.append((x.grad.clone(), s.grad.clone()))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_auto_backend_uses_the_kernel_and_inference_mode_works():
    x = torch.randn(1, 2, 9, 9, requires_grad=True)
    _fast_cpu._clamp_passes_gradient_at_bounds.cache_clear()  # first use may be under inference_mode
    with torch.inference_mode():
        z = dynopool2d(x.detach(), torch.tensor([1.6, 1.6]), backend="auto")
    with torch.no_grad():
        assert torch.equal(dynopool2d(x, torch.tensor([1.6, 1.6]), backend="auto"), z)
    y = dynopool2d(x, torch.tensor([1.6, 1.6]), backend="auto")
    assert type(y.grad_fn).__name__ == "_ResamplePoolBackward"
    assert torch.equal(z, y.detach())


def test_applies_and_fallbacks(monkeypatch):
    x = torch.randn(1, 1, 4, 4)
    assert _fast_cpu.applies(x) and _fast_cpu.applies(x.double())
    for bad in (x.bfloat16(), x.half()):
        assert not _fast_cpu.applies(bad)
        with pytest.raises(UserInputError, match="float32 and float64"):
            dynopool2d(bad, torch.tensor([2.0, 2.0]), backend="fast")
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not _fast_cpu.applies(x) and not _fast_cpu.applies(x, required=True)
    monkeypatch.undo()
    monkeypatch.setattr(_fast_cpu, "numba_available", lambda: False)
    assert not _fast_cpu.applies(x)
    y = dynopool2d(x, torch.tensor([2.0, 2.0]), backend="auto")  # silent fallback to the reference
    assert torch.equal(y, F.max_pool2d(x, 2))
    with pytest.raises(UserInputError, match="needs numba"):
        dynopool2d(x, torch.tensor([2.0, 2.0]), backend="fast")
