"""An upsampling joined with a skip connection follows the skip's size (DESIGN.md §2, "Tying").

A scale-factor upsampling (``F.interpolate(x, scale_factor=2)``, ``nn.Upsample``) whose output
is added to, multiplied with or concatenated (along channels) to another map of its size
(octave convolutions, FPN top-down paths, HRNet's fuse layers) must give that map's size,
whatever the groups on either branch learn. As a site it was tied to that map's group, but its
size is its input's times a factor, which no shared stride keeps equal to a map on another
path: validation reverted it, and the groups whose moves reached the join with it. Rewritten
before conversion as interpolation to the other map's size (``size=other.shape[-2:]``), it
adapts to whatever the groups learn; at the reference it is the same op, bit for bit, because
only an upsampling whose factor maps its input exactly onto that size is rewritten.

Like ``follow_grids``, a pure function of the traced graph (with ``tensor_meta``) and the
candidate sites, so ``apply_plan`` replays it.
"""
from __future__ import annotations

import operator

import torch.nn.functional as F
from torch import fx, nn

from .grouping import _tensor_args
from .joins import joined_operands, spatial
from .sites import _INTERP_PARAMS, Candidate, _bind

__all__ = ["follow_skips", "SKIP_REASON"]

SKIP_REASON = "upsampling joined with a map of its size: follows that map's size"


def _depends_on(node: fx.Node, ancestor: fx.Node, limit: int = 5000) -> bool:
    """Whether ``node`` is computed from ``ancestor`` (a bounded walk up its inputs)."""
    seen, stack = set(), [node]
    while stack and len(seen) < limit:
        n = stack.pop()
        if n is ancestor:
            return True
        if n.name in seen:
            continue
        seen.add(n.name)
        stack.extend(n.all_input_nodes)
    return len(seen) >= limit  # unknown: as if it did


def _partner(node: fx.Node, stride: tuple[float, float]) -> fx.Node | None:
    """The map ``node``'s only user joins it with, of its size and not computed from it, where
    ``node``'s factor maps its input exactly onto that size; else None."""
    users = list(node.users)
    source = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else node.kwargs.get("input")
    out, size_in = spatial(node), spatial(source) if isinstance(source, fx.Node) else None
    if len(users) != 1 or out is None or size_in is None:
        return None
    if any(abs(n / s - o) > 1e-9 for n, s, o in zip(size_in, stride, out)):
        return None
    joined = joined_operands(users[0], [a for a in _tensor_args(users[0]) if spatial(a) is not None])
    if node not in joined:
        return None
    return next((p for p in joined if p is not node and spatial(p) == out and not _depends_on(p, node)), None)


def _interpolation(gm: fx.GraphModule, node: fx.Node) -> tuple[str, bool | None]:
    """The mode and ``align_corners`` of an upsampling node (module or function)."""
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        return m.mode, m.align_corners
    bound = _bind(node, _INTERP_PARAMS)
    return bound.get("mode", "nearest"), bound.get("align_corners")


def follow_skips(gm: fx.GraphModule, candidates: list[Candidate]) -> list[str]:
    """Rewrite, in place, every convertible scale-factor upsampling whose output a join ties to
    another map of its size as interpolation to that map's size; its candidate is then left
    alone (``SKIP_REASON``). One note naming them."""
    by_node = {c.node: c for c in candidates}
    followed: list[str] = []
    for node in list(gm.graph.nodes):
        cand = by_node.get(node.name)
        if cand is None or cand.kind != "interpolate" or cand.stride is None or cand.skip_reason or max(cand.stride) >= 1:
            continue  # upsamplings only: a downsampling is a site that ties to the branch it joins
        if node.op == "call_module" and not isinstance(gm.get_submodule(node.target), nn.Upsample):
            continue
        partner = _partner(node, cand.stride)
        if partner is None:
            continue
        join = next(iter(node.users))
        mode, align = _interpolation(gm, node)
        source = node.args[0] if node.args else node.kwargs["input"]
        with gm.graph.inserting_before(join):  # after the partner: the join reads both
            shape = gm.graph.call_function(getattr, (partner, "shape"))
            size = gm.graph.call_function(operator.getitem, (shape, slice(-2, None)))
            kwargs = {"size": size, "mode": mode} if align is None else {"size": size, "mode": mode, "align_corners": align}
            resized = gm.graph.call_function(F.interpolate, (source,), kwargs)
        resized.meta = dict(node.meta)
        node.replace_all_uses_with(resized)
        gm.graph.erase_node(node)
        del by_node[node.name]
        cand.node, cand.stride, cand.skip_reason = resized.name, None, SKIP_REASON
        by_node[resized.name] = cand
        followed.append(cand.name)
    if not followed:
        return []
    gm.graph.lint()
    gm.recompile()
    names = ", ".join(followed[:4]) + (f" and {len(followed) - 4} more" if len(followed) > 4 else "")
    return [f"{len(followed)} upsampling{'s' if len(followed) > 1 else ''} joined with a map of {'their' if len(followed) > 1 else 'its'} "
            f"size interpolate{'' if len(followed) > 1 else 's'} to that map's size, which the groups on either branch may change: {names}"]
