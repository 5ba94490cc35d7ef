"""Building the cost model (``cost_model.py``): one walk of the graph gives every node a size
class, chosen among its candidate rules (``cost_rules.py``) by the two shape passes, and puts
its fvcore FLOPs on the class they scale with. Package-internal."""
from __future__ import annotations

import math
import operator
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import fx

from .annotated_graph import TensorInfo, spatial as _spatial
from .cost_regions import Region
from .cost_probe import _fixed_part, _is_torch_builtin, _LeafProbe, _plain_custom, function_call, token_call
from .cost_rules import (_TOKEN_KINDS, _check, _Class, _ClassTerm, _crop_multiple_rules, _pad_multiple_rules, _registry_rules, _ResizeTerm, _Rule,
                         _downsample_rules, _own_function, _sequence_window_rules, _token_rules)
from .cost_shapes import _has_tensor, _is_shape_like, _shape_of, _shows, _shows_both
from .dynopool import DynOPool
from .dynresize import DynResize
from .errors import UnsupportedModelError
from .flops import DYNRESIZE_FLOPS_PER_OUTPUT

if TYPE_CHECKING:
    from .cost_model import CostModel


def _packs_output(n: fx.Node) -> bool:
    """A namedtuple built only to be returned (``return Out(features, logits)``)."""
    target = n.target
    return (n.op == "call_function" and isinstance(target, type) and issubclass(target, tuple)
            and hasattr(target, "_fields") and all(u.op == "output" for u in n.users))


def _lineage(classes: list[_Class]) -> list[_Class]:
    """The classes ``classes`` derive from, nearest first (not those among them): tokens cut
    from an image by reshaping count the patch grid the image was rebuilt from (``patch_reshape.py``)."""
    found: list[_Class] = []
    for c in classes:
        parent = c.parent
        while parent is not None:
            if parent not in classes and parent not in found:
                found.append(parent)
            parent = parent.parent
    return found


def _learned(c: _Class | None) -> bool:
    """Whether class ``c``'s size depends on a learned stride (a DynOPool among its sources)."""
    stack, seen = [c], set()
    while stack:
        c = stack.pop()
        if c is None or id(c) in seen:
            continue
        if c.kind == "dynopool":
            return True
        seen.add(id(c))
        stack += [c.parent, c.other, *c.others]
    return False


#: calls whose FLOPs may follow the product of two sequences' lengths (attention)
_ATTENTION_OPS = {F.scaled_dot_product_attention, torch.matmul, operator.matmul, torch.bmm, torch.einsum, "matmul", "bmm"}


class _ClassBuilder:
    """The classes, terms and constant of a cost model, built node by node."""

    def __init__(self, owner: "CostModel", gm: fx.GraphModule, ref: dict, pert: dict, ref_strides, pert_strides,
                 node_flops: dict[fx.Node, int], regions: list[Region] | None = None) -> None:
        self.owner, self.gm, self.ref, self.pert, self.node_flops = owner, gm, ref, pert, node_flops
        self.regions = {r.exit: r for r in regions or []}  # probed whole (cost_regions.py), by exit node
        self.inside = {n for r in self.regions.values() for n in r.nodes if n is not r.exit}
        self.current: fx.Node | None = None  # the node being placed (the one a refusal is about)
        self.ref_strides = owner._clamp_all(ref_strides)
        self.pert_strides = owner._clamp_all(pert_strides)
        self.classes: list[_Class] = []
        self.node_class: dict[fx.Node, _Class | None] = {}
        self.sizes_ref: dict[int, tuple[int, int]] = {}
        self.sizes_pert: dict[int, tuple[int, int]] = {}
        self.terms: dict[int, _ClassTerm] = {}
        self.opaque_terms: list[_Class] = []
        self.resize_terms: list[_ResizeTerm] = []
        self.fixed_cache: dict = {}
        self.constant = 0.0
        self.by_proportion = False  # set when a tensor follows a class by its element count only

    def add_class(self, c: _Class, r: tuple[int, int], q: tuple[int, int]) -> _Class:
        c.index = len(self.classes)
        self.classes.append(c)
        self.sizes_ref[c.index], self.sizes_pert[c.index] = r, q
        return c

    def area(self, c: _Class, sizes: dict[int, tuple[int, int]] | None = None) -> int:
        h, w = (self.sizes_ref if sizes is None else sizes)[c.index]
        return h * w

    def run(self) -> "_ClassBuilder":
        for n in self.gm.graph.nodes:
            info_r = self.ref.get(n)
            if n.op == "placeholder":
                sp = _spatial(info_r)
                self.node_class[n] = self.add_class(_Class("input", size=sp), sp, sp) if sp else None
                continue
            if n.op == "output":
                continue
            if _packs_output(n):  # a namedtuple of the outputs: no arithmetic, no size of its own
                self.node_class[n] = None
                continue
            self.current = n
            if n in self.inside:  # a probed region's inner node: its exit accounts for it
                self.node_class[n] = None
                continue
            if n in self.regions:
                self._place_region(self.regions[n])
                continue
            uniq = self._input_classes(n)
            parent = uniq[0] if uniq else None
            chosen = self._choose(n, self._rules(n, parent, uniq))
            # shapes (x.shape, x.size(2), ...) carry their tensor's class too: F.interpolate(
            # y, size=x.shape[-2:]) then follows x
            self.node_class[n] = chosen.cls if _has_tensor(info_r) or _is_shape_like(info_r) else None
            if chosen.kind == "inherit" and chosen.cls.kind != "const" and not _shows(info_r, self.sizes_ref[chosen.cls.index]):
                self.by_proportion = True
            self._attribute(n, chosen, parent, uniq)
        return self

    def _place_region(self, region: Region) -> None:
        """A region's exit: an opaque class of its entry's, the region probed whole."""
        parent = self.node_class.get(region.entry)
        if parent is None:
            raise UnsupportedModelError(
                f"the FLOPs budget does not support this model yet: module {region.path!r} takes a map of no size "
                f"its cost model knows; convert and fine-tune without a budget")
        memo = self.owner._region_memos.setdefault(region.signature, {})
        probe = _LeafProbe(region.module, self.ref[region.entry], self.gm, self._channels_last(region.entry, parent),
                           memo=memo)
        chosen = self._choose(region.exit, [_Rule("new", _Class("opaque", parent, probe=probe, guessed=True), "opaque")])
        self.node_class[region.exit] = chosen.cls
        self.opaque_terms.append(chosen.cls)
        self.constant -= chosen.cls.probed(self.sizes_ref)[1] - region.flops(self.node_flops)

    def _input_classes(self, n: fx.Node) -> list[_Class]:
        """The classes of ``n``'s inputs, the largest spatial one (broadcasting) first, preferring growing ones."""
        inputs = [self.node_class[a] for a in n.all_input_nodes if self.node_class.get(a) is not None]
        inputs.sort(key=lambda c: (self.area(c, self.sizes_pert), self.area(c), c.kind != "const"), reverse=True)
        # then the maps its scalar inputs were read from (a crop of a skip to another map's size)
        inputs += [self.node_class[a] for a in self._shape_sources(n) if self.node_class.get(a) is not None]
        uniq: list[_Class] = []
        for c in inputs:
            if c not in uniq:
                uniq.append(c)
        return uniq

    def _shape_sources(self, n: fx.Node) -> list[fx.Node]:
        """The tensors whose sizes ``n``'s scalar inputs were computed from (``y.size(2) // 2``)."""
        found: list[fx.Node] = []
        seen: set[fx.Node] = set()
        todo = [a for a in n.all_input_nodes if not _has_tensor(self.ref.get(a))]
        while todo:
            a = todo.pop()
            if a in seen:
                continue
            seen.add(a)
            for b in a.all_input_nodes:
                if isinstance(self.ref.get(b), TensorInfo):
                    found.append(b)
                elif not _has_tensor(self.ref.get(b)):
                    todo.append(b)
        return found

    def _rules(self, n: fx.Node, parent: _Class | None, uniq: list[_Class]) -> list[_Rule]:
        """Candidate explanations of ``n``'s output size, in order of preference."""
        rules: list[_Rule] = []
        module = self.gm.get_submodule(n.target) if n.op == "call_module" else None
        if isinstance(module, DynOPool):
            g = self.owner._group_of[id(module.stride)]
            rules.append(_Rule("new", _Class("dynopool", parent, group=g, params=module.multiple, base=module.base), "out"))
        elif n.op in ("call_module", "call_function") and parent is not None:
            rules += _registry_rules(n, self.gm, self.ref, self.pert, parent)
        probe_rule = None
        if module is not None and parent is not None and not _is_torch_builtin(module):
            probe_rule = self._leaf_probe_rule(n, module, uniq)
        if probe_rule is None and parent is not None and self.node_flops.get(n, 0):
            probe_rule = self._function_probe_rule(n, uniq)
            if probe_rule is not None:
                rules.append(probe_rule)  # its FLOPs need not scale with its output size
        if probe_rule is not None and _plain_custom(module) and self.node_flops.get(n, 0):
            rules.append(probe_rule)  # its FLOPs need not scale with its output size
        if parent is not None:
            rules += _sequence_window_rules(n, self.gm, self.ref, self.pert, parent, self.sizes_ref, self.sizes_pert)
            for guess in (_pad_multiple_rules, _crop_multiple_rules, _downsample_rules):
                rules += guess(n, self.ref.get(n), self.pert.get(n), parent, self.sizes_ref, self.sizes_pert)
            if not self._tensor_inputs(n):  # a tensor made from sizes: any class they were read from
                for other in (c for c in uniq[1:] if c.kind != "const"):
                    rules += _pad_multiple_rules(n, self.ref.get(n), self.pert.get(n), other, self.sizes_ref, self.sizes_pert)
        # an input class the output shows as a map first, then those it follows by element count
        # (tokens reshaped back into a map: Twins)
        shows = lambda c: _shows_both(self.ref.get(n), self.pert.get(n), self.sizes_ref[c.index], self.sizes_pert[c.index])  # noqa: E731
        shown = [c for c in uniq if shows(c)]
        lineage = _lineage(uniq)  # the classes the inputs derive from (once: a walk of parents)
        if not shown:  # tokens of a patch grid rebuilt into the grid's map (vit-pytorch's PiT pooling)
            shown = [c for c in lineage if c.kind != "const" and shows(c)][:1]
            uniq, lineage = uniq + shown, [c for c in lineage if c not in shown]
        if not shown and _spatial(self.ref.get(n)) and not any(map(_learned, uniq)):
            # a map made of inputs that do not move (tokens before the first learned group,
            # reshaped into a map; they follow the image by element count): a fixed size of
            # its own, not the image's
            rules.append(_Rule("new", _Class("const"), "in"))
        rules += self._grid_tokens(n, uniq, lineage)
        # where the two passes cannot tell (a window's attention plus a fixed bias table), the
        # class a learned stride moves: the whole model's check at a third setting decides
        first = {id(c): i for i, c in enumerate(shown)}
        order = sorted(uniq, key=lambda c: (id(c) not in first, not _learned(c), first.get(id(c), 0)))
        rules += [_Rule("inherit", c, "in") for c in order]
        if probe_rule is not None and probe_rule not in rules:
            rules.append(probe_rule)
        rules += _token_rules(self.ref.get(n), self.pert.get(n), uniq + lineage, self.sizes_ref)
        rules.append(_Rule("new", _Class("const"), "in"))
        return rules

    def _grid_tokens(self, n: fx.Node, uniq: list[_Class], lineage: list[_Class]) -> list[_Rule]:
        """Tokens ``(N, L, C)`` cut from an image rebuilt from a patch grid (``patch_reshape.py``):
        ``L`` is no input's ``h*w`` but the grid's, at both passes. Before inheriting the image
        by element count, which would take the attention over them for work per pixel."""
        r, p = self.ref.get(n), self.pert.get(n)
        if not (isinstance(r, TensorInfo) and isinstance(p, TensorInfo) and len(r.shape) == len(p.shape) == 3):
            return []
        counts = lambda c: (math.prod(self.sizes_ref[c.index]), math.prod(self.sizes_pert[c.index]))  # noqa: E731
        if any(counts(c) == (r.shape[1], p.shape[1]) for c in uniq):
            return []
        return [_Rule("new", _Class("tokens", c, params=(0,)), "out") for c in lineage
                if counts(c) == (r.shape[1], p.shape[1]) and c.kind != "const"][:1]

    def _leaf_probe_rule(self, n: fx.Node, module: torch.nn.Module, uniq: list[_Class]) -> _Rule | None:
        """A probe of a leaf we know nothing about (timm's ConvMlp or MobileViT block:
        data-dependent sizes inside), per input size. With several inputs (MobileNetV5's
        multi-scale fusion: maps of several sizes resized to the largest one's, then to a fixed
        output size) it runs at every moving input's size (other tensors fixed at their
        recorded shapes); a class of several inputs has the whole model checked once more."""
        parent = uniq[0]
        if len(uniq) == 1:
            main = n.all_input_nodes[0] if n.all_input_nodes else None
        else:
            main = next((a for a in n.all_input_nodes if self.node_class.get(a) is parent), None)
        tokens = self._token_input(n, uniq) if len(uniq) > 1 else None
        if tokens is not None:  # tokens and tensors made from their grid (the Swin code's blocks and mask)
            main, parent = tokens
        in_info = self.ref.get(main) if main is not None else None
        if isinstance(in_info, TensorInfo) and len(in_info.shape) == 3 and (len(uniq) == 1 or tokens is not None):
            found = token_call(n, main, self.ref, self.pert, self.sizes_ref[parent.index], self.sizes_pert[parent.index], self.gm)
            if found is None:
                return None
            call, ambiguous, stored = found
            probe = _LeafProbe(module, in_info, self.gm, call=call, tokens=True, stored=stored)
            return _Rule("new", _Class("opaque", parent, probe=probe, guessed=ambiguous or len(uniq) > 1), "opaque")
        if not (isinstance(in_info, TensorInfo) and len(in_info.shape) == 4):
            return None
        others = [c for c in uniq[1:] if c.kind != "const"]
        moving = {a: i for a in n.all_input_nodes for i, c in enumerate(others) if self.node_class.get(a) is c}
        call = None if len(uniq) == 1 else function_call(n, main, self.ref, self.gm, moving)
        probe = _LeafProbe(module, in_info, self.gm, self._channels_last(main, parent), call)
        return _Rule("new", _Class("opaque", parent, probe=probe, guessed=len(uniq) > 1, others=tuple(others)), "opaque")

    def _tensor_inputs(self, n: fx.Node) -> bool:
        return any(isinstance(self.ref.get(a), TensorInfo) for a in n.all_input_nodes)

    def _token_input(self, n: fx.Node, uniq: list[_Class]) -> tuple[fx.Node, _Class] | None:
        """The ``N x (h * w) x C`` input of ``n`` holding the tokens of one of its input classes
        at both passes, and that class; None where there is no such input."""
        for a in n.all_input_nodes:
            c, r, p = self.node_class.get(a), self.ref.get(a), self.pert.get(a)
            if c in uniq and c.kind != "const" and isinstance(r, TensorInfo) and isinstance(p, TensorInfo) \
                    and len(r.shape) == len(p.shape) == 3 and (r.shape[1], p.shape[1]) == (
                        math.prod(self.sizes_ref[c.index]), math.prod(self.sizes_pert[c.index])):
                return a, c
        return None

    def _channels_last(self, a: fx.Node, c: _Class) -> bool:
        """Whether ``a`` holds class ``c`` as N x H x W x C (Swin's layout), by both passes: at
        one alone, C may equal H and W."""
        r, p = self.ref.get(a), self.pert.get(a)
        return not _shows_both(r, p, self.sizes_ref[c.index], self.sizes_pert[c.index], axes=(2,)) and _shows_both(
            r, p, self.sizes_ref[c.index], self.sizes_pert[c.index], axes=(1,))

    def _function_probe_rule(self, n: fx.Node, uniq: list[_Class]) -> _Rule | None:
        """A probe of a function fx does not enter (torchvision's ``shifted_window_attention``):
        one map of a known class in, the other inputs fixed."""
        moving = [c for c in uniq if c.kind != "const"]  # fixed inputs may look larger (a bias table)
        if not _own_function(n) or len(moving) != 1:
            return None
        cls = moving[0]
        size = self.sizes_ref[cls.index]
        main = next((a for a in n.all_input_nodes if self.node_class.get(a) is cls), None)
        in_info = self.ref.get(main)
        if not (isinstance(in_info, TensorInfo) and len(in_info.shape) == 4 and size in (in_info.shape[1:3], in_info.shape[2:4])):
            return None
        probe = _LeafProbe(n.target, in_info, self.gm, self._channels_last(main, cls), function_call(n, main, self.ref, self.gm))
        return _Rule("new", _Class("opaque", cls, probe=probe), "opaque")

    def _choose(self, n: fx.Node, rules: list[_Rule]) -> _Rule:
        """The first rule both shape passes agree with (its new class added), or a loud refusal."""
        info_r, info_p = self.ref.get(n), self.pert.get(n)
        for rule in rules:
            out = _check(rule, info_r, info_p, self.sizes_ref, self.sizes_pert, self.ref_strides, self.pert_strides)
            if out is not None:
                if rule.kind == "new":
                    self.add_class(rule.cls, *out)
                return rule
        raise UnsupportedModelError(
            f"the FLOPs budget does not support this model yet: its cost model cannot follow the size of "
            f"node {n.name!r} ({n.op} {getattr(n.target, '__name__', n.target)}): "
            f"{_shape_of(info_r, others=True)} at the reference strides, "
            f"{_shape_of(info_p, others=True)} at smaller strides (it follows spatial maps through "
            f"convolutions, pools and resizes, and token sequences of h*w plus a fixed number of tokens (or pooled as a sequence) with "
            f"their attention maps, and pads to a multiple, and runs alone an enclosing module that takes one map to one "
            f"map with no site inside, or such a call in the model's own forward; an op joining several maps "
            f"into a new size, and other token counts, are not modelled); "
            f"convert and fine-tune without a budget"
        )

    def _attribute(self, n: fx.Node, chosen: _Rule, parent: _Class | None, uniq: list[_Class]) -> None:
        """Put ``n``'s fvcore FLOPs on the class they scale with (or in the constant)."""
        flops = self.node_flops.get(n, 0)
        info_r = self.ref.get(n)
        if n.op == "call_module" and isinstance(self.gm.get_submodule(n.target), DynResize) and isinstance(info_r, TensorInfo):
            # charged only where it resizes (the identity runs nothing): not one class's area
            per_pixel = DYNRESIZE_FLOPS_PER_OUTPUT * math.prod(info_r.shape[:-2])
            self.resize_terms.append(_ResizeTerm(chosen.cls, parent, float(per_pixel)))
        elif chosen.flops_on == "opaque":  # FLOPs come from the probe, per input size
            self.opaque_terms.append(chosen.cls)
            self.constant -= chosen.cls.probed(self.sizes_ref)[1] - flops  # 0 if consistent
        elif any(c.kind in _TOKEN_KINDS for c in [chosen.cls, *uniq]):
            # the node's classes, or the square of its output's (attention inside one call)
            square = _Class("pairs", chosen.cls)
            square_sizes = square.predict(self.sizes_ref, self.ref_strides), square.predict(self.sizes_pert, self.pert_strides)
            candidates = [(c, self.sizes_ref[c.index], self.sizes_pert[c.index]) for c in [chosen.cls, *uniq]]
            try:
                on = self.owner._verified_flops_class(n, flops, candidates)
            except UnsupportedModelError:
                # attention of one sequence over another (Next-ViT's pooled keys: h*w x floor(h*w/4),
                # which two passes cannot tell from (h*w)^2 / 4 where both lengths divide), then
                # of one over itself, then both in one call (nn.MultiheadAttention: projections
                # per token, attention per pair)
                on = self._cross(n, flops, uniq, distinct=True)
                if on is None:
                    try:
                        on = self.owner._verified_flops_class(n, flops, [(square, *square_sizes)])
                    except UnsupportedModelError:
                        if not self._split_tokens_and_pairs(n, flops, chosen.cls, square, square_sizes):
                            raise
                        return
                    if on is square:
                        self.add_class(square, *square_sizes)
            if on is not None:
                self._add_term(on, flops)
        elif flops:
            on = chosen.cls if chosen.flops_on == "out" or chosen.kind == "inherit" else parent
            several = len(uniq) > 1 or n.target in _ATTENTION_OPS
            if on is not None and several and n not in self.owner._mixed and not self._follows(n, flops, on):
                # several inputs (attention of queries over pooled keys and values: Twins, PVT):
                # the FLOPs follow the one whose size moves them, or both (a cross class), by
                # fvcore at both strides
                on = next((c for c in uniq if self._follows(n, flops, c)), None) or self._cross(n, flops, uniq) or on
            if on is None:
                self.constant += flops
                return
            if self._leaf_on_tokens(n, on) and not self._follows(n, flops, on):
                # a leaf over the tokens of a map (ConViT's gated attention: projections per
                # token, attention and position scores per pair)
                square = _Class("pairs", on)
                square_sizes = square.predict(self.sizes_ref, self.ref_strides), square.predict(self.sizes_pert, self.pert_strides)
                if self._split_tokens_and_pairs(n, flops, on, square, square_sizes):
                    return
            fixed = 0.0
            if n in self.owner._mixed:  # e.g. timm's StdConv2d: conv (scales) + weight standardisation (fixed)
                fixed = _fixed_part(self.gm, n, self.ref, flops, on_output=on is chosen.cls and chosen.kind != "inherit",
                                    cache=self.fixed_cache)
            self.constant += fixed
            self._add_term(on, flops - fixed)

    def _split_tokens_and_pairs(self, n: fx.Node, flops: int, tokens: _Class, square: _Class, square_sizes) -> bool:
        """FLOPs ``a * L + b * L^2`` of one call (projections and attention), ``a`` and ``b``
        solved from the two passes; the square class added, guessed (the whole model is checked
        at a third setting). False where no such non-negative split exists."""
        flops_p = self.owner._perturbed_counts()[0].get(n, 0)
        area_r, area_p = self.area(tokens), math.prod(self.sizes_pert[tokens.index])  # a token class is (L, 1)
        (q_r, q_r2), (q_p, q_p2) = square_sizes
        pairs_r, pairs_p = q_r * q_r2, q_p * q_p2
        det = area_r * pairs_p - area_p * pairs_r
        if det == 0:
            return False
        a = (flops * pairs_p - flops_p * pairs_r) / det
        b = (area_r * flops_p - area_p * flops) / det
        if a < 0 or b < 0:
            return False
        square.guessed = True
        self.add_class(square, *square_sizes)
        self._add_term(tokens, a * area_r)
        self._add_term(square, b * pairs_r)
        return True

    def _leaf_on_tokens(self, n: fx.Node, c: _Class) -> bool:
        """Whether ``n`` is a custom module fx does not enter that takes tokens ``(N, L, C)``,
        ``L`` being class ``c``'s area at both passes (its FLOPs need not scale with ``L``)."""
        if n.op != "call_module" or _is_torch_builtin(self.gm.get_submodule(n.target)) or not n.all_input_nodes:
            return False
        r, p = self.ref.get(n.all_input_nodes[0]), self.pert.get(n.all_input_nodes[0])
        return (isinstance(r, TensorInfo) and isinstance(p, TensorInfo) and len(r.shape) == len(p.shape) == 3
                and (r.shape[1], p.shape[1]) == (math.prod(self.sizes_ref[c.index]), math.prod(self.sizes_pert[c.index])))

    def _follows(self, n: fx.Node, flops: int, c: _Class) -> bool:
        """Whether ``n``'s FLOPs at the perturbed strides are in proportion to ``c``'s area."""
        (h_r, w_r), (h_p, w_p) = self.sizes_ref[c.index], self.sizes_pert[c.index]
        return flops * h_p * w_p == self.owner._perturbed_counts()[0].get(n, 0) * h_r * w_r

    def _cross(self, n: fx.Node, flops: int, uniq: list[_Class], distinct: bool = False) -> _Class | None:
        """A class of two inputs' areas together that ``n``'s FLOPs follow (added), or None:
        two sequences first, then (unless ``distinct``) one over itself; guessed, so checked
        at a third setting."""
        moving = [c for c in uniq if self.sizes_ref[c.index] != self.sizes_pert[c.index]]
        pairs = [(a, b) for i, a in enumerate(moving) for b in moving[i + 1:]]
        pairs += [] if distinct else [(a, a) for a in moving]
        for a, b in pairs:
            c = _Class("cross", a, other=b, guessed=True)
            r, p = c.predict(self.sizes_ref, self.ref_strides), c.predict(self.sizes_pert, self.pert_strides)
            if flops * p[0] * p[1] == self.owner._perturbed_counts()[0].get(n, 0) * r[0] * r[1]:
                return self.add_class(c, r, p)
        return None

    def _add_term(self, on: _Class, flops: float) -> None:
        term = self.terms.setdefault(on.index, _ClassTerm(on))
        term.coefficient += flops / self.area(on)

    def attributed(self) -> float:
        """The reference FLOPs the terms, probes and constant account for."""
        total = self.constant + sum(t.coefficient * self.area(t.cls) for t in self.terms.values())
        total += sum(t.flops(self.sizes_ref) for t in self.resize_terms)
        return total + sum(c.probed(self.sizes_ref)[1] for c in self.opaque_terms)

    def eval_classes(self, terms: list[_ClassTerm]) -> list[_Class]:
        """The classes needed to evaluate the terms (ancestors included), in creation order."""
        needed: set[int] = set()
        for c0 in [t.cls for t in terms] + self.opaque_terms + [t.cls for t in self.resize_terms]:
            c: Any = c0
            stack = [c]
            while stack:
                c = stack.pop()
                if c is not None and c.index not in needed:
                    needed.add(c.index)
                    stack += [c.parent, c.other, *c.others]
        return [c for c in self.classes if c.index in needed]
