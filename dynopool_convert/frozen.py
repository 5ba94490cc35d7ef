"""Static stand-ins for learnable resizing sites, with their sizes fixed as Python ints (DESIGN.md §6).

``FrozenResample`` is DynOPool's forward at one input size: bilinear resize to ``2H' x 2W'``
(half-pixel centres, border clamped: ``F.interpolate(..., align_corners=False)``), then a 2x2
max or average pool. Where the frozen size is an exact 2x (``H = 2 H'`` and ``W = 2 W'``) the
resize is the identity and ``frozen_resample`` returns the plain ``nn.MaxPool2d(2)`` /
``nn.AvgPool2d(2)``. ``frozen_adaptive_avg`` does the same for the adaptive average pool
that holds a pinned site's input size: an identity, a plain average pool, or two small
averaging matrices (exact, standard ``MatMul`` ops) where the sizes do not divide;
``frozen_adaptive_max`` for the adaptive max pool: a plain max pool, or the max over each bin's
rows then its columns (static slices) where they do not.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FrozenResample", "FrozenAdaptiveAvg", "FrozenAdaptiveMax", "frozen_resample", "frozen_adaptive_avg",
           "frozen_adaptive_max", "static_resample_pool"]


def static_resample_pool(x: Tensor, out_h: int, out_w: int, aggregate: str) -> Tensor:
    """DynOPool's forward at fixed output size ``(out_h, out_w)`` from standard ops only."""
    up = F.interpolate(x, size=(2 * out_h, 2 * out_w), mode="bilinear", align_corners=False)
    return F.max_pool2d(up, 2) if aggregate == "max" else F.avg_pool2d(up, 2)


class FrozenResample(nn.Module):
    """Bilinear resize to ``2H' x 2W'`` then a 2x2 ``max``/``mean`` pool, at a fixed output size."""

    def __init__(self, out_size: tuple[int, int], aggregate: str, in_size: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.out_size = (int(out_size[0]), int(out_size[1]))
        self.aggregate = aggregate
        self.in_size = None if in_size is None else (int(in_size[0]), int(in_size[1]))  # for reports only

    def forward(self, x: Tensor) -> Tensor:
        return static_resample_pool(x, self.out_size[0], self.out_size[1], self.aggregate)

    def extra_repr(self) -> str:
        frm = "" if self.in_size is None else f"{self.in_size[0]}x{self.in_size[1]} -> "
        return f"{frm}{self.out_size[0]}x{self.out_size[1]}, aggregate={self.aggregate!r}"


def frozen_resample(in_size: tuple[int, int], out_size: tuple[int, int], aggregate: str) -> nn.Module:
    """The static module computing DynOPool's output for an ``in_size`` input: a plain 2x2
    pool where ``in_size == 2 * out_size``, else ``FrozenResample``."""
    if int(in_size[0]) == 2 * int(out_size[0]) and int(in_size[1]) == 2 * int(out_size[1]):
        return nn.MaxPool2d(2) if aggregate == "max" else nn.AvgPool2d(2)
    return FrozenResample(out_size, aggregate, in_size)


def _bins(n_in: int, n_out: int) -> list[tuple[int, int]]:
    """Adaptive pooling's bins: output ``i`` reads ``[floor(i n_in / n_out), ceil((i + 1) n_in / n_out))``."""
    return [((i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)) for i in range(n_out)]


def _averaging_matrix(n_in: int, n_out: int) -> Tensor:
    """Row ``i`` averages input bin ``i`` (``_bins``)."""
    a = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i, (lo, hi) in enumerate(_bins(n_in, n_out)):
        a[i, lo:hi] = 1.0 / (hi - lo)
    return a


class FrozenAdaptiveAvg(nn.Module):
    """``adaptive_avg_pool2d`` from a fixed input size as ``A_h @ x @ A_w^T`` (standard matmuls)."""

    def __init__(self, in_size: tuple[int, int], out_size: tuple[int, int]) -> None:
        super().__init__()
        self.register_buffer("rows", _averaging_matrix(int(in_size[0]), int(out_size[0])).float(), persistent=False)
        self.register_buffer("cols_t", _averaging_matrix(int(in_size[1]), int(out_size[1])).t().contiguous().float(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return torch.matmul(torch.matmul(self.rows.to(x.dtype), x), self.cols_t.to(x.dtype))


def _frozen_adaptive(in_size: tuple[int, int], out_size: tuple[int, int], pool: type, general: type) -> nn.Module:
    """``nn.Identity`` at equal sizes, ``pool(kernel)`` where they divide, else ``general``."""
    h, w = int(in_size[0]), int(in_size[1])
    oh, ow = int(out_size[0]), int(out_size[1])
    if (h, w) == (oh, ow):
        return nn.Identity()
    if h % oh == 0 and w % ow == 0:
        return pool((h // oh, w // ow))
    return general((h, w), (oh, ow))


def frozen_adaptive_avg(in_size: tuple[int, int], out_size: tuple[int, int]) -> nn.Module:
    """A static module equal to ``nn.AdaptiveAvgPool2d(out_size)`` on ``in_size`` inputs."""
    return _frozen_adaptive(in_size, out_size, nn.AvgPool2d, FrozenAdaptiveAvg)


class FrozenAdaptiveMax(nn.Module):
    """``adaptive_max_pool2d`` from a fixed input size: the max over each bin's rows, then over
    its columns (a rectangle's max, exactly), by static slices."""

    def __init__(self, in_size: tuple[int, int], out_size: tuple[int, int]) -> None:
        super().__init__()
        self.rows = _bins(int(in_size[0]), int(out_size[0]))
        self.cols = _bins(int(in_size[1]), int(out_size[1]))

    def forward(self, x: Tensor) -> Tensor:
        x = torch.cat([x[..., lo:hi, :].amax(dim=-2, keepdim=True) for lo, hi in self.rows], dim=-2)
        return torch.cat([x[..., lo:hi].amax(dim=-1, keepdim=True) for lo, hi in self.cols], dim=-1)


def frozen_adaptive_max(in_size: tuple[int, int], out_size: tuple[int, int]) -> nn.Module:
    """A static module equal to ``nn.AdaptiveMaxPool2d(out_size)`` on ``in_size`` inputs."""
    return _frozen_adaptive(in_size, out_size, nn.MaxPool2d, FrozenAdaptiveMax)
