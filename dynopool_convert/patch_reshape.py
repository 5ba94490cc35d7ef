"""Patchify by reshaping: give a hand-written ViT's token grid a site (DESIGN.md §2).

Research code often cuts an image into patches without a strided conv: MAE's
``x.reshape(N, C, h, p, w, p)`` (then a permute or einsum and a reshape to tokens),
lucidrains/vit-pytorch's ``Rearrange('b c (h p1) (w p2) -> b (h w) (p1 p2 c)', p1=p, p2=p)``,
im2col's ``F.unfold(x, p, stride=p)``.
Such a model has no resizing op, so nothing could learn. ``expose_patch_grids`` feeds each such
reshape ``pixel_shuffle(pixel_unshuffle(x, p), p)`` instead of ``x``: the same tensor, bit for
bit, through a 4-D map of the token grid (``N x C p^2 x H/p x W/p``). The unshuffle is a patchify
site (``sites_unshuffle.py``): a DynOPool in front resizes the image to a multiple of ``p``, the
grid moves with it, and a position embedding added to the tokens follows the unshuffle's grid
(``pos_embed.py``). The reshape's own sizes must be read off the map (``h = H // p``; the reads
that feed the patches are rewired to the image behind the shuffle, others, such as an output
upsampled back to the input's size, keep reading the input) for a moved grid to pass; one with
numbers written in breaks at moved strides and validation reverts it.
Swin's patch merging is the same cut channels last (timm's ``reshape(B, H/2, 2, W/2, 2, C)``, then
permuted and flattened into ``4C`` features) or by four strided quarters concatenated along the
channels (torchvision's ``_patch_merging_pad``, the Swin paper code, YOLOv5's Focus: the quarters
read the shuffled map and are no strided-slice sites of their own).
Only blocks whose patch pixels and channels become one token's features are patches: a window
partition (the same 6-D reshape, its windows then the batch and their pixels the tokens) is left
alone.

A pure function of the annotated graph (``tensor_meta``), so ``apply_plan`` replays it exactly.
"""
from __future__ import annotations

import operator
import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from ._helpers import int_pair, node_hw
from .pos_embed import ancestors, node_shape
from .sites import QUARTER_OF_PATCHES, _bind

__all__ = ["expose_patch_grids", "reshape_patch", "channels_last_reshape_patch", "sliced_space_to_depth",
           "window_partition", "einops_patch", "unfold_patch", "PATCHES_OF"]

_RESHAPES = ("reshape", "view")
#: node meta key of an exposed unshuffle: what cut the patches ("reshape", "rearrange", "unfold",
#: "channels-last reshape", "slices")
PATCHES_OF = "dynopool_patches_of"
#: the four offsets of a 2x2 space to depth by slicing
_QUARTERS = {(0, 0), (1, 0), (0, 1), (1, 1)}


def reshape_patch(node: fx.Node) -> int | None:
    """The patch of a reshape of an ``N x C x H x W`` map to ``(N, C, H/p, p, W/p, p)``, else None."""
    found = _block_split(node)
    return found[0] if found is not None and not found[1] and _merges_patch_and_channels(node, found[2]) else None


def channels_last_reshape_patch(node: fx.Node) -> int | None:
    """The patch of a reshape of an ``N x H x W x C`` map to ``(N, H/p, p, W/p, p, C)`` whose
    blocks become ``p * p * C`` features (Swin's patch merging in timm), else None."""
    found = _block_split(node)
    # one channel: a window partition of Swin's attention mask (its windows' pixels become
    # the mask's rows of p * p) looks the same
    return found[0] if found is not None and found[1] and found[2] > found[0] ** 2 \
        and _merges_patch_and_channels(node, found[2]) else None


def window_partition(node: fx.Node) -> bool:
    """Whether ``node`` cuts a 4-D map into square blocks that do not become features (Swin's
    window partition: the windows become the batch and their pixels the tokens)."""
    found = _block_split(node)
    return found is not None and not _merges_patch_and_channels(node, found[2])


def _block_split(node: fx.Node) -> tuple[int, bool, int] | None:
    """(block side, channels last, features of a block) of a reshape cutting a 4-D map into
    square blocks (``(N, C, H/p, p, W/p, p)``, or ``(N, H/p, p, W/p, p, C)`` channels last), else None."""
    is_reshape = (node.op == "call_method" and node.target in _RESHAPES) or (
        node.op == "call_function" and node.target is torch.reshape)
    x = node.args[0] if is_reshape and node.args else None
    shape_in, shape_out = node_shape(x), node_shape(node)
    if shape_in is None or shape_out is None or len(shape_in) != 4 or len(shape_out) != 6:
        return None
    n, c, h, w = shape_in
    if shape_out[:2] == (n, c) and shape_out[2] * shape_out[3] == h and shape_out[4] * shape_out[5] == w:
        p, last = shape_out[3], False
        same = p == shape_out[5]
    else:
        n, h, w, c = shape_in
        if (shape_out[0], shape_out[5]) != (n, c) or shape_out[1] * shape_out[2] != h or shape_out[3] * shape_out[4] != w:
            return None
        p, last = shape_out[2], True
        same = p == shape_out[4]
    return (p, last, p * p * c) if same and p > 1 else None


_MOVES = ("permute", "transpose", "contiguous", "reshape", "view", "flatten")
_MOVE_FUNCTIONS = (torch.permute, torch.transpose, torch.einsum, torch.reshape, torch.flatten)


def _merges_patch_and_channels(node: fx.Node, features: int, depth: int = 4) -> bool:
    """Whether the 6-D blocks become tokens of ``p * p * C`` features, or a map of ``p * p * C``
    channels (TResNet's space to depth), by permutes, einsums and reshapes, as patches do; a
    window partition (windows as batch, pixels as tokens) does not."""
    for u in _moves_after(node, depth):
        shape = node_shape(u)
        if shape is not None and len(shape) <= 4 and features in (shape[-1], shape[1]):  # tokens; space to depth
            return True
    return False


def _moves_after(node: fx.Node, depth: int = 4) -> list[fx.Node]:
    """The permutes, einsums and reshapes that follow ``node`` (up to ``depth`` of them in a row)."""
    found, frontier = [], [node]
    for _ in range(depth):
        frontier = [u for n in frontier for u in n.users if _is_move(u)]
        found += frontier
    return found


def _einops_pattern(node: fx.Node, gm: fx.GraphModule) -> tuple[str, dict[str, Any]] | None:
    """(pattern, axis lengths) of an einops ``rearrange`` call or ``Rearrange`` layer."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if type(module).__name__ == "Rearrange" and type(module).__module__.startswith("einops"):
            return str(module.pattern), dict(module.axes_lengths)
        return None
    target = node.target if node.op == "call_function" else None
    if getattr(target, "__name__", "") == "rearrange" and getattr(target, "__module__", "").startswith("einops"):
        pattern = node.args[1] if len(node.args) > 1 else node.kwargs.get("pattern")
        lengths = {k: v for k, v in node.kwargs.items() if k not in ("tensor", "pattern")}
        return (pattern, lengths) if isinstance(pattern, str) else None
    return None


def einops_patch(node: fx.Node, gm: fx.GraphModule) -> int | None:
    """The patch of ``rearrange(x, 'b c (h p1) (w p2) -> ...', p1=p, p2=p)`` on an
    ``N x C x H x W`` map (the inner axis of each spatial group given, the outer one read off
    the map), else None."""
    found = _einops_pattern(node, gm)
    if found is None or node_hw(node.args[0] if node.args else None) is None:
        return None
    pattern, lengths = found
    left = re.findall(r"\([^)]*\)|\S+", pattern.split("->")[0])
    if len(left) != 4:
        return None
    patches, inner = [], []
    for group in left[2:]:
        names = group.strip("()").split()
        if not group.startswith("(") or len(names) != 2 or names[0] in lengths:
            return None
        patches.append(lengths.get(names[1]))
        inner.append(names[1])
    # the patch's pixels and the channels become one token's features: '-> b (h w) (p1 p2 c)'
    right = [set(g.strip("()").split()) for g in re.findall(r"\([^)]*\)|\S+", pattern.split("->")[1])]
    if not any({*inner, left[1]} <= g for g in right):
        return None
    p = patches[0]
    return p if isinstance(p, int) and p > 1 and patches[1] == p else None


def _reads_size(node: fx.Node) -> bool:
    """``x.shape``, ``x.size()``, ``x.size(d)``."""
    return (node.op == "call_function" and node.target is getattr and len(node.args) > 1 and node.args[1] == "shape") \
        or (node.op == "call_method" and node.target == "size")


_UNFOLD_PARAMS = ("kernel_size", "dilation", "padding", "stride")


def unfold_args(node: fx.Node, gm: fx.GraphModule) -> dict[str, Any] | None:
    """Kernel, dilation, padding and stride of an ``nn.Unfold`` / ``F.unfold`` node (the
    module's, or the call's), None for any other node."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        return {k: getattr(module, k) for k in _UNFOLD_PARAMS} if isinstance(module, nn.Unfold) else None
    if node.op == "call_function" and node.target is F.unfold:
        return {"dilation": 1, "padding": 0, "stride": 1, **_bind(node, _UNFOLD_PARAMS)}
    return None


def unfold_patch(node: fx.Node, gm: fx.GraphModule) -> int | None:
    """The patch of ``F.unfold(x, p, stride=p)`` / ``nn.Unfold(p, stride=p)`` (no padding or
    dilation) on an ``N x C x H x W`` map (im2col patches: ``N x C p^2 x L``), else None."""
    geometry = unfold_args(node, gm)
    if geometry is None:
        return None
    try:
        k, s = int_pair(geometry["kernel_size"]), int_pair(geometry["stride"])
        plain = int_pair(geometry["padding"]) == (0, 0) and int_pair(geometry["dilation"]) == (1, 1)
    except (KeyError, TypeError, ValueError):
        return None
    hw = node_hw(node.args[0] if node.args else node.kwargs.get("input"))
    # an unfold drops the pixels past the last whole patch; an unshuffle takes whole patches only
    return k[0] if plain and k == s and k[0] == k[1] > 1 and hw is not None and hw[0] % k[0] == hw[1] % k[0] == 0 else None


def _quarter(index: Any, channels_last: bool) -> tuple[int, int] | None:
    """The offset ``(dy, dx)`` of an index taking every other row and column of a 4-D map from
    that offset (``x[..., 1::2, 0::2]``; channels last: ``x[:, 1::2, 0::2, :]``), else None."""
    if not isinstance(index, tuple) or not all(isinstance(i, slice) or i is Ellipsis for i in index):
        return None
    if Ellipsis in index:
        if index.count(Ellipsis) > 1:
            return None
        at = index.index(Ellipsis)
        index = index[:at] + (slice(None),) * (4 - len(index) + 1) + index[at + 1:]
    index = index + (slice(None),) * (4 - len(index))  # trailing axes left out: whole
    if len(index) != 4 or any(i.stop is not None for i in index):
        return None
    spatial, other = ((1, 2), (0, 3)) if channels_last else ((2, 3), (0, 1))
    if any(index[a].start not in (None, 0) or index[a].step not in (None, 1) for a in other):
        return None
    offsets = tuple(index[a].start or 0 for a in spatial)
    return offsets if all(index[a].step == 2 for a in spatial) and set(offsets) <= {0, 1} else None


def sliced_space_to_depth(node: fx.Node) -> tuple[fx.Node, list[fx.Node], bool] | None:
    """(map, slices, channels last) of ``torch.cat`` of the four quarters of a 4-D map along its
    channels (YOLOv5's Focus; Swin's patch merging in its paper code and torchvision's
    ``_patch_merging_pad``: channels last), else None."""
    if not (node.op == "call_function" and node.target is torch.cat and node.args and isinstance(node.args[0], (list, tuple))):
        return None
    parts = list(node.args[0])
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    if len(parts) != 4 or not all(isinstance(p, fx.Node) and p.op == "call_function" and p.target is operator.getitem
                                  and len(p.args) == 2 for p in parts):
        return None
    x = parts[0].args[0]
    shape = node_shape(x) if isinstance(x, fx.Node) else None
    if shape is None or len(shape) != 4 or any(p.args[0] is not x for p in parts):
        return None
    for channels_last, axis in ((False, (1, -3)), (True, (3, -1))):
        offsets = [_quarter(p.args[1], channels_last) for p in parts]
        if dim in axis and set(offsets) == _QUARTERS and len(set(offsets)) == 4:
            h, w = shape[1:3] if channels_last else shape[2:]
            return (x, parts, channels_last) if h % 2 == w % 2 == 0 else None
    return None


def _is_move(n: fx.Node) -> bool:
    return (n.op == "call_method" and n.target in _MOVES) or (n.op == "call_function" and n.target in _MOVE_FUNCTIONS)


def _follow_image_sizes(gm: fx.GraphModule, x: fx.Node, image: fx.Node) -> None:
    """The size arithmetic of the reshapes of what the patches became (``h = x.shape[2] // p``
    for the patches, their tokens back to a map) reads ``image``'s size, through a copy of it on
    ``image``; other uses of the same values (an output upsampled back to ``(H, W)`` of one
    ``B, C, H, W = x.shape``) keep reading ``x``."""
    after, frontier = set(), [image]
    while frontier:
        n = frontier.pop()
        for u in n.users:
            if u not in after:
                after.add(u)
                frontier.append(u)
    chain = [n for n in gm.graph.nodes if n in after and _is_move(n)]
    upstream = {a for n in chain for a in ancestors(n)}
    arithmetic: set[fx.Node] = set()
    frontier = [u for u in x.users if _reads_size(u) and u in upstream]
    while frontier:
        n = frontier.pop()
        if n not in arithmetic:
            arithmetic.add(n)
            frontier += [u for u in n.users if u in upstream and node_shape(u) is None]
    copies: dict[fx.Node, fx.Node] = {}
    for n in [n for n in gm.graph.nodes if n in arithmetic]:
        with gm.graph.inserting_after(n):
            copies[n] = gm.graph.node_copy(n, lambda a: image if a is x else copies.get(a, a))
    for n in chain:
        for a in n.all_input_nodes:
            if a in copies:
                n.replace_input_with(a, copies[a])


def _shuffled(gm: fx.GraphModule, x: fx.Node, p: int, channels_last: bool) -> tuple[fx.Node, fx.Node]:
    """``pixel_shuffle(pixel_unshuffle(x, p), p)`` inserted after ``x`` (channels last: through
    ``N x C x H x W`` permutes): (the unshuffle, the shuffled ``x``), the same tensor as ``x``."""
    with gm.graph.inserting_after(x):
        first = gm.graph.call_method("permute", (x, 0, 3, 1, 2)) if channels_last else x
    with gm.graph.inserting_after(first):
        grid = gm.graph.call_function(F.pixel_unshuffle, (first, p))
    with gm.graph.inserting_after(grid):
        image = gm.graph.call_function(F.pixel_shuffle, (grid, p))
    if channels_last:
        with gm.graph.inserting_after(image):
            image = gm.graph.call_method("permute", (image, 0, 2, 3, 1))
    return grid, image


def expose_patch_grids(gm: fx.GraphModule, node_names: dict[str, str]) -> list[str]:
    """Rewrite, in place, every patchify by reshape to read its input through an unshuffle and
    a shuffle by the patch; the unshuffle nodes get qualified names in ``node_names``. Returns
    one note per rewrite. ``gm`` must carry ``tensor_meta``."""
    notes = []
    for node in list(gm.graph.nodes):
        quarters = sliced_space_to_depth(node)
        if quarters is not None:
            x, parts, channels_last = quarters
            grid, image = _shuffled(gm, x, 2, channels_last)
            for part in parts:
                part.replace_input_with(x, image)
                part.meta[QUARTER_OF_PATCHES] = True  # not a strided-slice site of its own
            name = node_names.get(node.name, node.name)
            node_names[grid.name] = f"{name}_patches"
            grid.meta[PATCHES_OF] = "slices"
            notes.append(f"{name}: space to depth by slices (patch 2) exposed as a pixel unshuffle, so that its grid can learn")
            continue
        found = [(p, how) for p, how in ((reshape_patch(node), "reshape"), (einops_patch(node, gm), "rearrange"),
                                          (unfold_patch(node, gm), "unfold"),
                                          (channels_last_reshape_patch(node), "channels-last reshape")) if p is not None]
        if not found or not node.args:  # (F.unfold(input=x, ...): left as it is)
            continue
        p, how = found[0]
        x = node.args[0]
        grid, image = _shuffled(gm, x, p, channels_last=how == "channels-last reshape")
        node.replace_input_with(x, image)
        _follow_image_sizes(gm, x, image)
        name = node_names.get(node.name, node.name)
        node_names[grid.name] = f"{name}_patches"
        grid.meta[PATCHES_OF] = how  # the site's label says what cut the patches
        notes.append(f"{name}: patchify by {how} (patch {p}) exposed as a pixel unshuffle, so that its token grid can learn")
    if notes:
        gm.graph.lint()
        gm.recompile()
    return notes
