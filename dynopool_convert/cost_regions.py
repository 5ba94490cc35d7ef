"""Module regions the cost model probes whole: its fallback where no rule follows a node.

Where the cost model cannot follow a node's size (an LSTM over the rows of a map: timm's
Sequencer; decomposed relative-position tables, one per axis: timm's SAM-ViT), the outermost
module of the original model that encloses the node and maps one map to one map (N x C x H x W
or N x H x W x C), holding no DynOPool site (where there is none, the call alone, if it takes one
map to one map: a crop in the model's own forward), is cut out of the graph (its nodes found by the
qualified names the tracer gave them) and run alone per input size, as a leaf module is: its
output size and fvcore FLOPs at each size come from the probe. The other instances of the same
module (the same path up to its block indices, the same code) are cut out alike. A probed region
is a guess read off the shape passes, so the whole model is checked against fvcore at a third
setting.
Package-internal.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from torch import fx

from .annotated_graph import TensorInfo
from .dynopool import DynOPool
from .dynresize import DynResize
from .tracing import QUALNAME

#: at most this many rounds of finding regions after a refusal (each finds every instance of one module)
MAX_REGION_ROUNDS = 6


@dataclass(eq=False)
class Region:
    """One module's nodes: ``entry`` (outside) is the one map in, ``exit`` (inside) the one map out."""

    path: str
    nodes: set[fx.Node]
    entry: fx.Node
    exit: fx.Node
    module: fx.GraphModule = field(repr=False)
    #: what the region's size and FLOPs depend on: its code (the path left out), its modules'
    #: and tensors' configurations and its input's shape; equal signatures share their probes
    signature: tuple = field(repr=False, default=())
    #: its ops in order, configurations left out: equal for the same code (a block of another stage)
    structure: tuple = field(repr=False, default=())

    def flops(self, node_flops: dict[fx.Node, int]) -> int:
        """fvcore's FLOPs of the region's nodes at the reference strides."""
        return sum(node_flops.get(n, 0) for n in self.nodes)


def _qualname(n: fx.Node) -> str | None:
    return n.meta.get(QUALNAME)


def _enclosing_paths(n: fx.Node) -> list[str]:
    """The module paths that hold ``n``, innermost first (a module call's own target first)."""
    name = _qualname(n)
    if not name:
        return []
    parts = name.split(".")
    start = len(parts) if n.op == "call_module" else len(parts) - 1
    return [".".join(parts[:i]) for i in range(start, 0, -1)]


def _is_map(info: Any) -> bool:
    return isinstance(info, TensorInfo) and len(info.shape) == 4


def cut_region(gm: fx.GraphModule, path: str, ref: dict[fx.Node, Any]) -> Region | None:
    """The region of module ``path``, or None where it is not one map in, one map out, or holds
    a DynOPool site (or nodes the conversion added inside it)."""
    members = [m for m in gm.graph.nodes if m.op not in ("placeholder", "output")
               and (q := _qualname(m)) is not None and (q == path or q.startswith(path + "."))]
    return _cut(gm, path, members, ref)


def node_region(gm: fx.GraphModule, n: fx.Node, ref: dict[fx.Node, Any]) -> Region | None:
    """The region of one function or method call in the model's own forward (no module holds
    it: a crop ``x[:, :, 3:, 3:]``), or None where it is not one map in, one map out."""
    if n.op not in ("call_function", "call_method"):
        return None
    return _cut(gm, n.name, [n], ref)


def _cut(gm: fx.GraphModule, path: str, members: list[fx.Node], ref: dict[fx.Node, Any]) -> Region | None:
    inside = set(members)
    if not members or any(
        m.op == "call_module" and isinstance(gm.get_submodule(m.target), (DynOPool, DynResize)) for m in members
    ):
        return None
    entries = {a for m in members for a in m.all_input_nodes if a not in inside and a.op != "get_attr"}
    exits = [m for m in members if m.op != "get_attr" and any(u not in inside for u in m.users)]
    if len(entries) != 1 or len(exits) != 1:
        return None
    entry, exit_ = entries.pop(), exits[0]
    if not (_is_map(ref.get(entry)) and _is_map(ref.get(exit_))):
        return None
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {entry: graph.placeholder("x")}
    for m in members:  # in graph order
        for a in m.all_input_nodes:
            if a.op == "get_attr" and a not in env and a not in inside:  # a parameter read outside
                env[a] = graph.node_copy(a)
        env[m] = graph.node_copy(m, lambda a: env[a])
    graph.output(env[exit_])
    module = fx.GraphModule(gm, graph, "Region")
    return Region(path, inside, entry, exit_, module, *_signature(module, path, ref[entry]))


def _signature(module: fx.GraphModule, path: str, entry: TensorInfo) -> tuple[tuple, tuple]:
    """The region's signature and structure (``Region``'s fields)."""
    def local(name: str) -> str:  # the name within the module (its path left out)
        for prefix in (path + ".", path.replace(".", "_") + "_"):
            if name.startswith(prefix):
                return name[len(prefix):]
        return name

    index = {n: i for i, n in enumerate(module.graph.nodes)}
    parts, structure = [], []
    for n in module.graph.nodes:
        target = local(n.target) if isinstance(n.target, str) else getattr(n.target, "__qualname__", repr(n.target))
        config: Any = None
        if n.op == "call_module":
            sub = module.get_submodule(n.target)
            config = (type(sub).__qualname__, sub.extra_repr(), [(k, tuple(v.shape)) for k, v in sub.state_dict().items()])
        elif n.op == "get_attr":
            config = tuple(getattr(module.get_submodule(n.target.rpartition(".")[0]), n.target.rpartition(".")[2]).shape)
        args = fx.node.map_arg((n.args, n.kwargs), lambda a: ("node", index[a]))
        parts.append(repr((n.op, target, config, args)))
        structure.append((n.op, target))
    return (tuple(parts), tuple(entry.shape), str(entry.dtype)), tuple(structure)


def _siblings(path: str, paths: set[str]) -> list[str]:
    """``path`` and the paths that differ from it only in their numeric parts (other blocks, if
    their code is the same)."""
    pattern = re.compile(r"\.".join(r"\d+" if p.isdigit() else re.escape(p) for p in path.split(".")))
    return sorted({p for p in paths if pattern.fullmatch(p)} | {path})


def _conflicts(region: Region, known: list[Region]) -> bool:
    """Whether ``region`` is one of ``known`` or cuts one of them in part (it may hold them whole)."""
    return any(region.nodes == k.nodes or (region.nodes & k.nodes and not k.nodes <= region.nodes) for k in known)


def regions_for(gm: fx.GraphModule, failed: fx.Node, ref: dict[fx.Node, Any], known: list[Region]) -> list[Region] | None:
    """The regions to probe once the cost model could not follow ``failed``: ``known`` plus the
    outermost module around it that can be cut out, with its siblings (known regions inside them
    dropped); None when there is no such module."""
    cuts = [r for r in (cut_region(gm, path, ref) for path in _enclosing_paths(failed)) if r is not None]
    cuts = [r for r in cuts if not _conflicts(r, known)]
    if not cuts:  # no module around it can be cut out: the call alone, if it is one map to one map
        alone = node_region(gm, failed, ref)
        return None if alone is None or _conflicts(alone, known) else [*known, alone]
    # the outermost: the more of the model a probe runs as it is, the less is left to rules
    # read off two shape passes (SAM-ViT at 224 px: with its attention cut out alone, the block's
    # window partition, whose batch of windows grows once the grid outgrows a window, was left
    # to rules that cannot follow it; probed whole, the blocks run it)
    region = cuts[-1]
    prefixes = {p for n in gm.graph.nodes for p in _enclosing_paths(n)}
    found = [region]
    for other in _siblings(region.path, prefixes):
        r = cut_region(gm, other, ref) if other != region.path else None
        if r is not None and r.structure == region.structure and not _conflicts(r, known):
            found.append(r)
    covered = set().union(*(r.nodes for r in found))
    return [k for k in known if not k.nodes <= covered] + found
