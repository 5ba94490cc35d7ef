"""Tie groups: which sites must keep equal output sizes (DESIGN.md §2, "Tying").

The conversion-time source of groups: one union-find object, built once from the annotated
graph; ``convert`` numbers its groups (the plan's ids), ``rewrite`` gives each one stride
parameter, and from then on ``group_ids.stride_groups`` reads them off the converted model.
Every tensor carries the *origin* of its spatial size: the site that last resized it on its way
from the input, traced through size-preserving ops, tuples (``split``, a leaf module's outputs)
and ``getitem``. Where a node joins spatial operands of different origins
(``joins.joined_operands``: elementwise ops and methods, ``cat`` and ``stack`` of a list,
``expand_as``, ``einsum``/``matmul`` over spatial axes, leaf modules with several maps), those
sites must keep equal output sizes and share one stride. Broadcast operands (a 1x1 map such as
squeeze-excitation's gate) do not tie.
"""
from __future__ import annotations

from typing import Iterable

from torch import fx

from .joins import is_matmul, joined_operands, origin_source, spatial as _spatial
from .pos_embed import resample_pos_embed
from .rel_pos import regrid_rel_bias
from .sites import Candidate

__all__ = ["TieGraph"]

INPUT = "<input>"
CONST = "<constant>"


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    """Inputs that carry tensors: one tensor, or a tuple of them (``split``, a leaf module's outputs)."""
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n) or n)
    return [n for n in found if n.meta.get("tensor_meta") is not None]


class TieGraph:
    """Union-find over convertible sites, built from the annotated graph (``tensor_meta``, ``annotated_graph.py``).

    >>> ties = TieGraph(gm, candidates)        # doctest: +SKIP
    >>> ties.groups()                          # [[site node names tied together], ...]
    """

    def __init__(self, gm: fx.GraphModule, candidates: Iterable[Candidate]) -> None:
        cands = list(candidates)
        self._sites = {c.node: c for c in cands if not c.skip_reason}
        skipped = [c for c in cands if c.skip_reason]
        # a skipped op that resizes by a fixed rule starts a new size origin; one that sizes its
        # output from elsewhere (adaptive pools, size-targeted interpolation) is "unknown"
        self._fixed = {c.node: c for c in skipped if c.stride not in (None, (1.0, 1.0))}
        self._unknown = {c.node for c in skipped if c.stride is None}
        self._parent = {name: name for name in self._sites}
        self._input_size: dict[str, tuple[int, int] | None] = {}
        self._input_origin: dict[str, str | None] = {}  # site -> the origin of its input's size
        self._output_size: dict[str, tuple[int, int] | None] = {}  # site -> its output's (h, w)
        self.notes: list[str] = []
        self._names = {c.node: c.name for c in cands}
        self._build(gm)
        self._tie_inputs()

    # union-find ---------------------------------------------------------------------
    def find(self, site: str) -> str:
        """Representative site of ``site``'s group (``site`` itself for a non-site origin)."""
        parent = self._parent
        if site not in parent:
            return site
        while parent[site] != site:
            parent[site] = parent[parent[site]]
            site = parent[site]
        return site

    def _compatible(self, a: str, b: str) -> bool:
        ca, cb = self._sites[a], self._sites[b]
        return ca.stride == cb.stride and self._input_size.get(a) == self._input_size.get(b)

    def _union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            first, second = sorted((ra, rb), key=self._order.__getitem__)
            self._parent[second] = first

    # building -----------------------------------------------------------------------
    def _build(self, gm: fx.GraphModule) -> None:
        origin: dict[str, str | None] = {}
        self._order = {node.name: i for i, node in enumerate(gm.graph.nodes)}
        for node in gm.graph.nodes:
            args = _tensor_args(node)
            if node.op == "placeholder":
                origin[node.name] = INPUT
                continue
            if node.op == "get_attr":
                origin[node.name] = CONST
                continue
            if node.name in self._sites:
                self._input_size[node.name] = _spatial(args[0]) if args else None
                self._input_origin[node.name] = origin.get(args[0].name) if args else None
                self._output_size[node.name] = _spatial(node)
                origin[node.name] = node.name
                continue
            if node.name in self._unknown:
                origin[node.name] = None
                continue
            if node.name in self._fixed:
                origin[node.name] = f"<fixed by {self._names[node.name]}>"
                continue
            if node.target in (resample_pos_embed, regrid_rel_bias):  # sized by the grid it follows, not by the parameter
                origin[node.name] = origin.get(node.args[1].name)
                continue
            out = _spatial(node)
            joined = joined_operands(node, [a for a in args if origin.get(a.name) is not None])
            if is_matmul(node):  # only maps that show their site's grid (not q @ k^T of tokens)
                joined = [a for a in joined if self._shows_grid(a, origin[a.name])]
            if len(joined) >= 2:
                tied = self._join(node, [origin[a.name] for a in joined])
                source = origin_source(node)  # attention joins keys and values; queries size the output
                origin[node.name] = origin.get(source.name) if source is not None else tied
                continue
            if joined:  # the one full-size operand sizes the output, not a broadcast one before it
                origin[node.name] = origin[joined[0].name]
                continue
            source = origin_source(node)
            if source is not None:
                origin[node.name] = origin.get(source.name)
                continue
            first = next((a for a in args if origin.get(a.name) is not None), None)
            if first is None:
                origin[node.name] = None
            elif out == (1, 1) and _spatial(first) not in (None, (1, 1)):
                origin[node.name] = None  # global pooling: a broadcast operand from here on
            else:
                origin[node.name] = origin[first.name]

    def _shows_grid(self, a: fx.Node, source: str) -> bool:
        """Whether ``a``'s last two axes are the output grid of site ``source`` (or not a site's:
        then they are taken as a map, as before), not tokens and channels that follow it."""
        grid = self._output_size.get(source)
        return grid is None or _spatial(a) in (grid, grid[::-1])

    def _tie_inputs(self) -> None:
        """The sites of one group give equal outputs only from equal inputs, so the groups that
        size their inputs are tied too, until nothing changes (HRNet adds a branch downsampled
        by two chained convs to one downsampled by two others: the first convs of both chains
        must move together, or the sums break by a rounding pixel)."""
        changed = True
        while changed:
            changed = False
            sources: dict[str, list[str]] = {}
            for site, src in self._input_origin.items():
                if src in self._sites:
                    sources.setdefault(self.find(site), []).append(self.find(src))
            for roots in sources.values():
                head, *rest = dict.fromkeys(roots)
                for r in rest:
                    if self.find(r) != self.find(head) and self._compatible(head, r):
                        self._union(head, r)
                        changed = True

    def _join(self, node: fx.Node, origins: list[str]) -> str:
        roots = list(dict.fromkeys(self.find(o) for o in origins))
        if len(roots) == 1:
            return roots[0]
        sites = [r for r in roots if r in self._sites]
        others = [r for r in roots if r not in self._sites]
        head = sites[0] if sites else roots[0]
        for r in sites[1:]:
            if self._compatible(head, r):
                self._union(head, r)
            else:
                self.notes.append(
                    f"{node.name}: joins outputs of {self._names[head]} and {self._names[r]}, which differ in input size or stride and cannot share one"
                )
        for r in others:
            if sites:
                self.notes.append(f"{node.name}: joins the output of {self._names[head]} with a tensor sized by {r}")
        return self.find(head)

    # queries ------------------------------------------------------------------------
    def groups(self) -> list[list[str]]:
        """Tied sites (fx node names), each group in graph order, groups ordered by first site."""
        by_root: dict[str, list[str]] = {}
        for name in sorted(self._sites, key=self._order.__getitem__):
            by_root.setdefault(self.find(name), []).append(name)
        return list(by_root.values())

    def input_size(self, site: str) -> tuple[int, int] | None:
        """Spatial size of the site's input at the reference size."""
        return self._input_size.get(site)
