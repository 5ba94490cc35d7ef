"""Which operands of a graph node must keep equal spatial sizes (DESIGN.md §2, "Tying").

One rule per kind of join, looked up in a first-match table, so that a new join pattern is one
entry: elementwise ops with broadcasting (functions, ``Tensor`` methods, in-place methods),
concatenation and stacking (operands in a list or tuple), ``x.expand_as(y)``-style ops sized by
another tensor, ``einsum``/``matmul`` contracting spatial axes, the keys and values of
``scaled_dot_product_attention``, and leaf modules called with several spatial tensors.
``grid_sample`` is not a join but takes its output size from its grid, not from its input, and
attention's output has its queries' size: ``origin_source`` says which operand sizes a node's
output.

A tensor's spatial size is its last two axes when it has at least four: ``(N, C, H, W)``, and
``(N, k, C, H, W)`` for a stack of maps (``torch.stack(branches, dim=1)``).
"""
from __future__ import annotations

import operator
import re
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import fx

__all__ = ["spatial", "joined_operands", "origin_source", "ELEMENTWISE", "CONCAT"]

#: elementwise ops whose tensor operands broadcast together
ELEMENTWISE: set[Any] = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.iadd, operator.isub,
    operator.imul, operator.itruediv,
    torch.add, torch.sub, torch.subtract, torch.mul, torch.multiply, torch.div, torch.divide, torch.maximum,
    torch.minimum, torch.where, torch.lerp, torch.addcmul, torch.addcdiv, torch.max, torch.min, torch.fmax,
    torch.fmin, torch.pow, torch.atan2, torch.hypot, torch.eq, torch.ne, torch.gt, torch.lt, torch.ge, torch.le,
    torch.logical_and, torch.logical_or, torch.masked_fill, torch.broadcast_tensors,
    torch.Tensor.add, torch.Tensor.sub, torch.Tensor.mul, torch.Tensor.div, torch.Tensor.add_, torch.Tensor.mul_,
    F.cosine_similarity, F.pairwise_distance,
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "truediv", "maximum", "minimum", "max", "min", "lerp",
    "lerp_", "addcmul", "addcmul_", "addcdiv", "addcdiv_", "where", "masked_fill", "masked_fill_", "copy_", "pow",
    "expand_as", "view_as", "reshape_as", "eq", "ne", "gt", "lt", "ge", "le", "__and__", "__or__",
}

#: joins along a dimension: the operands come in a list or tuple
CONCAT: set[Any] = {torch.cat, torch.concat, torch.concatenate, torch.stack, torch.hstack, torch.vstack, torch.dstack}

MATMUL: set[Any] = {torch.matmul, operator.matmul, torch.bmm, "matmul", "bmm", "__matmul__"}


def spatial(node: object) -> tuple[int, int] | None:
    """The spatial size (last two axes) of a node's tensor of rank >= 4, else None."""
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    if meta is None or not hasattr(meta, "shape") or len(meta.shape) < 4:
        return None
    return int(meta.shape[-2]), int(meta.shape[-1])


def _broadcast_join(operands: list[fx.Node]) -> list[fx.Node]:
    """Operands whose sizes are not broadcast: the largest size or 1 on each axis, and the
    largest on at least one axis that is not 1 (all of them when every operand is 1x1)."""
    sizes = {a: spatial(a) for a in operands if spatial(a) is not None}
    if not sizes:
        return []
    top = tuple(max(s[i] for s in sizes.values()) for i in (0, 1))
    return [
        a for a, s in sizes.items()
        if all(v in (t, 1) for v, t in zip(s, top)) and (top == (1, 1) or any(v == t > 1 for v, t in zip(s, top)))
    ]


def _concat_dim(node: fx.Node) -> int:
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
    return dim if isinstance(dim, int) else 0


def _concat_join(node: fx.Node, operands: list[fx.Node]) -> list[fx.Node]:
    dim = _concat_dim(node)
    ranks = {len(a.meta["tensor_meta"].shape) for a in operands if spatial(a) is not None}
    if node.target in (torch.cat, torch.concat, torch.concatenate) and ranks and any(dim in (r - 2, r - 1, -2, -1) for r in ranks):
        # concatenated along a spatial axis: the other axis must match; tie them all
        return [a for a in operands if spatial(a) is not None]
    return _broadcast_join(operands)


def _einsum_join(node: fx.Node, operands: list[fx.Node]) -> list[fx.Node]:
    equation = node.args[0] if node.args and isinstance(node.args[0], str) else None
    if equation is None:
        return []
    inputs = equation.replace(" ", "").split("->")[0].split(",")
    tensors: list[fx.Node] = []
    fx.node.map_arg(node.args[1:], lambda a: tensors.append(a) or a)
    letters: dict[fx.Node, set[str]] = {}
    for sub, a in zip(inputs, tensors):
        if a in operands and spatial(a) is not None:
            axes = re.findall(r"\.\.\.|[a-zA-Z]", sub)
            letters[a] = set(axes[-2:]) - {"..."}
    return [a for a in letters if any(letters[a] & letters[b] for b in letters if b is not a)]


def _matmul_join(node: fx.Node, operands: list[fx.Node]) -> list[fx.Node]:
    # (..., H, W) @ (..., H', W') contracts W with H': both operands' grids must keep their sizes
    return [a for a in operands if spatial(a) is not None] if len(operands) >= 2 else []


def _attention_parts(node: fx.Node) -> list[object]:
    """``(query, key, value)`` of a ``scaled_dot_product_attention`` call, by position or name."""
    names = ("query", "key", "value")
    return [node.args[i] if len(node.args) > i else node.kwargs.get(name) for i, name in enumerate(names)]


def _attention_join(node: fx.Node, operands: list[fx.Node]) -> list[fx.Node]:
    # keys and values must have one length (queries need not: PVT's pooled keys); the output
    # has the queries' (origin_source)
    _, key, value = _attention_parts(node)
    return [a for a in (key, value) if a in operands and spatial(a) is not None] if key is not value else []


def _leaf_join(node: fx.Node, operands: list[fx.Node]) -> list[fx.Node]:
    # a module we cannot see into, called with several maps, is assumed to combine them
    return _broadcast_join(operands) if node.op == "call_module" else []


_RULES: list[tuple[Callable[[fx.Node], bool], Callable[[fx.Node, list[fx.Node]], list[fx.Node]]]] = [
    (lambda n: n.op in ("call_function", "call_method") and _hashable(n.target) in CONCAT, _concat_join),
    (lambda n: n.op in ("call_function", "call_method") and _hashable(n.target) in ELEMENTWISE, lambda n, ops: _broadcast_join(ops)),
    (lambda n: n.target is torch.einsum, _einsum_join),
    (lambda n: is_matmul(n), _matmul_join),
    (lambda n: n.target is F.scaled_dot_product_attention, _attention_join),
    (lambda n: n.op == "call_module", _leaf_join),
]


def _hashable(target: Any) -> Any:
    try:
        hash(target)
    except TypeError:
        return None
    return target


def is_matmul(node: fx.Node) -> bool:
    """``a @ b``, ``torch.matmul``, ``torch.bmm`` or their methods."""
    return node.op in ("call_function", "call_method") and _hashable(node.target) in MATMUL


def joined_operands(node: fx.Node, operands: list[fx.Node]) -> list[fx.Node]:
    """The ``operands`` (tensor inputs with a known size origin) whose spatial sizes ``node``
    requires to be equal; fewer than two means the node joins nothing."""
    for match, rule in _RULES:
        if match(node):
            return rule(node, operands)
    return []


def origin_source(node: fx.Node) -> fx.Node | None:
    """The operand that sizes ``node``'s output where another does, or where the node joins
    others (``grid_sample``: the grid; attention: the queries), else None."""
    if node.target is F.scaled_dot_product_attention:
        query = _attention_parts(node)[0]
        return query if isinstance(query, fx.Node) else None
    if node.target is F.grid_sample:
        grid = node.kwargs.get("grid", node.args[1] if len(node.args) > 1 else None)
        return grid if isinstance(grid, fx.Node) else None
    return None
