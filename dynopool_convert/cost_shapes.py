"""How the cost model (``cost_model.py``) reads the shape passes of the annotated graph
(``annotated_graph.py``): value summaries compared at two stride settings. Package-internal."""
from __future__ import annotations

from typing import Any

from torch import fx

from .annotated_graph import TensorInfo

# --------------------------------------------------------------------------------------------
# helpers


def _shape_of(info: Any, others: bool = False) -> Any:
    """Tensors as their shapes; other values as None (not compared: an int that changes carries
    no size, the tensors built from it are checked on their own), or as they are with
    ``others`` (for messages)."""
    if isinstance(info, TensorInfo):
        return info.shape
    if isinstance(info, (list, tuple)):
        return tuple(_shape_of(v, others) for v in info)
    return info if others else None


def _is_shape_like(info: Any) -> bool:
    if isinstance(info, bool):
        return False
    if isinstance(info, int):
        return True
    return isinstance(info, (list, tuple)) and len(info) > 0 and all(_is_shape_like(v) for v in info)


def _has_tensor(info: Any) -> bool:
    if isinstance(info, TensorInfo):
        return True
    return isinstance(info, (list, tuple)) and any(_has_tensor(v) for v in info)


def _flat(info: Any) -> list:
    if isinstance(info, (list, tuple)) and not isinstance(info, TensorInfo):
        return [v for item in info for v in _flat(item)]
    return [info]


def _shows(info: Any, size: tuple[int, int]) -> bool:
    """Whether every tensor of ``info`` has ``size`` as its NCHW or NHWC spatial dims."""
    return all(
        len(t.shape) == 4 and size in (t.shape[2:4], t.shape[1:3]) for t in _flat(info) if isinstance(t, TensorInfo)
    )


def _maps(info_r: Any, info_p: Any) -> bool:
    """Whether one output observed at two strides is a 4-d tensor at both."""
    return isinstance(info_r, TensorInfo) and isinstance(info_p, TensorInfo) and len(info_r.shape) == len(info_p.shape) == 4


def _shows_both(info_r: Any, info_p: Any, size_r: tuple[int, int], size_p: tuple[int, int],
                axes: tuple[int, ...] = (2, 1)) -> bool:
    """Whether one tensor observed at two strides has ``size_r``/``size_p`` as its spatial dims,
    in one layout at both (``axes``: where H is; N x C x H x W: 2, channels-last: 1)."""
    if not _maps(info_r, info_p):
        return False
    return any(info_r.shape[a:a + 2] == size_r and info_p.shape[a:a + 2] == size_p for a in axes)


def _inherits(info_r: Any, info_p: Any, size_r: tuple[int, int], size_p: tuple[int, int]) -> bool:
    """Whether an output observed at two strides follows a class of sizes ``size_r``/``size_p``.

    Each tensor must show the size (NCHW or NHWC) at both with its batch fixed, or have a
    number of elements in proportion to the area (flattened tokens, windows as a batch); each
    int (a shape) must not change or change exactly as the class's height or width does, or
    in proportion to its area (``ceil(h / p) * p`` does not: a pad to that multiple is a class
    of its own, ``cost_rules._pad_multiple_rules``).
    """
    flat_r, flat_p = _flat(info_r), _flat(info_p)
    if len(flat_r) != len(flat_p):
        return False
    a_r, a_p = size_r[0] * size_r[1], size_p[0] * size_p[1]
    for r, p in zip(flat_r, flat_p):
        if isinstance(r, TensorInfo) and isinstance(p, TensorInfo):
            shows = len(r.shape) == 4 and (
                (r.shape[2:4] == size_r and p.shape[2:4] == size_p) or (r.shape[1:3] == size_r and p.shape[1:3] == size_p)
            )
            # a tensor showing the size whose other dims move too (GCViT's global query repeated
            # once per window: N*nW x 7 x 7 x C) follows the windows' map, not this size
            if p.numel * a_r != r.numel * a_p and (not shows or r.shape[0] != p.shape[0]):
                return False
        elif isinstance(r, int) and not isinstance(r, bool) and isinstance(p, int):
            # a count in proportion to the area (N * number of windows) follows it too
            if r != p and (r, p) not in ((size_r[0], size_p[0]), (size_r[1], size_p[1])) and r * a_p != p * a_r:
                return False
        elif type(r) is not type(p):
            return False
    return True


def _substitute(value: Any, summary: dict[fx.Node, Any]) -> Any:
    """Replace node references by their recorded summaries (plain values stay)."""
    return fx.node.map_arg(value, lambda a: summary.get(a))
