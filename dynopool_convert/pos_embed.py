"""Make fixed absolute position embeddings follow a DynOPool site's grid (DESIGN.md §2).

ViT-style models add a learned position embedding of a fixed length to the token sequence that
a patchify conv produces. Once that conv is a DynOPool site, the token count moves with the
learned stride and the add breaks. ``follow_grids`` rewrites such adds on the traced graph
(before any site is rewritten): the parameter's use in the add becomes a call of
``resample_pos_embed(param, grid, ...)``, where ``grid`` is the site's 4-D output at run time,
resampled with timm's ``resample_abs_pos_embed`` (bicubic, antialiased, prefix tokens kept).
At the reference grid the parameter comes back unchanged, so a model is exact at init; the
parameter itself stays where it was (state dict keys unchanged).

Recognised layouts of a parameter ``p`` added (``x + p`` / ``p + x``) to tokens derived from a
site whose output is ``gh x gw`` at the reference input:

* ``"nc"``:  ``p.shape == (1, P + gh*gw, C)`` with ``0 <= P <= MAX_PREFIX`` prefix tokens, or
  ``(P + gh*gw, C)``;
* ``"chw"``: ``p.shape == (1, C, gh, gw)``;
* ``"hwc"``: ``p.shape == (1, gh, gw, C)``.

``p`` is a parameter, buffer or constant tensor of the model, added as it is or through casts
(``.to(x.device)``) and slices that keep all of it at the reference (vit-pytorch's
``pos_embedding[:, :(n + 1)]``): the table is resampled before them.

The pass is a pure function of the annotated graph (shapes from ``annotated_graph.py``) and the candidate
sites, so ``apply_plan`` replays it exactly.
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import Tensor, fx

from .sites import Candidate

__all__ = ["resample_pos_embed", "follow_grids", "MAX_PREFIX", "ADDS", "node_shape", "ancestors"]

#: prefix tokens (class, distillation, register tokens) a sequence position embedding may carry
MAX_PREFIX = 8
ADDS = (operator.add, torch.add, operator.iadd)


def resample_pos_embed(pos: Tensor, grid: Tensor, layout: str, ref_size: tuple[int, int], num_prefix: int = 0) -> Tensor:
    """``pos`` resampled from the ``ref_size`` grid to ``grid``'s spatial size (its last two
    dims); returned unchanged at ``ref_size``. ``layout`` is ``"nc"``, ``"chw"`` or ``"hwc"``."""
    from timm.layers import resample_abs_pos_embed

    size = [int(grid.shape[-2]), int(grid.shape[-1])]
    if size == [int(ref_size[0]), int(ref_size[1])]:
        return pos
    if layout == "nc" and pos.dim() == 2:
        return resample_abs_pos_embed(pos[None], new_size=size, old_size=list(ref_size), num_prefix_tokens=num_prefix)[0]
    if layout == "nc":
        return resample_abs_pos_embed(pos, new_size=size, old_size=list(ref_size), num_prefix_tokens=num_prefix)
    chw = pos if layout == "chw" else pos.permute(0, 3, 1, 2)
    out = F.interpolate(chw.float(), size=size, mode="bicubic", antialias=True).to(pos.dtype)
    return out if layout == "chw" else out.permute(0, 2, 3, 1)


def node_shape(node: object) -> tuple[int, ...] | None:
    """A node's output shape from its ``tensor_meta`` (None for a non-tensor)."""
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(int(v) for v in meta.shape) if meta is not None and hasattr(meta, "shape") else None


#: ops that hand a table on unchanged at the reference (a cast; a slice that keeps all of it)
_PASS_METHODS = ("to", "type", "type_as", "float", "half", "bfloat16", "detach", "clone", "contiguous")


def _attr_shape(gm: fx.GraphModule, node: fx.Node) -> tuple[int, ...] | None:
    """The shape of the tensor a ``get_attr`` node reads (a parameter, buffer or constant)."""
    value: object = gm
    for part in str(node.target).split("."):
        value = getattr(value, part, None)
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def _table(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, fx.Node | None, tuple[int, ...]] | None:
    """``(get_attr, its first user on the way, shape)`` where ``node`` is a stored tensor, or
    one handed on unchanged at the reference by casts and whole slices
    (``self.pos_embedding.to(x.device)``, vit-pytorch's ``self.pos_embedding[:, :(n + 1)]``)."""
    chain: list[fx.Node] = []
    while node.op != "get_attr":
        passes = (node.op == "call_method" and node.target in _PASS_METHODS) or (
            node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node)
            and node_shape(node) is not None and node_shape(node) == node_shape(node.args[0]))
        if not passes or not node.args or not isinstance(node.args[0], fx.Node) or len(node.args[0].users) != 1:
            return None
        chain.append(node)
        node = node.args[0]
    shape = _attr_shape(gm, node)
    return (node, chain[-1] if chain else None, shape) if shape is not None else None


def ancestors(node: fx.Node) -> list[fx.Node]:
    """Every node ``node`` depends on."""
    seen: dict[fx.Node, None] = {}
    stack = [node]
    while stack:
        for parent in stack.pop().all_input_nodes:
            if parent not in seen:
                seen[parent] = None
                stack.append(parent)
    return list(seen)


def _match(pshape: tuple[int, ...], tshape: tuple[int, ...] | None, grid: tuple[int, int]) -> tuple[str, int] | None:
    """(layout, prefix tokens) when a parameter of ``pshape`` is the position embedding of
    tokens of shape ``tshape`` laid out on ``grid``."""
    gh, gw = grid
    if gh * gw <= 1:  # a 1x1 map: a [1, C, 1, 1] parameter there is a bias that broadcasts anyway
        return None
    if len(pshape) == 2 and tshape is not None and len(tshape) == 3 and tshape[1:] == pshape:
        prefix = pshape[0] - gh * gw  # a table without the batch dimension (vit-pytorch's sine-cosine one)
        return ("nc", prefix) if 0 <= prefix <= MAX_PREFIX else None
    if len(pshape) == 3 and pshape[0] == 1 and 0 <= pshape[1] - gh * gw <= MAX_PREFIX:
        if tshape is not None and len(tshape) == 3 and tshape[1:] == pshape[1:]:
            return "nc", pshape[1] - gh * gw
    if len(pshape) == 4 and pshape[0] == 1 and tshape is not None and tshape[1:] == pshape[1:]:
        if pshape[2:] == (gh, gw):
            return "chw", 0
        if pshape[1:3] == (gh, gw):
            return "hwc", 0
    return None


def follow_grids(gm: fx.GraphModule, candidates: list[Candidate]) -> list[str]:
    """Rewrite, in place, every add of a fixed position embedding to tokens derived from a
    candidate site so that the embedding follows the site's grid; returns one note per add.

    ``gm`` must carry ``tensor_meta`` (``AnnotatedGraph``) from the reference input."""
    nodes = {n.name: n for n in gm.graph.nodes}
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    sites = {nodes[c.node]: c for c in candidates if c.node in nodes and c.kind != "interpolate"}
    notes = []
    for add in list(gm.graph.nodes):
        if add.op != "call_function" or add.target not in ADDS or len(add.args) != 2:
            continue
        for i, used in enumerate(add.args):
            other = add.args[1 - i]
            table = _table(gm, used) if isinstance(used, fx.Node) and isinstance(other, fx.Node) else None
            if table is None:
                continue
            param, first_user, pshape = table
            if len(pshape) not in (2, 3, 4) or (len(pshape) > 2 and pshape[0] != 1):
                continue
            found = None  # the nearest site upstream of the tokens whose grid the parameter fits
            for node in sorted(ancestors(other) + [other], key=order.__getitem__, reverse=True):
                out = node_shape(node)
                match = _match(pshape, node_shape(other), out[2:]) if node in sites and out is not None and len(out) == 4 else None
                if match is not None:
                    found = (node, out[2:], match)
                    break
            if found is None:
                continue
            site_node, grid, (layout, prefix) = found
            user = first_user or add  # the table is resampled before any slice or cast of it
            if order[user] < order[site_node]:
                notes.append(f"position embedding {param.target} {list(pshape)} is cast or sliced before site "
                             f"{sites[site_node].name} runs: it does not follow that grid")
                continue
            with gm.graph.inserting_before(user):
                call = gm.graph.call_function(resample_pos_embed, (param, site_node, layout, tuple(grid), prefix))
            call.meta = dict(param.meta)
            order[call] = order[user] - 0.5  # later adds may have it upstream
            user.replace_input_with(param, call)
            notes.append(
                f"position embedding {param.target} {list(pshape)} follows the grid of site {sites[site_node].name}"
                f" ({layout}, {prefix} prefix tokens, {grid[0]}x{grid[1]} at the reference size)"
            )
            break
    if notes:
        gm.graph.lint()
        gm.recompile()
    return notes
