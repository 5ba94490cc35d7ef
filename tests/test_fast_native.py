"""The native-kernel path (``_fast_native``) against the PyTorch reference and max_pool2d (CPU)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dynopool_convert import _fast_cpu, _fast_native, dynopool2d
from dynopool_convert.dynopool import resample_pool_reference

from _fast_path_cases import GRAD_TOL, TOL, random_cases, run_with_grads

native = _fast_native.resample_pool_native
ref = resample_pool_reference
EPS32 = torch.finfo(torch.float32).eps


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("aggregate", ["max", "mean"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_forward_and_backward_match_reference(dtype, aggregate, channels_last):
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    native_runs = 0
    for n, c, h, w, oh, ow, ch, cw in random_cases(30, seed=4 * (dtype == torch.float32) + 2 * (aggregate == "mean") + channels_last):
        x = torch.randn(n, c, h, w, dtype=dtype).to(memory_format=fmt)
        g = torch.randn(n, c, oh, ow, dtype=dtype)
        y, gx, gch, gcw = run_with_grads(native, x, (ch, cw), oh, ow, aggregate, g)
        y_r, gx_r, gch_r, gcw_r = run_with_grads(ref, x, (ch, cw), oh, ow, aggregate, g)
        msg = f"{(n, c, h, w)} -> {(oh, ow)} cells {(ch, cw)}"
        if dtype == torch.float64:
            torch.testing.assert_close(y, y_r, **TOL[dtype], msg=msg)
        else:
            # float32: the upsample kernel weights the pixels as (1-l)a + lb, the reference as
            # a + (b-a)l; both round positions and values, so they differ by a few ulps of the
            # input (measured up to ~20 eps * max|x| at 40 px). What matters: native is as close
            # to the exact (float64) result as the float32 reference is.
            scale = float(x.abs().max())
            torch.testing.assert_close(y, y_r, rtol=1e-6, atol=32 * EPS32 * scale, msg=msg)
            exact = ref(x.double(), torch.tensor(ch, dtype=torch.float64), torch.tensor(cw, dtype=torch.float64), oh, ow, aggregate)
            err_native, err_ref = (float((v.double() - exact).abs().max()) for v in (y, y_r))
            assert err_native <= 1.5 * err_ref + 4 * EPS32 * scale, msg
        torch.testing.assert_close(gx, gx_r, **GRAD_TOL[dtype], msg=msg)
        torch.testing.assert_close(gch, gch_r, **GRAD_TOL[dtype], msg=msg)
        torch.testing.assert_close(gcw, gcw_r, **GRAD_TOL[dtype], msg=msg)
        native_runs += not _fast_native.shortcut_conflict(h, w, oh, ow, ch, cw)
    assert native_runs >= 20  # the reference fallback (perturbed cell where 2 * out == size) is the exception


def test_gradcheck_away_from_boundaries():
    torch.manual_seed(1)
    for (h, w, oh, ow, jh, jw), aggregate in zip([(7, 9, 3, 4, 1.03, 0.97), (5, 6, 8, 7, 1.01, 0.99)], ["max", "mean"]):
        x = torch.randn(1, 2, h, w, dtype=torch.float64, requires_grad=True)
        ch = torch.tensor(h / oh * jh, dtype=torch.float64, requires_grad=True)
        cw = torch.tensor(w / ow * jw, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda a, b, c: native(a, b, c, oh, ow, aggregate), (x, ch, cw), eps=1e-7, atol=1e-6)


@pytest.mark.parametrize("channels_last", [False, True])
def test_stride_two_is_max_pool_and_avg_pool(channels_last):
    torch.manual_seed(2)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 3, 12, 10).to(memory_format=fmt)
    g = torch.randn(2, 3, 6, 5)
    for aggregate, pool in [("max", F.max_pool2d), ("mean", F.avg_pool2d)]:
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        y = dynopool2d(xa, torch.tensor([2.0, 2.0]), aggregate, backend="native")
        y.backward(g)
        pool(xb, 2).backward(g)
        assert torch.equal(y, pool(x, 2))
        assert torch.equal(xa.grad, xb.grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_close_to_reference(dtype):
    torch.manual_seed(3)
    x = torch.randn(2, 4, 17, 14).to(dtype)
    g = torch.randn(2, 4, 10, 6).to(dtype)
    cells = (17 / 10, 14 / 6)
    for aggregate in ("max", "mean"):
        y, gx, gch, gcw = run_with_grads(native, x, cells, 10, 6, aggregate, g)
        # the reference on the same inputs computes in float32 and casts back
        y_r, gx_r, gch_r, gcw_r = run_with_grads(ref, x, cells, 10, 6, aggregate, g)
        assert y.dtype == dtype and gx.dtype == dtype
        torch.testing.assert_close(y, y_r, rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(gx, gx_r, rtol=1e-2, atol=1e-2)
        # cell gradients are sums over the whole map, accumulated in float32
        torch.testing.assert_close(gch, gch_r, rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(gcw, gcw_r, rtol=1e-4, atol=1e-3)
        # and the forward is close to the float32 operator on the unrounded input
        y32 = ref(x.float(), torch.tensor(cells[0]), torch.tensor(cells[1]), 10, 6, aggregate)
        torch.testing.assert_close(y.float(), y32, rtol=1e-2, atol=1e-2)


def test_channels_last_keeps_layout_and_values():
    torch.manual_seed(4)
    x = torch.randn(2, 8, 15, 13)
    s = torch.tensor([1.7, 2.3])
    cl = x.to(memory_format=torch.channels_last).requires_grad_()
    y = dynopool2d(cl, s, backend="native")
    y.sum().backward()
    assert y.is_contiguous(memory_format=torch.channels_last)
    xc = x.clone().requires_grad_()
    y_c = dynopool2d(xc, s, backend="native")
    y_c.sum().backward()
    torch.testing.assert_close(y, y_c, rtol=0, atol=0)
    torch.testing.assert_close(cl.grad, xc.grad, rtol=1e-6, atol=1e-6)


def test_shortcut_conflict_takes_the_reference():
    # 2 * out == size with a cell that is not 2: upsampling's copy shortcut would ignore the cell
    assert _fast_native.shortcut_conflict(8, 9, 4, 3, 2.2, 3.0)
    assert not _fast_native.shortcut_conflict(8, 9, 4, 3, 2.0, 3.0)
    torch.manual_seed(5)
    x = torch.randn(1, 2, 8, 8, dtype=torch.float64)
    g = torch.randn(1, 2, 4, 4, dtype=torch.float64)
    for a, b in zip(run_with_grads(native, x, (2.2, 1.9), 4, 4, "max", g), run_with_grads(ref, x, (2.2, 1.9), 4, 4, "max", g)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_stride_gradient_through_dynopool2d_matches_reference():
    torch.manual_seed(6)
    x = torch.randn(2, 3, 23, 19, dtype=torch.float64)
    grads = {}
    for backend in ("native", "reference"):
        s = torch.tensor([1.37, 2.61], dtype=torch.float64, requires_grad=True)
        xb = x.clone().requires_grad_()
        (dynopool2d(xb, s, "max", backend=backend) ** 2).sum().backward()
        grads[backend] = (s.grad, xb.grad)
    for a, b in zip(grads["native"], grads["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_auto_dispatch(monkeypatch):
    calls: list[str] = []
    real_native, real_fast = _fast_native.resample_pool_native, _fast_cpu.resample_pool_fast
    monkeypatch.setattr(_fast_native, "resample_pool_native", lambda *a: calls.append("native") or real_native(*a))
    monkeypatch.setattr(_fast_cpu, "resample_pool_fast", lambda *a: calls.append("fast") or real_fast(*a))
    s = torch.tensor([1.6, 1.6])
    x = torch.randn(1, 2, 9, 9)
    dynopool2d(x, s, backend="auto")
    assert calls == (["fast"] if _fast_cpu.applies(x) else ["native"])
    calls.clear()
    dynopool2d(x.bfloat16(), s, backend="auto")
    dynopool2d(x.half(), s, backend="auto")
    assert calls == ["native", "native"]
    calls.clear()
    dynopool2d(x.bfloat16(), s, backend="reference")
    assert calls == []


def test_autocast_and_inference_mode():
    from dynopool_convert import DynOPool

    torch.manual_seed(7)
    pool = DynOPool((1.6, 2.3))
    x = torch.randn(2, 3, 20, 18, dtype=torch.bfloat16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = pool(x)
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and pool.stride.grad.dtype == torch.float32
    assert torch.isfinite(pool.stride.grad).all() and pool.stride.grad.abs().sum() > 0
    with torch.inference_mode():
        z = pool(x.detach())
    torch.testing.assert_close(z, y.detach(), rtol=0, atol=0)
