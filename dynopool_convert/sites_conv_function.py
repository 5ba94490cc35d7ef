"""Strided functional convolutions (``F.conv2d``/``torch.conv2d`` called with a parameter):
the same site as a strided ``nn.Conv2d`` module, rewritten through the call's arguments."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

from ._helpers import int_pair
from .sites import Candidate, _as_stride, _bind, _fmt, _is_4d

#: F.conv2d's arguments after ``input``, in order
CONV_PARAMS = ("weight", "bias", "stride", "padding", "dilation", "groups")
CONV_FUNCTIONS = (F.conv2d, torch.conv2d)


def _kernel(weight: Any) -> tuple[int, int] | None:
    """The weight's (kh, kw), from the shape pass."""
    meta = weight.meta.get("tensor_meta") if isinstance(weight, fx.Node) else None
    shape = getattr(meta, "shape", None)
    return (int(shape[2]), int(shape[3])) if shape is not None and len(shape) == 4 else None


class ConvFunctionHandler:
    """``F.conv2d``/``torch.conv2d`` with stride > 1: under ``before``/``after`` the call runs
    at stride 1 with size-keeping padding next to its DynOPool; a patchify call (kernel ==
    stride, no padding) keeps its stride behind a DynOPool, as the module does."""

    name = "conv_function"
    kind = "conv"

    def match(self, node: fx.Node, gm: fx.GraphModule) -> bool:
        return node.op == "call_function" and _as_stride(_bind(node, CONV_PARAMS).get("stride", 1)) != (1.0, 1.0)

    def inspect(self, node: fx.Node, gm: fx.GraphModule) -> Candidate:
        bound = _bind(node, CONV_PARAMS)
        stride, kernel = _as_stride(bound.get("stride", 1)), _kernel(bound.get("weight"))
        padding, dilation = bound.get("padding", 0), int_pair(bound.get("dilation", 1))
        patch = None
        if kernel is not None and stride == tuple(map(float, kernel)) and dilation == (1, 1) \
                and not isinstance(padding, str) and int_pair(padding) == (0, 0):
            patch = kernel
        label = "F.conv2d" if node.target is F.conv2d else "torch.conv2d"
        op = f"{label}(k={_fmt(kernel or '?')}, s={_fmt(bound.get('stride'))}, p={_fmt(padding)})"
        cand = Candidate(node.name, "", self.kind, op, self.name, stride, "max", patch=patch)
        if stride is None:
            cand.skip_reason = "stride is not a static number"
        elif kernel is None:
            cand.skip_reason = "its weight's shape is unknown"
        elif not _is_4d(node):
            cand.skip_reason = "input is not an N x C x H x W tensor"
        return cand

    def apply(self, gm: fx.GraphModule, node: fx.Node, pool_path: str, placement: str) -> None:
        bound = _bind(node, CONV_PARAMS)
        x = node.args[0] if node.args else node.kwargs["input"]
        if placement != "patchify":
            (kh, kw), (dh, dw) = _kernel(bound["weight"]), int_pair(bound.get("dilation", 1))
            padding: Any = (dh * (kh - 1) // 2, dw * (kw - 1) // 2) if kh % 2 and kw % 2 else "same"
            bound.update(stride=1, padding=padding)
        graph = gm.graph
        if placement in ("before", "patchify"):
            with graph.inserting_before(node):
                x = graph.call_module(pool_path, (x,))
            node.args, node.kwargs = (x,), bound
        else:
            node.args, node.kwargs = (x,), bound
            with graph.inserting_after(node):
                pool = graph.call_module(pool_path, (node,))
            node.replace_all_uses_with(pool, delete_user_cb=lambda user: user is not pool)
