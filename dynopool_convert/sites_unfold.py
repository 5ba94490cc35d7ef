"""Strided unfolds (``nn.Unfold``, ``F.unfold``) as sites: T2T-ViT's "soft split".

``unfold(x, k, stride=s, padding=p)`` cuts overlapping ``k x k`` patches every ``s`` pixels into
tokens (``N x C k^2 x L``, ``L`` the grid of patch positions): it downsamples like a strided
conv whose kernel is the identity. A DynOPool in front resizes its input (starting at stride 1,
under every placement: the op keeps its stride, as a patchify conv does), so the token grid
learns. Unfolds whose patches tile the map (kernel = stride, no padding) are exposed as a
pixel unshuffle by ``patch_reshape.py`` and are not these sites.
"""
from __future__ import annotations

from typing import Any

from torch import fx

from ._helpers import int_pair
from .patch_reshape import unfold_args, unfold_patch
from .sites import Candidate, _is_4d
from .sites_unshuffle import pool_in_front

__all__ = ["UnfoldHandler"]

def _static(value: Any) -> bool:
    values = value if isinstance(value, (tuple, list)) else (value,)
    return all(isinstance(v, int) and not isinstance(v, bool) for v in values)


class UnfoldHandler:
    """``nn.Unfold`` / ``F.unfold`` with a stride > 1: DynOPool in front (placement ``patchify``)."""

    name = "unfold"
    kind = "conv"

    def match(self, node: fx.Node, gm: fx.GraphModule) -> bool:
        return unfold_args(node, gm) is not None

    def inspect(self, node: fx.Node, gm: fx.GraphModule) -> Candidate:
        args = unfold_args(node, gm) or {}  # (match: never None here)
        static = all(_static(args.get(k)) for k in ("kernel_size", "dilation", "padding", "stride"))
        s = int_pair(args["stride"]) if static else None
        label = f"Unfold(k={args.get('kernel_size')}, s={args.get('stride')}, p={args.get('padding')})"
        stride = (float(s[0]), float(s[1])) if static else None
        cand = Candidate(node.name, "", self.kind, label, self.name, stride, "mean", patch=(1, 1) if static else None)
        if not static:
            cand.skip_reason = "its kernel, stride or padding is not a static number"
        elif s == (1, 1):
            cand.skip_reason = "stride 1: keeps the spatial size"
        elif not _is_4d(node.args[0] if node.args else node.kwargs.get("input")):
            cand.skip_reason = "input is not an N x C x H x W tensor"
        elif unfold_patch(node, gm) is not None:  # (exposed as an unshuffle before the sites were found)
            cand.skip_reason = "its patches tile the map: the pixel unshuffle in front is the site"
        return cand

    def apply(self, gm: fx.GraphModule, node: fx.Node, pool_path: str, placement: str) -> None:
        """The pool goes in front, under every placement (the unfold keeps its stride)."""
        pool_in_front(gm, node, pool_path)
