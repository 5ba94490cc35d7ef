"""DynOPool operator: exactness, gradients, shapes, dtypes, layouts (DESIGN.md §1)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dynopool_convert import DynOPool, dynopool2d, dynopool_output_size
from dynopool_convert.dynopool import resample_pool_reference

BACKENDS = ["reference", "auto"]


def _stride(h: float, w: float | None = None, dtype=torch.float32, grad: bool = False) -> torch.Tensor:
    return torch.tensor([h, h if w is None else w], dtype=dtype, requires_grad=grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (1, 5, 12, 6), (3, 2, 2, 2)])
def test_stride_two_equals_max_pool(shape, backend):
    x = torch.randn(*shape)
    y = dynopool2d(x, _stride(2.0), "max", backend=backend)
    assert torch.equal(y, F.max_pool2d(x, 2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_stride_two_mean_equals_avg_pool(backend):
    x = torch.randn(2, 4, 10, 14)
    y = dynopool2d(x, _stride(2.0), "mean", backend=backend)
    assert torch.equal(y, F.avg_pool2d(x, 2))


def test_matches_interpolate_formulation():
    # DESIGN §1: forward == max_pool2d(interpolate(x, (2H', 2W'), bilinear, half-pixel), 2)
    x = torch.randn(2, 3, 17, 23, dtype=torch.float64)
    for s in [(1.3, 2.7), (0.6, 0.9), (3.1, 1.0), (5.5, 4.2)]:
        y = dynopool2d(x, _stride(*s, dtype=torch.float64), "max", backend="reference")
        oh, ow = dynopool_output_size(17, s[0]), dynopool_output_size(23, s[1])
        up = F.interpolate(x, size=(2 * oh, 2 * ow), mode="bilinear", align_corners=False)
        torch.testing.assert_close(y, F.max_pool2d(up, 2), rtol=1e-12, atol=1e-12)


def test_gradcheck_input_and_position():
    # The forward is piecewise constant in s (integer output sizes); away from rounding
    # boundaries it is smooth in x and in the cell size c that sets the query positions.
    torch.manual_seed(0)
    x = torch.randn(1, 1, 7, 9, dtype=torch.float64, requires_grad=True)
    cell_h = torch.tensor(2.2, dtype=torch.float64, requires_grad=True)
    cell_w = torch.tensor(1.7, dtype=torch.float64, requires_grad=True)
    for aggregate in ("max", "mean"):
        assert torch.autograd.gradcheck(
            lambda a, ch, cw: resample_pool_reference(a, ch, cw, 3, 5, aggregate), (x, cell_h, cell_w)
        )
        s = _stride(2.2, 1.7, dtype=torch.float64)
        assert torch.autograd.gradcheck(lambda a: dynopool2d(a, s, aggregate, backend="reference"), (x,))


def test_stride_gradient_is_cell_gradient_times_straight_through_factor():
    # STE: dL/ds = dL/dc * dc/ds with c = H / H'_ste, dc/ds = H^2 / (H'^2 s^2) (~1 near H' = H/s)
    torch.manual_seed(3)
    x = torch.randn(1, 2, 19, 17, dtype=torch.float64)
    s = _stride(2.3, 3.1, dtype=torch.float64, grad=True)
    dynopool2d(x, s, "max", backend="reference").sum().backward()
    oh, ow = dynopool_output_size(19, 2.3), dynopool_output_size(17, 3.1)
    c = torch.tensor([19 / oh, 17 / ow], dtype=torch.float64, requires_grad=True)
    resample_pool_reference(x, c[0], c[1], oh, ow, "max").sum().backward()
    factor = torch.tensor([19**2 / (oh**2 * 2.3**2), 17**2 / (ow**2 * 3.1**2)], dtype=torch.float64)
    torch.testing.assert_close(s.grad, c.grad * factor)


def test_stride_gradient_sign_matches_finite_difference():
    # The forward is piecewise constant in s (integer sizes), so the finite difference is taken
    # over steps that really change the output size. The loss reads the first output cells of
    # a smooth image: a larger stride moves their query points outwards, which the
    # straight-through gradient must predict.
    torch.manual_seed(1)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    for _ in range(3):
        x = F.avg_pool2d(F.pad(x, (3, 3, 3, 3), mode="replicate"), 7, stride=1)  # smooth image
    weight = torch.randn(2, 3, 3, 3, dtype=torch.float64)

    def loss(s: torch.Tensor) -> torch.Tensor:
        return (dynopool2d(x, s, "mean", backend="reference")[:, :, :3, :3] * weight).sum()

    agree = total = 0
    for s0 in [(2.9, 3.3), (1.6, 4.4), (5.0, 2.2), (3.7, 1.3)]:
        s = _stride(*s0, dtype=torch.float64, grad=True)
        loss(s).backward()
        for axis in (0, 1):
            step = 0.1 * s0[axis]  # large enough to change the rounded size
            sp, sm = s.detach().clone(), s.detach().clone()
            sp[axis] += step
            sm[axis] -= step
            fd = (loss(sp) - loss(sm)) / (2 * step)
            total += 1
            agree += int(torch.sign(fd) == torch.sign(s.grad[axis]))
    assert agree == total, f"{agree}/{total} signs agree"


def test_cell_gradient_matches_finite_difference():
    # Exact check of the position gradient: at fixed output size the reference is smooth in c.
    torch.manual_seed(2)
    x = torch.randn(1, 2, 13, 10, dtype=torch.float64)
    c = torch.tensor([2.1, 1.45], dtype=torch.float64, requires_grad=True)
    f = lambda cc: resample_pool_reference(x, cc[0], cc[1], 6, 7, "max").sum()
    f(c).backward()
    for axis in (0, 1):
        eps = 1e-6
        cp, cm = c.detach().clone(), c.detach().clone()
        cp[axis] += eps
        cm[axis] -= eps
        fd = (f(cp) - f(cm)) / (2 * eps)
        torch.testing.assert_close(c.grad[axis], fd, rtol=1e-5, atol=1e-7)


def test_position_gradient_is_linear_in_stride():
    # the query positions are linear in s: d(output)/ds has no 1/r^2 factor, so the stride
    # gradient of a fixed-size output scales like the input's spatial gradient, not like s^2.
    x = torch.linspace(0, 1, 64, dtype=torch.float64).view(1, 1, 1, 64).expand(1, 1, 4, 64).contiguous()
    grads = []
    for s_w in (1.9, 3.9):  # 64/1.9 = 33.7 -> 34 ; 64/3.9 = 16.4 -> 16
        s = _stride(1.0, s_w, dtype=torch.float64, grad=True)
        dynopool2d(x, s, "mean", backend="reference").mean().backward()
        grads.append(s.grad[1].item())
    # a linear ramp: mean output = mean query position / 63; d/ds_w of it is O(1) at both strides
    assert all(g > 0 for g in grads)
    assert 0.25 < grads[0] / grads[1] < 4.0


def test_asymmetric_strides_give_non_square_maps():
    pool = DynOPool((1.0, 4.0))
    y = pool(torch.randn(1, 2, 16, 16))
    assert y.shape == (1, 2, 16, 4)
    assert pool.output_size((16, 16)) == (16, 4)
    assert pool.r == pytest.approx((1.0, 0.25))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size", [(1, 1), (7, 5), (3, 13), (1, 9)])
@pytest.mark.parametrize("stride", [(2.0, 2.0), (1.5, 3.0), (0.5, 0.7), (16.0, 16.0)])
def test_any_size_runs_and_matches_reference(size, stride, backend):
    x = torch.randn(2, 3, *size)
    s = _stride(*stride)
    y = dynopool2d(x, s, "max", backend=backend)
    expect = (dynopool_output_size(size[0], stride[0]), dynopool_output_size(size[1], stride[1]))
    assert y.shape == (2, 3, *expect)
    assert min(expect) >= 1
    assert torch.isfinite(y).all()


def test_bounds_clamp_stride():
    pool = DynOPool(2.0)
    with torch.no_grad():
        pool.stride.copy_(torch.tensor([100.0, 0.01]))
    # strides beyond the bounds act as the bounds: r in [1/16, 2]
    assert pool.output_size((64, 64)) == (4, 128)
    assert pool(torch.randn(1, 1, 64, 64)).shape == (1, 1, 4, 128)
    pool.clamp_()
    assert pool.stride.tolist() == [16.0, 0.5]
    with pytest.raises(ValueError):
        DynOPool(2.0, r_bounds=(2.0, 1.0))
    with pytest.raises(ValueError):
        DynOPool(-1.0)
    with pytest.raises(ValueError):
        DynOPool(2.0, aggregate="median")


@pytest.mark.parametrize("backend", BACKENDS)
def test_channels_last_same_result(backend):
    x = torch.randn(2, 8, 15, 19)
    s = _stride(1.7, 2.3)
    y = dynopool2d(x, s, "max", backend=backend)
    y_cl = dynopool2d(x.to(memory_format=torch.channels_last), s, "max", backend=backend)
    torch.testing.assert_close(y_cl, y, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_forward(dtype):
    x = torch.randn(2, 4, 12, 12)
    s = _stride(1.6, 2.4)
    y = dynopool2d(x.to(dtype), s, "max")
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), dynopool2d(x, s, "max", backend="reference"), rtol=2e-2, atol=2e-2)


def test_gradients_reach_input_and_stride_on_every_backend():
    x = torch.randn(2, 3, 20, 20, requires_grad=True)
    for backend in BACKENDS:
        pool = DynOPool((1.8, 2.6), backend=backend)
        pool(x).square().sum().backward()
        assert torch.isfinite(pool.stride.grad).all() and pool.stride.grad.abs().sum() > 0
        assert torch.isfinite(x.grad).all()
        x.grad = None


def test_torch_compile_small_module():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), DynOPool((1.5, 2.5)), torch.nn.ReLU())
    compiled = torch.compile(model, backend="eager")
    x = torch.randn(1, 3, 16, 16)
    torch.testing.assert_close(compiled(x), model(x))


def test_state_dict_round_trip():
    a = DynOPool((1.3, 2.9), aggregate="mean")
    b = DynOPool(2.0, aggregate="mean")
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 2, 11, 11)
    assert torch.equal(a(x), b(x))
    assert list(a.state_dict()) == ["stride"]


def test_shared_stride_parameter():
    a = DynOPool(2.0)
    b = DynOPool(a.stride)
    assert b.stride is a.stride
    model = torch.nn.Sequential(a, b)
    assert len(list(model.parameters())) == 1


def test_reference_rejects_bad_input():
    with pytest.raises(ValueError):
        dynopool2d(torch.randn(3, 8, 8), _stride(2.0))
