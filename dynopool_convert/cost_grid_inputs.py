"""Inputs of a token leaf that are made from its grid's sizes, rebuilt at each probed size.

The Swin detection code's blocks (kept whole: they branch on sizes) take, besides the tokens,
the shifted windows' attention mask, made per forward from the grid: ``zeros((1, ceil(H / ws) *
ws, ...))``, filled by item assignment, cut into windows. A probe of such a block at another
grid needs the mask of that grid. ``grid_tensor`` finds the subgraph that makes it from the
grid's height and width alone (ints moving as the grid does, constants, parameters; item
assignments into it included) and returns it as a function of ``(h, w)``; ``stored_grid`` the
grid values stored on the leaf by the graph before the call (``blk.H = H``,
``proxy_mutations.set_module_attribute``), which a probe sets likewise. Package-internal.
"""
from __future__ import annotations

import operator
from typing import Any, Callable

from torch import Tensor, fx

from .annotated_graph import TensorInfo
from .proxy_mutations import set_module_attribute

__all__ = ["grid_tensor", "stored_grid", "HEIGHT", "WIDTH"]

HEIGHT, WIDTH = "h", "w"


def _side(r: Any, p: Any, size_r: tuple[int, int], size_p: tuple[int, int]) -> str | None:
    """``HEIGHT``/``WIDTH`` for an int moving as the grid's height/width at both passes."""
    if not (isinstance(r, int) and isinstance(p, int)) or isinstance(r, bool) or r == p:
        return None
    if (r, p) == (size_r[0], size_p[0]):
        return HEIGHT
    return WIDTH if (r, p) == (size_r[1], size_p[1]) else None


def _subgraph(a: fx.Node, ref: dict, pert: dict, size_r: tuple[int, int], size_p: tuple[int, int]
              ) -> tuple[list[fx.Node], dict[fx.Node, str], dict[fx.Node, Any]] | None:
    """(nodes to replay, grid sides, constants) making ``a`` from the grid alone, or None.

    A value that equals the grid's size at both passes is computed where it can be (the size of
    a tensor made here, ``ceil(h / 4) * 4`` where both grids were multiples of 4), else taken as the
    grid's (a size read off the model's tokens)."""
    replay: list[fx.Node] = []
    sides: dict[fx.Node, str] = {}
    consts: dict[fx.Node, Any] = {}
    done: dict[fx.Node, bool] = {}

    def visit(node: fx.Node) -> bool:
        if node in done:
            return done[node]
        r, p = ref.get(node), pert.get(node)
        side = _side(r, p, size_r, size_p) if node is not a else None
        if node is not a and not isinstance(r, (TensorInfo, list, tuple)) and r is not None and r == p:
            consts[node], done[node] = r, True  # a number, device or dtype the same at both passes
        elif node.op == "get_attr":
            replay.append(node)
            done[node] = True
        elif node.op in ("call_function", "call_method") and isinstance(r, (TensorInfo, int, float, tuple)):
            done[node] = True  # (cycles cannot occur: a graph is acyclic)
            mark = (len(replay), set(sides), set(consts), set(done))
            if all(visit(x) for x in node.all_input_nodes):
                replay.append(node)
            elif side is not None:  # not computable here: the grid's size, as both passes say
                del replay[mark[0]:]
                for table, before in ((sides, mark[1]), (consts, mark[2]), (done, mark[3])):
                    for k in set(table) - before:
                        if table is not done or table[k]:  # what cannot be computed stays so
                            del table[k]
                sides[node] = side
            else:
                done[node] = False
        else:
            done[node] = False  # an input of the model, or a value that moves otherwise
        return done[node]

    return (replay, sides, consts) if visit(a) else None


def grid_tensor(a: fx.Node, gm: fx.GraphModule, ref: dict, pert: dict, size_r: tuple[int, int],
                size_p: tuple[int, int]) -> Callable[[int, int], Tensor] | None:
    """``a`` remade at grid ``(h, w)`` by replaying the subgraph that makes it from the grid's
    sizes (and item assignments into what it reads), or None where it depends on anything else."""
    found = _subgraph(a, ref, pert, size_r, size_p)
    if found is None or not isinstance(ref.get(a), TensorInfo):
        return None
    replay, sides, consts = found
    members, order = set(replay), {n: i for i, n in enumerate(gm.graph.nodes)}
    for n in gm.graph.nodes:  # item assignments into a replayed tensor, before ``a``
        if order[n] < order[a] and n.op == "call_function" and n.target is operator.setitem and n.args[0] in members:
            more = [x for x in n.all_input_nodes if x not in members]
            if any(x not in sides and x not in consts for x in more):
                return None
            replay.append(n)
    graph, env = fx.Graph(), {}
    env.update({n: graph.placeholder(f"grid_{s}_{i}") for i, (n, s) in enumerate(sides.items())})
    names = [sides[n] for n in sides]
    for n in sorted(set(replay), key=order.__getitem__):
        env[n] = graph.node_copy(n, lambda x: env[x] if x in env else consts[x])
    graph.output(env[a])
    module = fx.GraphModule(gm, graph)

    def build(h: int, w: int) -> Tensor:
        return module(*[h if s == HEIGHT else w for s in names])

    return build


def stored_grid(n: fx.Node, ref: dict, pert: dict, size_r: tuple[int, int], size_p: tuple[int, int]
                ) -> list[tuple[str, str]] | None:
    """The grid sizes the graph stores on ``n``'s module before calling it, as ``(attribute,
    HEIGHT or WIDTH)``; None where it stores something else that moves."""
    if n.op != "call_module":
        return []
    stored = []
    for s in n.graph.nodes:
        if s is n:
            break
        if s.op == "call_function" and s.target is set_module_attribute and getattr(s.args[0], "target", None) == n.target:
            value = s.args[2]
            r, p = (ref.get(value), pert.get(value)) if isinstance(value, fx.Node) else (value, value)
            side = _side(r, p, size_r, size_p)
            if side is None and r != p:
                return None
            stored += [(s.args[1], side)] if side is not None else []
    return stored
