"""The DynOPool operator: learnable resizing with a continuous stride (DESIGN.md §1).

``dynopool2d`` is the math, ``DynOPool`` the module that owns (or shares) the learnable
stride ``s = (s_h, s_w)``; the paper's scale factor is ``r = 1 / s``.

Forward: ``H' = round(H / s_h)`` (half to even, at least 1); every output cell of ``c_h x c_w``
input pixels (``c = H / H'``) is read at the centres of its four quarters by border-clamped
bilinear interpolation and the four values are aggregated by ``max`` or ``mean``. Backward:
the straight-through estimator ``H'_ste = H/s + stopgrad(round(H/s) - H/s)`` lets the gradient
reach ``s``; the query positions are linear in ``c``, hence in ``s``.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._helpers import pair_of_floats

__all__ = [
    "DynOPool",
    "dynopool2d",
    "dynopool_output_size",
    "resample_pool_reference",
    "R_MIN",
    "R_MAX",
    "Aggregate",
]

Aggregate = Literal["max", "mean"]

#: Default bounds on the scale factor r = 1/s: a site may shrink its input up to 16x and
#: enlarge it up to 2x. Strides are kept in [1/R_MAX, 1/R_MIN] = [0.5, 16].
R_MIN: float = 1.0 / 16.0
R_MAX: float = 2.0


def dynopool_output_size(size: int, stride: float, multiple: int = 1) -> int:
    """Output length for an input of ``size`` pixels at continuous ``stride``.

    ``round(size / stride)`` with round-half-to-even (as ``torch.round``), at least 1; with
    ``multiple`` m > 1, the nearest multiple of m instead: ``m * max(1, round(size / (stride * m)))``
    (for layers after the site that need sizes divisible by a window or patch size).

    >>> dynopool_output_size(56, 2.0), dynopool_output_size(7, 2.0), dynopool_output_size(1, 4.0)
    (28, 4, 1)
    >>> dynopool_output_size(56, 2.0, 7), dynopool_output_size(60, 2.0, 7), dynopool_output_size(20, 2.0, 7)
    (28, 28, 7)
    """
    m = int(multiple)
    return m * max(1, int(round(size / (float(stride) * m))))


def _axis_queries(n_out: int, cell: Tensor, size: int, dtype: torch.dtype, device) -> tuple[Tensor, Tensor, Tensor]:
    """Indices and weights of the 2*n_out query positions along one axis.

    Query ``k`` sits at ``(k + 1/2) * cell / 2 - 1/2``, clamped to ``[0, size - 1]``.
    Returns ``(i0, i1, w1)``: the two neighbouring pixels and the weight of the second.
    """
    k = torch.arange(2 * n_out, dtype=dtype, device=device)
    q = ((k + 0.5) * (cell.to(dtype) * 0.5) - 0.5).clamp(0.0, float(size - 1))
    i0 = q.detach().floor().long().clamp_(max=size - 1)
    i1 = (i0 + 1).clamp_(max=size - 1)
    return i0, i1, q - i0.to(dtype)


def _lerp_axis(x: Tensor, dim: int, i0: Tensor, i1: Tensor, w1: Tensor) -> Tensor:
    shape = [1, 1, 1, 1]
    shape[dim] = -1
    a = x.index_select(dim, i0)
    b = x.index_select(dim, i1)
    return a + (b - a) * w1.view(shape)


def resample_pool_reference(
    x: Tensor, cell_h: Tensor, cell_w: Tensor, out_h: int, out_w: int, aggregate: Aggregate
) -> Tensor:
    """Pure-PyTorch reference: bilinear reads at the four quarter centres, then max/mean.

    Differentiable in ``x``, ``cell_h`` and ``cell_w`` by autograd; runs on any device and
    dtype. Every fast path is tested against it.
    """
    _, _, h, w = x.shape
    dtype = torch.promote_types(x.dtype, torch.float32)
    xc = x.to(dtype)
    rows = _axis_queries(out_h, cell_h, h, dtype, x.device)
    cols = _axis_queries(out_w, cell_w, w, dtype, x.device)
    dense = _lerp_axis(_lerp_axis(xc, 2, *rows), 3, *cols)
    pooled = F.max_pool2d(dense, 2) if aggregate == "max" else F.avg_pool2d(dense, 2)
    return pooled.to(x.dtype)


def _fused_kernel(x: Tensor, backend: str):
    """The fused kernel for ``x`` under ``backend`` (Triton on CUDA, numba on CPU), or None."""
    if backend == "triton" or (backend == "auto" and x.device.type == "cuda"):
        from . import _fast_triton

        if _fast_triton.applies(x, required=(backend == "triton")):
            return _fast_triton.resample_pool_triton
    if backend in ("auto", "fast"):
        from . import _fast_cpu

        if _fast_cpu.applies(x, required=(backend == "fast")):
            return _fast_cpu.resample_pool_fast
    return None


def dynopool2d(
    x: Tensor,
    stride: Tensor,
    aggregate: Aggregate = "max",
    r_bounds: tuple[float, float] = (R_MIN, R_MAX),
    backend: Literal["auto", "reference", "fast", "native", "triton"] = "auto",
    multiple: tuple[int, int] = (1, 1),
    host_stride: tuple[float, float] | None = None,
) -> Tensor:
    """Resize ``x`` (N x C x H x W) with the learnable continuous ``stride`` (a 2-element tensor).

    ``r_bounds`` bounds the scale factor ``r = 1/stride`` (the stride is clamped to
    ``[1/r_max, 1/r_min]``). ``multiple`` rounds each output size to a multiple of its value
    (the straight-through gradient is unchanged). ``backend``: ``auto`` takes a fused kernel when
    one applies (``triton``: CUDA float32/bfloat16/float16 with triton installed; ``fast``:
    float32/float64 on CPU with numba installed), else the native-kernel path (``native``:
    upsample + pool kernels, any device and dtype), and the PyTorch ``reference`` while
    ``torch.compile`` traces. ``host_stride``: the stride's value as Python floats, from which
    the output sizes are computed without a device-to-host copy (default: read ``stride``).
    """
    if x.dim() != 4:
        raise ValueError(f"DynOPool expects an N x C x H x W tensor, got shape {tuple(x.shape)}")
    if aggregate not in ("max", "mean"):
        raise ValueError(f"aggregate must be 'max' or 'mean', got {aggregate!r}")
    r_min, r_max = r_bounds
    s = stride.clamp(1.0 / r_max, 1.0 / r_min)
    h, w = int(x.shape[2]), int(x.shape[3])  # Python ints, also under torch.jit.trace (DESIGN.md §6)
    if host_stride is None:
        s_h, s_w = (float(v) for v in s.detach().cpu().tolist())
    else:
        s_h, s_w = (min(max(float(v), 1.0 / r_max), 1.0 / r_min) for v in host_stride)
    out_h, out_w = dynopool_output_size(h, s_h, multiple[0]), dynopool_output_size(w, s_w, multiple[1])
    if torch.jit.is_tracing():  # the traced graph holds the frozen op (standard ops, no gradient to s)
        from .frozen import static_resample_pool

        return static_resample_pool(x, out_h, out_w, aggregate)
    # straight-through estimator: integer sizes forward, continuous H/s backward
    cont_h, cont_w = h / s[0], w / s[1]
    cell_h = h / (cont_h + (out_h - cont_h).detach())
    cell_w = w / (cont_w + (out_w - cont_w).detach())
    fused = _fused_kernel(x, backend)
    if fused is not None:
        return fused(x, cell_h, cell_w, out_h, out_w, aggregate)
    if backend == "native" or (backend == "auto" and not torch.compiler.is_compiling()):
        from ._fast_native import resample_pool_native

        return resample_pool_native(x, cell_h, cell_w, out_h, out_w, aggregate)
    return resample_pool_reference(x, cell_h, cell_w, out_h, out_w, aggregate)


def square_mean(values: list[float] | tuple[float, float], dtype: torch.dtype = torch.float32) -> float:
    """The mean of a raw ``(s_h, s_w)`` as ``stride.mean()`` computes it in the parameter's dtype
    (a float64 mean can round an output size the other way: 27 / 1.19999998 is 22.5000002)."""
    return float(torch.tensor([float(values[0]), float(values[1])], dtype=dtype).mean())


class DynOPool(nn.Module):
    """Learnable resizing layer (DynOPool) with a continuous per-axis stride.

    Args:
        stride: initial stride ``s`` (a float or an ``(s_h, s_w)`` pair), or an existing
            ``nn.Parameter`` of two elements to share with other sites (tied groups).
        aggregate: ``"max"`` (the paper's choice) or ``"mean"``.
        r_bounds: ``(r_min, r_max)`` bounds on the scale factor ``r = 1/s``; default
            ``(1/16, 2)``.
        group: id of the tied group this site belongs to (plain data, for reports).
        multiple: output sizes are rounded to multiples of this (an int or an ``(m_h, m_w)``
            pair; default 1), for layers after the site that need divisible sizes.
        square: both axes run at one stride, the mean of the parameter's two values (a square
            map stays square: layers after the site that read one axis's size for both, such as
            ``F.avg_pool2d(x, x.size(3))`` or a token grid of side ``sqrt(N)``).

    Output sizes come from a host copy of the stride (Python floats, DESIGN.md §7), so a forward
    pass does not wait for the device. The copy is re-read (one device-to-host copy) when the
    parameter's version counter or storage changed since it was taken: optimiser steps,
    ``clamp_``, ``copy_``, ``load_state_dict``, ``.data = ...``. Fused optimisers and in-place
    edits through ``.data`` bypass the version counter: call :func:`refresh_sizes` after them
    (the trainer calls it after optimiser steps, one transfer for all groups). While
    ``hold_sizes`` is True the copy changes only through :func:`refresh_sizes` (or when the
    parameter's storage changes: copies of the module re-read). While ``torch.compile`` or
    ``torch.export`` traces, an existing copy is used as is (no graph break).

    >>> pool = DynOPool(2.0)
    >>> pool(torch.randn(1, 3, 8, 8)).shape
    torch.Size([1, 3, 4, 4])
    """

    #: stride at which the site's output size equals its input size (``DynResize`` keeps the
    #: op's stride after it: its base is that stride); output size = ``round(H * base / s)``
    base: tuple[float, float] = (1.0, 1.0)
    # host copy of the raw stride and the (version, storage) of the parameter it was read from;
    # class-level defaults so that modules pickled before these existed still load
    _host: tuple[float, float] | None = None
    _host_key: tuple[int, int] | None = None
    hold_sizes: bool = False
    square: bool = False
    last_sizes: tuple[tuple[int, int], tuple[int, int]] | None = None  # (input, output) of the last forward

    def __init__(
        self,
        stride: float | tuple[float, float] | nn.Parameter = 2.0,
        aggregate: Aggregate = "max",
        r_bounds: tuple[float, float] = (R_MIN, R_MAX),
        group: int | None = None,
        backend: Literal["auto", "reference", "fast", "native", "triton"] = "auto",
        multiple: int | tuple[int, int] = 1,
        square: bool = False,
    ) -> None:
        super().__init__()
        if aggregate not in ("max", "mean"):
            raise ValueError(f"aggregate must be 'max' or 'mean', got {aggregate!r}")
        r_min, r_max = float(r_bounds[0]), float(r_bounds[1])
        if not 0.0 < r_min <= r_max:
            raise ValueError(f"r_bounds must satisfy 0 < r_min <= r_max, got {r_bounds}")
        if isinstance(stride, nn.Parameter):
            if stride.numel() != 2:
                raise ValueError("a shared stride parameter must have two elements (s_h, s_w)")
            self.stride = stride
        else:
            s = pair_of_floats(stride)
            if min(s) <= 0:
                raise ValueError(f"stride must be positive, got {stride}")
            self.stride = nn.Parameter(torch.tensor(s, dtype=torch.float32))
        #: the stride it was built with (plain data, not in the state dict): the converted model's
        #: starting allocation, before any budget fit or training
        self.stride_init: tuple[float, float] = tuple(float(v) for v in self.stride.detach().reshape(2).cpu().tolist())
        self.aggregate: Aggregate = aggregate
        self.r_bounds = (r_min, r_max)
        self.group = group
        self.backend = backend
        self.multiple = _multiple_pair(multiple)
        self.square = bool(square)

    def effective_stride(self, values: list[float] | tuple[float, float]) -> tuple[float, float]:
        """``values`` (a raw ``(s_h, s_w)``) as the site runs them: their mean on both axes when ``square``."""
        if self.square:
            s = square_mean(values, self.stride.dtype)
            return s, s
        return float(values[0]), float(values[1])

    def stride_tensor(self) -> Tensor:
        """The stride parameter as the site runs it (differentiable): the two values' mean on both
        axes when ``square``, else the parameter itself."""
        return self.stride.mean().repeat(2) if self.square else self.stride

    @property
    def r(self) -> tuple[float, float]:
        """Current scale factor ``(r_h, r_w) = 1 / s`` (within the bounds)."""
        s_h, s_w = self.stride_value
        return 1.0 / s_h, 1.0 / s_w

    @property
    def stride_value(self) -> tuple[float, float]:
        """Current stride ``(s_h, s_w)`` as floats, clamped to the bounds."""
        lo, hi = 1.0 / self.r_bounds[1], 1.0 / self.r_bounds[0]
        s_h, s_w = self.effective_stride(self.stride.detach().cpu().tolist())
        return min(max(s_h, lo), hi), min(max(s_w, lo), hi)

    def output_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """Output ``(H', W')`` the next forward gives an input of spatial size ``(H, W)``."""
        lo, hi = 1.0 / self.r_bounds[1], 1.0 / self.r_bounds[0]
        s_h, s_w = (min(max(v, lo), hi) for v in self.host_stride())
        return dynopool_output_size(size[0], s_h, self.multiple[0]), dynopool_output_size(size[1], s_w, self.multiple[1])

    def frozen(self, in_size: tuple[int, int]) -> nn.Module:
        """A static module computing this site's output for ``in_size`` inputs (``freeze``)."""
        from .frozen import frozen_resample

        return frozen_resample(in_size, self.output_size(in_size), self.aggregate)

    @torch.no_grad()
    def clamp_(self) -> None:
        """Project the stride parameter back inside the bounds (call after optimiser steps); a
        ``square`` site's two values are set to their mean first."""
        if self.square:
            self.stride.copy_(self.stride.mean().expand_as(self.stride))
        self.stride.clamp_(1.0 / self.r_bounds[1], 1.0 / self.r_bounds[0])

    def host_stride(self) -> tuple[float, float]:
        """The raw (unclamped) stride as Python floats: the host copy, re-read if the parameter changed."""
        if self._host is not None and torch.compiler.is_compiling():
            # compiled code guards on these floats (no version or storage check in the graph):
            # under torch.compile / torch.export sizes change only through refresh_sizes
            return self._host
        key = _param_key(self.stride)
        # a held copy stays only for the storage it was read from (a deep copy or a moved model re-reads)
        held = self.hold_sizes and self._host_key is not None and self._host_key[1] == key[1]
        if self._host is None or (self._host_key != key and not held):
            self._set_host(self.stride.detach().cpu().tolist())
        return self._host  # type: ignore[return-value]

    def _set_host(self, values: list[float]) -> None:
        self._host = self.effective_stride(values)
        self._host_key = _param_key(self.stride)

    def _resize(self, x: Tensor) -> Tensor:
        """The site's math (``DynResize`` overrides it)."""
        return dynopool2d(x, self.stride_tensor(), self.aggregate, self.r_bounds, self.backend, self.multiple, self.host_stride())

    def forward(self, x: Tensor) -> Tensor:
        y = self._resize(x)
        self.last_sizes = (tuple(x.shape[-2:]), tuple(y.shape[-2:]))  # for size statistics (trainer)
        return y

    def _repr_detail(self) -> str:
        return f"aggregate={self.aggregate!r}"

    def extra_repr(self) -> str:
        s_h, s_w = self.stride_value
        group = "" if self.group is None else f", group={self.group}"
        multiple = "" if self.multiple == (1, 1) else f", multiple={self.multiple}"
        square = ", square=True" if self.square else ""
        return f"stride=({s_h:.4g}, {s_w:.4g}), {self._repr_detail()}{group}{multiple}{square}"


def _param_key(p: Tensor) -> tuple[int, int]:
    return p._version, p.data_ptr()


def _multiple_pair(multiple: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    pair = tuple(int(v) for v in multiple) if isinstance(multiple, (tuple, list)) else (int(multiple),) * 2
    if len(pair) != 2 or min(pair) < 1:
        raise ValueError(f"multiple must be a positive int or a pair of them, got {multiple!r}")
    return pair  # type: ignore[return-value]


def dynopool_modules(model: nn.Module) -> list[tuple[str, DynOPool]]:
    """All DynOPool modules of ``model`` with their qualified names, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, DynOPool)]


def scale_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The distinct stride parameters of ``model`` (one per tied group), in module order."""
    seen: dict[int, nn.Parameter] = {}
    for _, m in dynopool_modules(model):
        seen.setdefault(id(m.stride), m.stride)
    return list(seen.values())


def clamp_strides_(model: nn.Module) -> None:
    """Project every DynOPool stride of ``model`` back inside its bounds."""
    for _, m in dynopool_modules(model):
        m.clamp_()


def refresh_sizes(model: nn.Module, hold: bool | None = None) -> None:
    """Copy every DynOPool stride of ``model`` to the host in one transfer (sizes for the next forwards).

    ``hold``: when given, set every site's ``hold_sizes`` (True: sizes change only at the next
    ``refresh_sizes``; False: they follow every change of the parameter again).
    """
    modules = [m for _, m in dynopool_modules(model)]
    params = scale_parameters(model)
    if not params:
        return
    dev, dtype = params[0].device, params[0].dtype  # (float64 does not exist on every device)
    values = torch.stack([p.detach().reshape(2).to(dev, dtype) for p in params]).cpu().tolist()
    by_param = {id(p): v for p, v in zip(params, values)}
    for m in modules:
        m._set_host(by_param[id(m.stride)])
        if hold is not None:
            m.hold_sizes = hold


__all__ += ["dynopool_modules", "scale_parameters", "clamp_strides_", "refresh_sizes", "square_mean"]
