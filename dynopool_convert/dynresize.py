"""DynResize: the learnable resize of the ``exact`` placement (DESIGN.md §6, "Exact at init").

A site converted with placement ``exact`` keeps its op (a strided conv or pool, an upsampling)
and gets a ``DynResize`` in front of it that resizes the input ``H -> round(H * s0 / s)``, where
``s`` is the group's learnable stride and ``s0`` its initial value: at init the sizes are equal
and the resize is the identity, so the converted model computes what the original computed, at
the same FLOPs. The op after it still divides by its own stride ``s0``, so the site's output is
about ``H / s``: the group's stride means what it means for DynOPool, and a DynResize shares
tied groups' parameters with DynOPool sites.

``dynresize2d`` is the math: bilinear sampling at half-pixel centres, one sample per output
pixel (``F.interpolate(mode="bilinear", align_corners=False)``'s rule, border-clamped), with the
straight-through estimator of DynOPool so that the gradient reaches ``s`` through the sample
positions. ``DynResize`` is the module (a ``DynOPool`` subclass, so that the cost model, budget,
report, validation and checkpoints treat it as a site).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._helpers import pair_of_floats
from .dynopool import R_MAX, R_MIN, DynOPool, _lerp_axis, dynopool_output_size

__all__ = ["DynResize", "dynresize2d", "dynresize_output_size", "resample_bilinear", "FrozenResize"]


def dynresize_output_size(size: int, stride: float, base: float, multiple: int = 1) -> int:
    """``round(size * base / stride)`` (half to even, at least 1, to a multiple of ``multiple``).

    >>> dynresize_output_size(56, 2.0, 2.0), dynresize_output_size(56, 2.5, 2.0), dynresize_output_size(7, 2.0, 2.0)
    (56, 45, 7)
    """
    return dynopool_output_size(size, float(stride) / float(base), multiple)


def _axis_samples(n_out: int, cell: Tensor, size: int, device) -> tuple[Tensor, Tensor, Tensor]:
    """Neighbours and weight (float64) of the ``n_out`` samples at ``(k + 1/2) * cell - 1/2``
    (clamped to the border)."""
    k = torch.arange(n_out, dtype=torch.float64, device=device)
    q = ((k + 0.5) * cell.to(torch.float64) - 0.5).clamp(0.0, float(size - 1))
    i0 = q.detach().floor().long().clamp_(max=size - 1)
    i1 = (i0 + 1).clamp_(max=size - 1)
    return i0, i1, q - i0.to(torch.float64)


def dynresize2d(
    x: Tensor,
    stride: Tensor,
    base: tuple[float, float],
    r_bounds: tuple[float, float] = (R_MIN, R_MAX),
    multiple: tuple[int, int] = (1, 1),
    host_stride: tuple[float, float] | None = None,
    antialias: bool = False,
) -> Tensor:
    """Resize ``x`` (N x C x H x W) to ``round(H * base / stride)`` by bilinear sampling.

    The identity (``x`` itself) when the size does not change and no stride gradient is
    needed; ``F.interpolate`` when none is needed; otherwise a separable bilinear read whose
    sample positions carry the straight-through gradient to ``stride`` (the same values as
    ``F.interpolate`` up to float rounding, and exactly ``x`` at equal sizes). ``host_stride``:
    the stride's value as Python floats, as for ``dynopool2d`` (default: read ``stride``).
    ``antialias``: a shrink (either axis smaller) is filtered as ``F.interpolate(antialias=True)``
    does (a triangle filter widened by the shrink ratio) instead of one sample per pixel; the
    stride's gradient still comes from the bilinear sample positions.
    """
    if x.dim() != 4:
        raise ValueError(f"DynResize expects an N x C x H x W tensor, got shape {tuple(x.shape)}")
    r_min, r_max = r_bounds
    s = stride.clamp(1.0 / r_max, 1.0 / r_min)
    h, w = int(x.shape[2]), int(x.shape[3])
    if host_stride is None:
        s_h, s_w = (float(v) for v in s.detach().cpu().tolist())
    else:
        s_h, s_w = (min(max(float(v), 1.0 / r_max), 1.0 / r_min) for v in host_stride)
    out_h = dynresize_output_size(h, s_h, base[0], multiple[0])
    out_w = dynresize_output_size(w, s_w, base[1], multiple[1])
    # a traced graph holds the frozen op (standard ops, no gradient to s), as for DynOPool
    shrink = antialias and (out_h < h or out_w < w)
    if torch.jit.is_tracing() or not (torch.is_grad_enabled() and stride.requires_grad):
        if (out_h, out_w) == (h, w):
            return x
        return F.interpolate(x, size=(out_h, out_w), mode="bilinear", align_corners=False, antialias=shrink)
    # straight-through estimator: integer sizes forward, continuous H * s0 / s backward; positions
    # in float64, so that the samples sit where F.interpolate puts them (float32 is off by ~1e-6)
    s = s.to(torch.float64)
    cont_h, cont_w = h / (s[0] / base[0]), w / (s[1] / base[1])
    cell_h = h / (cont_h + (out_h - cont_h).detach())
    cell_w = w / (cont_w + (out_w - cont_w).detach())
    if not shrink:
        return resample_bilinear(x, cell_h, cell_w, out_h, out_w)
    # the filtered values forward (their gradient to x), the sample positions' gradient to s
    positions = resample_bilinear(x.detach(), cell_h, cell_w, out_h, out_w)
    filtered = F.interpolate(x, size=(out_h, out_w), mode="bilinear", align_corners=False, antialias=True)
    return filtered + (positions - positions.detach()).to(filtered.dtype)


def resample_bilinear(x: Tensor, cell_h: Tensor, cell_w: Tensor, out_h: int, out_w: int) -> Tensor:
    """One border-clamped bilinear sample per output pixel at ``(k + 1/2) * cell - 1/2``;
    differentiable in ``x`` and in the cell sizes (the sample positions)."""
    _, _, h, w = x.shape
    dtype = torch.promote_types(x.dtype, torch.float32)
    i0, i1, wh = _axis_samples(out_h, cell_h, h, x.device)
    j0, j1, ww = _axis_samples(out_w, cell_w, w, x.device)
    rows_done = _lerp_axis(x.to(dtype), 2, i0, i1, wh.to(dtype))
    return _lerp_axis(rows_done, 3, j0, j1, ww.to(dtype)).to(x.dtype)


class FrozenResize(nn.Module):
    """A bilinear resize to a fixed size (Python ints): a frozen ``DynResize`` (``antialias``
    filters a shrink, as the DynResize it froze did)."""

    def __init__(self, size: tuple[int, int], antialias: bool = False) -> None:
        super().__init__()
        self.size = (int(size[0]), int(size[1]))
        self.antialias = bool(antialias)

    def forward(self, x: Tensor) -> Tensor:
        shrink = self.antialias and (self.size[0] < x.shape[2] or self.size[1] < x.shape[3])
        return F.interpolate(x, size=self.size, mode="bilinear", align_corners=False, antialias=shrink)

    def extra_repr(self) -> str:
        return f"size={self.size}" + (", antialias=True" if self.antialias else "")


class DynResize(DynOPool):
    """Learnable bilinear resize ``H -> round(H * s0 / s)``, the identity at ``s = s0``.

    Args:
        stride: initial stride ``s`` or a shared two-element ``nn.Parameter`` (tied groups).
        base: ``s0``, the stride of the op after it (the group's initial stride).
        r_bounds, group, multiple, square: as for ``DynOPool`` (``multiple`` rounds this module's
            output size).
        antialias: filter a shrink (``F.interpolate(antialias=True)``) instead of sampling it.

    >>> resize = DynResize(2.0, base=2.0)
    >>> x = torch.randn(1, 3, 7, 7)
    >>> bool((resize(x) == x).all()), resize.output_size((56, 56))
    (True, (56, 56))
    """

    def __init__(
        self,
        stride: float | tuple[float, float] | nn.Parameter = 2.0,
        base: float | tuple[float, float] = 2.0,
        r_bounds: tuple[float, float] = (R_MIN, R_MAX),
        group: int | None = None,
        multiple: int | tuple[int, int] = 1,
        antialias: bool = False,
        square: bool = False,
    ) -> None:
        super().__init__(stride, "mean", r_bounds, group, "reference", multiple, square)
        self.antialias = bool(antialias)
        self.base = pair_of_floats(base)
        if min(self.base) <= 0:
            raise ValueError(f"base must be positive, got {base}")
        self.aggregate = None  # type: ignore[assignment]  # no aggregation: one sample per pixel

    def output_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """Output ``(H'', W'')`` the next forward gives an input of spatial size ``(H, W)``."""
        lo, hi = 1.0 / self.r_bounds[1], 1.0 / self.r_bounds[0]
        s_h, s_w = (min(max(v, lo), hi) for v in self.host_stride())
        return (dynresize_output_size(size[0], s_h, self.base[0], self.multiple[0]),
                dynresize_output_size(size[1], s_w, self.base[1], self.multiple[1]))

    def frozen(self, in_size: tuple[int, int]) -> nn.Module:
        """A static module with this resize's output size at ``in_size`` fixed as Python ints."""
        out = self.output_size(tuple(in_size))
        return nn.Identity() if tuple(out) == tuple(in_size) else FrozenResize(out, self.antialias)

    def _resize(self, x: Tensor) -> Tensor:
        return dynresize2d(x, self.stride_tensor(), self.base, self.r_bounds, self.multiple, self.host_stride(), self.antialias)

    def _repr_detail(self) -> str:
        return f"base=({self.base[0]:.4g}, {self.base[1]:.4g})"
