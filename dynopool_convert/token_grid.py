"""Make hard-coded token flattening follow a DynOPool site's grid (DESIGN.md §2).

torchvision's ViTs turn the patchify conv's output into tokens with
``x.reshape(n, hidden_dim, n_h * n_w)``, where ``n_h * n_w`` is computed from the *input* image
size. Once that conv is a DynOPool site its grid moves with the learned stride and the reshape
breaks. ``follow_flattens`` rewrites, on the traced graph and before any site is rewritten, every
``reshape``/``view`` of a site's 4-D output ``(N, C, gh, gw)`` into ``(N, C, gh * gw)`` as
``torch.flatten(x, 2)``: the same tensor at the reference size, and the right one at any other.
A pure function of the annotated graph (``tensor_meta`` from ``annotated_graph.py``) and the candidate sites, so
``apply_plan`` replays it exactly.
"""
from __future__ import annotations

import torch
from torch import fx

from .sites import Candidate

__all__ = ["follow_flattens"]

_RESHAPE_METHODS = ("reshape", "view")


def _shape(node: object) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(int(v) for v in meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _is_reshape(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _RESHAPE_METHODS
    return node.op == "call_function" and node.target is torch.reshape


def follow_flattens(gm: fx.GraphModule, candidates: list[Candidate]) -> list[str]:
    """Rewrite, in place, reshapes of a site's 4-D output into ``(N, C, H*W)`` as
    ``torch.flatten(x, 2)``; returns one note per rewrite. ``gm`` must carry ``tensor_meta``."""
    sites = {c.node: c for c in candidates if c.kind != "interpolate"}
    notes = []
    for node in list(gm.graph.nodes):
        if not _is_reshape(node) or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        source = node.args[0]
        if source.name not in sites:
            continue
        src, out = _shape(source), _shape(node)
        if src is None or out is None or len(src) != 4 or out != (src[0], src[1], src[2] * src[3]):
            continue
        with gm.graph.inserting_before(node):
            flat = gm.graph.call_function(torch.flatten, (source, 2))
        flat.meta = dict(node.meta)
        node.replace_all_uses_with(flat)
        gm.graph.erase_node(node)
        notes.append(f"the reshape of site {sites[source.name].name}'s output to {list(out)} follows its grid (flatten)")
    if notes:
        gm.graph.lint()
        gm.recompile()
    return notes
