"""Make relative-position attention biases follow a DynOPool site's grid (DESIGN.md §2).

BEiT, ViT-relpos and other ViT-style models add to the attention logits of their ``L x L``
token pairs a bias looked up in a learned table by the pair's offset (``relative_position_index``
into ``relative_position_bias_table``, or an MLP over the offsets): a tensor that depends on the
parameters only, built for the grid fixed at construction. Once the patchify conv is a DynOPool
site the token count moves, and the add (or ``scaled_dot_product_attention``'s ``attn_mask``)
breaks. ``follow_rel_biases`` rewrites each such use on the traced graph (before any site is
rewritten): the bias becomes ``regrid_rel_bias(bias, grid, ref_grid, prefix)``, which reads, for
every pair of tokens of the site's current grid, the reference bias of a pair with the same
offset (offsets beyond the reference grid clamped to its largest, as relative-position tables
clip distances). Only what a table lookup can do is done: the rewrite is made when the bias at
the reference grid is translation-invariant (every pair's value is its offset's: checked on its
values, so a learned ``L x L`` token-mixing matrix such as gMLP's is left alone) and the prefix
tokens' rows and columns are constant along the grid, for random parameter values (so a
zero-initialised matrix does not pass for a table). At the reference grid the bias comes back
unchanged (exact at init); the gather carries the gradient to the table.

The pass is a pure function of the annotated graph and the candidate sites, so ``apply_plan``
replays it exactly.
"""
from __future__ import annotations

from functools import lru_cache
from itertools import takewhile

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from .patch_reshape import window_partition
from .pos_embed import ADDS, MAX_PREFIX, ancestors, node_shape
from .sites import Candidate

__all__ = ["regrid_rel_bias", "follow_rel_biases", "pair_index"]

@lru_cache(maxsize=64)
def _pair_index_np(grid: tuple[int, int], ref_grid: tuple[int, int], prefix: int) -> tuple[np.ndarray, np.ndarray]:
    # numpy, not torch: a cached tensor made while the shape passes run under FakeTensorMode
    # would be a fake tensor, and leak into later real runs
    (h, w), (rh, rw) = grid, ref_grid
    y, x = np.divmod(np.arange(h * w), w)
    dy = np.clip(y[:, None] - y[None, :], -(rh - 1), rh - 1)
    dx = np.clip(x[:, None] - x[None, :], -(rw - 1), rw - 1)
    n = prefix + h * w
    rows = np.full((n, n), prefix, dtype=np.int64)  # prefix columns: any token's row
    cols = np.full((n, n), prefix, dtype=np.int64)  # prefix rows: any token's column
    rows[prefix:, prefix:] = prefix + np.maximum(dy, 0) * rw + np.maximum(dx, 0)
    cols[prefix:, prefix:] = prefix + np.maximum(-dy, 0) * rw + np.maximum(-dx, 0)
    rows[:prefix, :] = np.arange(prefix)[:, None]
    cols[:, :prefix] = np.arange(prefix)[None, :]
    rows.setflags(write=False)
    cols.setflags(write=False)
    return rows, cols


def pair_index(grid: tuple[int, int], ref_grid: tuple[int, int], prefix: int) -> tuple[Tensor, Tensor]:
    """Row and column indices ``(L', L')`` into a reference bias ``(L, L)`` (``L = prefix +
    rh*rw``, ``L' = prefix + h*w``, tokens row-major after the prefix): each pair of the new grid
    maps to a reference pair with the same offset, clamped to the reference range."""
    rows, cols = _pair_index_np(tuple(grid), tuple(ref_grid), prefix)
    return torch.tensor(rows), torch.tensor(cols)


def regrid_rel_bias(bias: Tensor, grid: Tensor, ref_grid: tuple[int, int], prefix: int) -> Tensor:
    """``bias`` (``..., L, L`` at ``ref_grid``) for the tokens of ``grid``'s spatial size (its last
    two dims); returned unchanged at ``ref_grid``."""
    size = (int(grid.shape[-2]), int(grid.shape[-1]))
    if size == tuple(ref_grid):
        return bias
    rows, cols = _device_index(size, tuple(ref_grid), prefix, bias)
    return bias[..., rows, cols]


#: index tensors on their device (no host-to-device copy per call on a GPU), real tensors only
_ON_DEVICE: dict[tuple, tuple[Tensor, Tensor]] = {}


def _device_index(grid: tuple[int, int], ref_grid: tuple[int, int], prefix: int, like: Tensor) -> tuple[Tensor, Tensor]:
    from torch._subclasses.fake_tensor import is_fake

    if is_fake(like):  # shape passes: fresh tensors of the mode, never kept (nor real ones mixed in)
        return tuple(t.to(like.device) for t in pair_index(grid, ref_grid, prefix))
    key = (grid, ref_grid, prefix, like.device)
    if key not in _ON_DEVICE:
        rows, cols = (t.to(like.device) for t in pair_index(grid, ref_grid, prefix))
        if is_fake(rows):
            return rows, cols
        if len(_ON_DEVICE) < 256:
            _ON_DEVICE[key] = rows, cols
        return rows, cols
    return _ON_DEVICE[key]


def _input_dependent(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes whose value depends on the model's input."""
    dependent: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder" or any(a in dependent for a in node.all_input_nodes):
            dependent.add(node)
    return dependent


def _value(gm: fx.GraphModule, node: fx.Node) -> Tensor | None:
    """The value of a node that depends on parameters and buffers only, with every parameter
    replaced by random values (None if it fails): a bias that is relative for random tables is
    relative by construction, not by the values it happens to hold (a zero-initialised one)."""
    env: dict[fx.Node, object] = {}
    g = torch.Generator().manual_seed(0)
    needed = set(ancestors(node)) | {node}
    todo = [n for n in gm.graph.nodes if n in needed]
    try:
        with torch.no_grad():
            for n in todo:
                args = fx.node.map_arg(n.args, env.__getitem__)
                kwargs = fx.node.map_arg(n.kwargs, env.__getitem__)
                if n.op == "get_attr":
                    value = gm
                    for part in n.target.split("."):
                        value = getattr(value, part)
                    if isinstance(value, nn.Parameter):
                        value = torch.randn(value.shape, generator=g, dtype=value.dtype).to(value.device)
                    env[n] = value
                elif n.op == "call_function":
                    env[n] = n.target(*args, **kwargs)
                elif n.op == "call_method":
                    env[n] = getattr(args[0], n.target)(*args[1:], **kwargs)
                elif n.op == "call_module":
                    env[n] = gm.get_submodule(n.target)(*args, **kwargs)
                else:
                    return None
    except Exception:  # noqa: BLE001 - a value we cannot compute is simply not rewritten
        return None
    value = env.get(node)
    return value if isinstance(value, Tensor) else None


def _is_parameter(gm: fx.GraphModule, target: str) -> bool:
    try:
        gm.get_parameter(target)
    except AttributeError:
        return False
    return True


def _source_name(gm: fx.GraphModule, node: fx.Node) -> str:
    """What the bias is made from, for the note: its table parameter, else the module computing
    it (an MLP over the offsets), else the node."""
    closure = set(ancestors(node)) | {node}
    tables = sorted(n.target for n in closure if n.op == "get_attr" and _is_parameter(gm, n.target))
    if tables:
        return tables[0]
    modules = [n.target.split(".") for n in closure if n.op == "call_module"]
    common = [parts[0] for parts in takewhile(lambda parts: len(set(parts)) == 1, zip(*modules))]
    return ".".join(common) or node.name


def _is_relative(bias: Tensor, grid: tuple[int, int], prefix: int) -> bool:
    """Whether ``bias`` is a function of the token offsets alone (and its prefix rows and columns
    constant along the grid): exactly what a relative-position table gives."""
    rows, cols = pair_index(grid, grid, prefix)
    return bool(torch.equal(bias[..., rows, cols], bias))


def _uses(node: fx.Node) -> list[tuple[fx.Node, fx.Node]]:
    """(consumer, other operand) pairs where ``node`` is added to attention logits or passed as an
    attention mask."""
    out = []
    for user in node.users:
        if user.op == "call_function" and user.target in ADDS and len(user.args) == 2 and node in user.args:
            other = user.args[1] if user.args[0] is node else user.args[0]
            if isinstance(other, fx.Node):
                out.append((user, other))
        elif user.op == "call_function" and user.target is F.scaled_dot_product_attention:
            if user.kwargs.get("attn_mask") is node or (len(user.args) > 3 and user.args[3] is node):
                out.append((user, user.args[0]))  # the queries: their tokens are the rows
    return out


def _grid_site(other: fx.Node, n_tokens: int, sites: dict[fx.Node, Candidate],
               order: dict[fx.Node, int]) -> tuple[fx.Node, tuple[int, int], int] | None:
    """The nearest site upstream of ``other`` whose grid (plus a few prefix tokens) is ``n_tokens``."""
    for node in sorted(ancestors(other) + [other], key=order.__getitem__, reverse=True):
        out = node_shape(node)
        if node in sites and out is not None and len(out) == 4:
            gh, gw = out[2:]
            if gh * gw > 1 and 0 <= n_tokens - gh * gw <= MAX_PREFIX:
                return node, (gh, gw), n_tokens - gh * gw
    return None


def follow_rel_biases(gm: fx.GraphModule, candidates: list[Candidate]) -> list[str]:
    """Rewrite, in place, every parameter-only ``L x L`` bias added to attention logits over the
    tokens of a candidate site's grid so that it follows the grid; returns one note per bias.

    ``gm`` must carry ``tensor_meta`` (``AnnotatedGraph``) from the reference input."""
    nodes = {n.name: n for n in gm.graph.nodes}
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    sites = {nodes[c.node]: c for c in candidates if c.node in nodes and c.kind != "interpolate"}
    if not sites:
        return []
    dependent = _input_dependent(gm)
    notes = []
    for node in list(gm.graph.nodes):
        shape = node_shape(node)
        if node in dependent or shape is None or len(shape) < 2 or shape[-1] != shape[-2]:
            continue
        for user, other in _uses(node):
            if other not in dependent:
                continue
            found = _grid_site(other, shape[-1], sites, order)
            if found is None:
                continue
            site_node, grid, prefix = found
            if any(order[a] > order[site_node] and window_partition(a) for a in ancestors(other)):
                continue  # attention within windows (Swin's, a window as large as the grid at the reference)
            value = _value(gm, node)
            if value is None or not _is_relative(value, grid, prefix):
                continue
            with gm.graph.inserting_before(user):
                call = gm.graph.call_function(regrid_rel_bias, (node, site_node, tuple(grid), prefix))
            call.meta = dict(node.meta)
            order[call] = order[user] - 0.5
            user.replace_input_with(node, call)
            notes.append(f"relative-position bias {_source_name(gm, node)} -> {list(shape)} follows the grid of site "
                         f"{sites[site_node].name} ({prefix} prefix tokens, {grid[0]}x{grid[1]} at the reference size)")
    if notes:
        gm.graph.lint()
        gm.recompile()
    return notes
