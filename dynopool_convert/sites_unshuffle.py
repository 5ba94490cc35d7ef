"""Space to depth (``nn.PixelUnshuffle``, ``F.pixel_unshuffle``) as a site.

An unshuffle by ``r`` is a patchify convolution with fixed weights: each ``r x r`` patch becomes
one pixel of ``r * r`` times the channels. It has no stride-1 form, so whatever the placement it
is converted as a patchify conv is: a DynOPool in front resizes its input to a multiple of ``r``
(starting at stride 1), and the op keeps its factor. Where ``patch_reshape.py`` exposes
a ViT's patchify-by-reshape as an unshuffle, this is the site that learns its token grid.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from .patch_reshape import PATCHES_OF
from .sites import Candidate, _bind, _is_4d, _module

__all__ = ["UnshuffleHandler", "UNSHUFFLE_FUNCTIONS", "pool_in_front", "unshuffle_factor"]

UNSHUFFLE_FUNCTIONS = (F.pixel_unshuffle, torch.pixel_unshuffle)


def unshuffle_factor(node: fx.Node, gm: fx.GraphModule) -> Any:
    """The downscale factor of an unshuffle node (the module's, or the call's argument)."""
    module = _module(gm, node)
    if module is not None:
        return getattr(module, "downscale_factor", None)
    return _bind(node, ("downscale_factor",)).get("downscale_factor")


class UnshuffleHandler:
    """``PixelUnshuffle(r)`` with ``r > 1``: a patch of ``r x r`` (placement ``patchify``)."""

    name = "pixel_unshuffle"
    kind = "conv"

    def match(self, node: fx.Node, gm: fx.GraphModule) -> bool:
        if node.op == "call_module":
            return isinstance(_module(gm, node), nn.PixelUnshuffle)
        return node.op == "call_function" and node.target in UNSHUFFLE_FUNCTIONS

    def inspect(self, node: fx.Node, gm: fx.GraphModule) -> Candidate:
        r = unshuffle_factor(node, gm)
        static = isinstance(r, int) and not isinstance(r, bool)
        label = f"PixelUnshuffle({r})" if node.op == "call_module" else f"F.pixel_unshuffle(r={r})"
        if node.meta.get(PATCHES_OF):  # exposed by patch_reshape.py: the user's own op named
            label = f"patches of {r}x{r} by {node.meta[PATCHES_OF]}"
        cand = Candidate(node.name, "", self.kind, label, self.name, (float(r), float(r)) if static else None, "mean",
                         patch=(r, r) if static else None)
        if not static:
            cand.skip_reason = "its factor is not a static number"
        elif r == 1:
            cand.skip_reason = "factor 1: it does not resize"
        elif not _is_4d(node.args[0] if node.args else node.kwargs.get("input")):
            cand.skip_reason = "input is not an N x C x H x W tensor"
        return cand

    def apply(self, gm: fx.GraphModule, node: fx.Node, pool_path: str, placement: str) -> None:
        """The pool goes in front, under every placement (the op has no stride-1 form)."""
        pool_in_front(gm, node, pool_path)


def pool_in_front(gm: fx.GraphModule, node: fx.Node, pool_path: str) -> None:
    """``node``'s input (first argument or ``input=``) read through the module at ``pool_path``."""
    x = node.args[0] if node.args else node.kwargs["input"]
    with gm.graph.inserting_before(node):
        pool = gm.graph.call_module(pool_path, (x,))
    if node.args:
        node.args = (pool, *node.args[1:])
    else:
        node.kwargs = {**node.kwargs, "input": pool}
