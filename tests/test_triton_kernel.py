"""The Triton kernel (``_fast_triton``) against the PyTorch reference and max_pool2d.

Without a GPU the kernels run on CPU tensors through Triton's interpreter: ``TRITON_INTERPRET``
is set only while this module's tests run (triton reads it when the kernels are decorated and
when they launch), and the interpreted kernel module is dropped afterwards so that nothing else
in the session sees it. With CUDA the same tests run the compiled kernels on the GPU.
"""
from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

import dynopool_convert
from dynopool_convert import dynopool2d
from dynopool_convert.dynopool import resample_pool_reference
from dynopool_convert.errors import UserInputError

from _fast_path_cases import GRAD_TOL, TOL, random_cases, run_with_grads

_fast_triton = pytest.importorskip("dynopool_convert._fast_triton")
pytestmark = pytest.mark.skipif(not _fast_triton.triton_available(), reason="triton is not installed")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNELS = "dynopool_convert._triton_kernels"
LOW_TOL = dict(rtol=1.6e-2, atol=1e-2)  # bfloat16/float16 results: one or two units in the last place


def _drop_kernel_module() -> None:
    sys.modules.pop(KERNELS, None)
    if hasattr(dynopool_convert, "_triton_kernels"):
        delattr(dynopool_convert, "_triton_kernels")


@pytest.fixture(scope="module", autouse=True)
def _interpreter():
    if DEVICE == "cuda":
        yield
        return
    patch = pytest.MonkeyPatch()
    patch.setenv("TRITON_INTERPRET", "1")
    _drop_kernel_module()  # decorated afresh, in interpreter mode
    try:
        yield
    finally:
        _drop_kernel_module()
        patch.undo()


def triton_fn(x, cell_h, cell_w, out_h, out_w, aggregate):
    return _fast_triton.resample_pool_triton(x, cell_h, cell_w, out_h, out_w, aggregate)


def _cells(ch: float, cw: float, dtype=torch.float64):
    return (torch.tensor(ch, dtype=dtype, device=DEVICE), torch.tensor(cw, dtype=dtype, device=DEVICE))


def _assert_cell_grads_close(got, want, g, size, rtol):
    # cell gradients are sums over the whole tensor: compare relative to the summed magnitude
    scale = float(g.abs().sum()) * size
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and a.shape == b.shape == () and a.device == b.device
        assert abs(float(a) - float(b)) <= rtol * scale, (float(a), float(b))


@pytest.mark.parametrize("aggregate", ["max", "mean"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_float32_forward_and_backward_match_reference(aggregate, channels_last):
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for n, c, h, w, oh, ow, ch, cw in random_cases(10, seed=11 + 2 * channels_last + (aggregate == "mean")):
        x = torch.randn(n, c, h, w, device=DEVICE).to(memory_format=fmt)
        g = torch.randn(n, c, oh, ow, device=DEVICE)
        y, gx, gch, gcw = run_with_grads(triton_fn, x, _cells(ch, cw), oh, ow, aggregate, g)
        y_r, gx_r, gch_r, gcw_r = run_with_grads(resample_pool_reference, x, _cells(ch, cw), oh, ow, aggregate, g)
        msg = f"{(n, c, h, w)} -> {(oh, ow)} cells {(ch, cw)}"
        torch.testing.assert_close(y, y_r, **TOL[torch.float32], msg=msg)
        torch.testing.assert_close(gx, gx_r, **GRAD_TOL[torch.float32], msg=msg)
        assert y.is_contiguous(memory_format=fmt) and gx.is_contiguous(memory_format=fmt)
        _assert_cell_grads_close((gch, gcw), (gch_r, gcw_r), g, max(h, w), GRAD_TOL[torch.float32]["rtol"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("aggregate", ["max", "mean"])
def test_low_precision_matches_reference(dtype, aggregate):
    torch.manual_seed(1)
    for n, c, h, w, oh, ow, ch, cw in random_cases(6, seed=21 + (dtype == torch.float16)):
        x = torch.randn(n, c, h, w, device=DEVICE).to(dtype)
        g = torch.randn(n, c, oh, ow, device=DEVICE).to(dtype)
        cells = _cells(ch, cw, torch.float32)
        y, gx, gch, gcw = run_with_grads(triton_fn, x, cells, oh, ow, aggregate, g)
        y_r, gx_r, gch_r, gcw_r = run_with_grads(resample_pool_reference, x, cells, oh, ow, aggregate, g)
        assert y.dtype == gx.dtype == dtype
        torch.testing.assert_close(y.float(), y_r.float(), **LOW_TOL)
        torch.testing.assert_close(gx.float(), gx_r.float(), **LOW_TOL)
        _assert_cell_grads_close((gch, gcw), (gch_r, gcw_r), g.float(), max(h, w), 1e-3)


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (1, 4, 6, 10), (2, 1, 2, 2)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_stride_two_is_max_pool_bit_exact_with_gradient_routing(shape, channels_last):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    torch.manual_seed(2)
    x = torch.randint(-2, 3, shape, device=DEVICE).float().to(memory_format=fmt)  # many ties
    g = torch.randn(shape[0], shape[1], shape[2] // 2, shape[3] // 2, device=DEVICE)
    xa = x.clone().requires_grad_()
    s = torch.tensor([2.0, 2.0], device=DEVICE, requires_grad=True)
    y = dynopool2d(xa, s, "max", backend="triton")
    y.backward(g)
    xb = x.clone().requires_grad_()
    F.max_pool2d(xb, 2).backward(g)
    assert torch.equal(y, F.max_pool2d(x, 2))
    assert torch.equal(xa.grad, xb.grad)
    assert s.grad is not None and torch.isfinite(s.grad).all()


def test_stride_two_mean_is_avg_pool():
    torch.manual_seed(3)
    x = torch.randn(2, 5, 10, 14, device=DEVICE)
    two = torch.tensor([2.0, 2.0], device=DEVICE)
    assert torch.equal(dynopool2d(x, two, "mean", backend="triton"), F.avg_pool2d(x, 2))


def test_strided_input_and_expanded_gradient():
    # a non-contiguous view and the zero-stride gradient of .sum(): read through their strides
    torch.manual_seed(4)
    base = torch.randn(2, 6, 13, 22, device=DEVICE)
    for aggregate in ("max", "mean"):
        outs = []
        for fn in (triton_fn, resample_pool_reference):
            b = base.clone().requires_grad_()
            ch, cw = (c.requires_grad_() for c in _cells(13 / 7, 11 / 6))
            y = fn(b[:, ::2, :, 1::2], ch, cw, 7, 6, aggregate)
            y.sum().backward()
            outs.append((y.detach(), b.grad, ch.grad, cw.grad))
        for got, want in zip(*outs):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_gradients_only_where_needed():
    x = torch.randn(1, 2, 9, 9, device=DEVICE, requires_grad=True)
    ch, cw = _cells(1.8, 2.25)
    triton_fn(x, ch, cw, 5, 4, "max").sum().backward()
    assert x.grad is not None and ch.grad is None and cw.grad is None
    x2 = torch.randn(1, 2, 9, 9, device=DEVICE)
    ch.requires_grad_()
    triton_fn(x2, ch, cw, 5, 4, "mean").sum().backward()
    assert ch.grad is not None and cw.grad is None


def test_dynopool_module_takes_the_triton_backend():
    torch.manual_seed(5)
    pool = dynopool_convert.DynOPool((1.7, 2.3), backend="triton").to(DEVICE)
    x = torch.randn(2, 3, 17, 19, device=DEVICE, requires_grad=True)
    y = pool(x)
    y.square().sum().backward()
    ref = dynopool_convert.DynOPool((1.7, 2.3), backend="reference").to(DEVICE)
    xr = x.detach().clone().requires_grad_()
    ref(xr).square().sum().backward()
    torch.testing.assert_close(y, ref(xr.detach()), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(pool.stride.grad, ref.stride.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-4, atol=1e-4)


def test_backend_triton_refuses_what_it_cannot_run(monkeypatch):
    with pytest.raises(UserInputError, match="float64"):
        dynopool2d(torch.randn(1, 1, 4, 4, dtype=torch.float64, device=DEVICE), torch.tensor([2.0, 2.0]), backend="triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if DEVICE == "cpu":
        with pytest.raises(UserInputError, match="CUDA"):
            dynopool2d(torch.randn(1, 1, 4, 4), torch.tensor([2.0, 2.0]), backend="triton")
    # auto never takes Triton for CPU tensors
    assert not _fast_triton.applies(torch.randn(1, 1, 4, 4, device="cpu"))


def test_kernels_compile_for_hopper_without_a_gpu():
    # the interpreter does not type-check like the compiler: compile every variant to PTX for
    # sm_90 (triton's bundled ptxas, no GPU needed), as a GPU run would on first use
    import inspect

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if DEVICE == "cuda":
        pytest.skip("compiled for real by the other tests")
    sys.modules.pop(KERNELS, None)  # decorated for compilation, not for the interpreter
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("TRITON_INTERPRET", raising=False)
        import importlib

        tk = importlib.import_module(KERNELS)
    try:
        # every (aggregate, layout) branch in float32; bfloat16 (the data's loads and stores) once
        variants = [("fp32", mean, cl) for mean in (False, True) for cl in (False, True)] + [("bf16", False, True)]
        for kernel in (tk.forward_kernel, tk.backward_kernel):
            for dtype, mean, cl in variants:
                pointers = {"x_ptr": dtype, "out_ptr": dtype, "g_ptr": dtype, "code_ptr": "u8", "gx_ptr": "fp32",
                            "part_ptr": "fp32", "cell_h_ptr": "fp32", "cell_w_ptr": "fp32"}
                consts = dict(MEAN=mean, CL=cl, LO_OK=True, HI_OK=True, BLOCK=512)
                names = inspect.signature(kernel.fn).parameters
                sig = {n: "constexpr" if n in consts else ("*" + pointers[n] if n in pointers else "i32") for n in names}
                try:
                    compiled = triton.compile(ASTSource(kernel, sig, consts), target=GPUTarget("cuda", 90, 32))
                except (FileNotFoundError, RuntimeError) as err:
                    if "ptxas" in str(err):
                        pytest.skip(f"no ptxas: {err}")
                    raise
                assert ".entry" in compiled.asm["ptx"]
    finally:
        _drop_kernel_module()
