"""Grid sizes computed from a site's input, read from its output instead.

Research code often derives a patch embedding's grid from the image it was given: PVT's and
Twins' ``B, C, H, W = x.shape; x = self.proj(x) ...; return x, (H // p, W // p)``, the sizes
then reshaping tokens back into a map. Once ``proj`` is a site its output moves with the
learned stride and those reshapes break (the group was reverted). ``follow_site_sizes``
rewrites, on the traced graph and before any site is rewritten, every ``H // s`` of a site's
input size ``H`` on a spatial axis, ``s`` the site's stride on that axis, whose value is the
site's output size at the reference: what runs after the site reads the site's output size
instead (the same number at the reference, the right one at any other), where they are used
by what reads the site's output (arithmetic on them, ``n = H * W``, is copied for those uses);
other uses (a crop of the input, another site's grid) keep the input's value. A pure function of the annotated graph and the
candidates, so ``apply_plan`` replays it exactly.
"""
from __future__ import annotations

import math
import operator

import torch
from torch import fx

from ._helpers import node_hw
from .sites import Candidate

__all__ = ["follow_site_sizes"]


def _spatial_axis(index: object, rank: int) -> int | None:
    """Axis 2 or 3 of a 4-D tensor named by an int index (negative ones too)."""
    if not isinstance(index, int) or not -rank <= index < rank:
        return None
    axis = index % rank
    return axis if axis in (2, 3) else None


def _size_axis(node: fx.Node, x: fx.Node) -> int | None:
    """The spatial axis whose size ``node`` reads off ``x`` (``x.shape[2]``, ``x.size(-1)``,
    ``x.size()[3]``, ``x.shape[-2:][0]``, one name of ``B, C, H, W = x.shape``), else None."""
    if node.op == "call_method" and node.target == "size" and node.args and node.args[0] is x:
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        return _spatial_axis(dim, 4)
    if not (node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node)):
        return None
    whole, index = node.args[0], node.args[1]
    axes = _shape_axes(whole, x)
    if axes is None or not isinstance(index, int) or not -len(axes) <= index < len(axes):
        return None
    axis = axes[index]
    return axis if axis in (2, 3) else None


def _shape_axes(node: fx.Node, x: fx.Node) -> list[int] | None:
    """The axes of ``x`` a shape tuple holds: ``x.shape``/``x.size()`` all four, a slice of them."""
    if node.op == "call_function" and node.target is getattr and node.args[0] is x and node.args[1] == "shape":
        return [0, 1, 2, 3]
    if node.op == "call_method" and node.target == "size" and node.args[0] is x and len(node.args) == 1 and not node.kwargs:
        return [0, 1, 2, 3]
    if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node) \
            and isinstance(node.args[1], slice):
        inner = _shape_axes(node.args[0], x)
        return None if inner is None else inner[node.args[1]]
    return None


def _is_size_arithmetic(node: fx.Node) -> bool:
    """Pure arithmetic on ints (``operator``'s or ``math``'s: never an assert or a tensor op)."""
    return node.op == "call_function" and node.meta.get("tensor_meta") is None \
        and getattr(node.target, "__module__", None) in ("_operator", "operator", "math") and node.target is not operator.getitem


def _descendants(node: fx.Node) -> set[fx.Node]:
    """Every node that reads ``node``'s value, directly or not."""
    found, frontier = set(), [node]
    while frontier:
        for u in frontier.pop().users:
            if u not in found:
                found.add(u)
                frontier.append(u)
    return found


def _same_map(x: fx.Node, sites: set[fx.Node]) -> list[fx.Node]:
    """``x`` and the N x C x H x W tensors before it of its size with no site between (a grid
    passed on as ints: the Swin paper code's ``Wh = x.size(2)`` after the patch embedding, read
    again by the patch merging's ``x.view(B, H, W, C)``); a site's output counts, not its input."""
    found, seen, frontier = [x], {x}, [x] if x not in sites else []
    while frontier:
        for a in frontier.pop().all_input_nodes:
            if a not in seen:
                seen.add(a)
                if node_hw(a) == node_hw(x) and _is_map(a):
                    found.append(a)
                if a not in sites:
                    frontier.append(a)
    return found


def _is_map(node: fx.Node) -> bool:
    meta = node.meta.get("tensor_meta")
    return meta is not None and hasattr(meta, "shape") and len(meta.shape) == 4


def _reads(x: fx.Node) -> list[fx.Node]:
    """``x.shape``, ``x.size()``, then their items and slices."""
    reads, frontier = [], list(x.users)
    while frontier:
        n = frontier.pop()
        if n.op in ("call_function", "call_method") and n.target in (getattr, operator.getitem, "size") \
                and n.meta.get("tensor_meta") is None and n not in reads:
            reads.append(n)
            frontier += n.users
    return reads


def _over_stride(read: fx.Node, stride: int, size_in: int, size_out: int) -> list[fx.Node]:
    """The nodes computing ``read // stride``, ``math.ceil(read / stride)`` or ``(read + stride - 1)
    // stride`` that equal ``size_out`` for ``size_in``."""
    found = []
    by = lambda n, op, k: n.op == "call_function" and n.target is op and len(n.args) == 2 and n.args[1] == k  # noqa: E731
    for u in read.users:
        if u.args[0] is not read:
            continue
        if by(u, operator.floordiv, stride) and size_in // stride == size_out:
            found.append(u)
        elif by(u, operator.truediv, stride) and math.ceil(size_in / stride) == size_out:  # math.ceil(H / s) (VOLO)
            found += [c for c in u.users if c.op == "call_function" and c.target is math.ceil]
        elif by(u, operator.add, stride - 1) and math.ceil(size_in / stride) == size_out:  # (H + 1) // 2 (Swin code)
            found += [c for c in u.users if by(c, operator.floordiv, stride) and c.args[0] is u]
    return found


def _grid_sizes(site: fx.Node, cand: Candidate, sites: set[fx.Node]) -> list[tuple[fx.Node, int]]:
    """The ``H // s`` (or ``math.ceil(H / s)``) nodes of ``site``'s input size that name its
    output size, with their axis."""
    x = site.args[0] if site.args and isinstance(site.args[0], fx.Node) else None
    hw_in, hw_out = node_hw(x), node_hw(site)
    if x is None or hw_in is None or hw_out is None or cand.stride is None:
        return []
    found = []
    for tensor in _same_map(x, sites - {site}):
        for read in _reads(tensor):
            axis = _size_axis(read, tensor)
            if axis is not None:
                found += [(u, axis) for u in _over_stride(read, cand.stride[axis - 2], hw_in[axis - 2], hw_out[axis - 2])]
    return found


def _redirect(gm: fx.GraphModule, site: fx.Node, grids: list[tuple[fx.Node, int]], order: dict[fx.Node, int]) -> bool:
    """The uses of the ``grids`` (and of arithmetic on them: ``H * W``) by what reads ``site``'s
    output read ``site``'s output size on each one's axis; other uses (a crop of the input, the
    grid of another site of the same input) keep the input's. False (and the graph as it was)
    where nothing that reads the site's output uses them."""
    derived, frontier = [], [g for g, _ in grids]
    while frontier:
        n = frontier.pop()
        for u in n.users:
            if u not in derived and u in order and _is_size_arithmetic(u):
                derived.append(u)
                frontier.append(u)
    with gm.graph.inserting_after(site):
        last = shape = gm.graph.call_function(getattr, (site, "shape"))
    copies: dict[fx.Node, fx.Node] = {}
    for grid, axis in grids:
        with gm.graph.inserting_after(last):
            last = copies[grid] = gm.graph.call_function(operator.getitem, (shape, axis))
    for n in sorted((d for d in derived if d not in copies), key=order.__getitem__):
        before = order[n] < order[site]  # copied after the site; one computed after it, right after itself
        with gm.graph.inserting_after(last if before else n):
            copies[n] = gm.graph.node_copy(n, lambda a: copies.get(a, a))
        last = copies[n] if before else last
    redirected = False
    # what reads the site's output, and what runs after it that nothing before the site feeds
    # (sizes stored on a block: ``blk.H = H``); never an assert on the input
    of_input = _descendants(site.args[0])
    after = {u for u in order if order[u] > order[site] and u not in of_input and u.target is not torch._assert}
    for user in (_descendants(site) | after) & set(order):
        if user not in copies:
            for a in user.all_input_nodes:
                if a in copies:
                    user.replace_input_with(a, copies[a])
                    redirected = True
    if not redirected:
        for n in [*reversed(list(copies.values())), shape]:
            gm.graph.erase_node(n)
    return redirected


def follow_site_sizes(gm: fx.GraphModule, candidates: list[Candidate]) -> list[str]:
    """Rewrite, in place, the grid sizes computed from a site's input (``H // s``) to read the
    site's output where what reads that output uses them; one note per site. ``gm`` must carry
    ``tensor_meta``."""
    sites = {c.node: c for c in candidates if c.kind in ("conv", "pool") and not c.skip_reason}
    notes = []
    site_nodes = {n for n in gm.graph.nodes if n.name in sites}
    for site in [n for n in gm.graph.nodes if n in site_nodes]:
        grids = _grid_sizes(site, sites[site.name], site_nodes)
        if grids and _redirect(gm, site, grids, {n: i for i, n in enumerate(gm.graph.nodes)}):
            notes.append(f"the grid size computed from site {sites[site.name].name}'s input (size over stride) follows its output")
    if notes:
        gm.graph.lint()
        gm.recompile()
    return notes
