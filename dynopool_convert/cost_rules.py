"""Size classes and the candidate rules that explain a node's output size (``cost_model.py``).

A node's candidate rules come from the op registry (``op_registry.SPECS``: each op kind's size
geometry), plus inheriting an input's class, token sequences and a fixed size; each is checked
against the two shape passes. Package-internal.
"""
from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

from .annotated_graph import TensorInfo, spatial as _spatial
from .cost_probe import ProbeFailed
from .cost_shapes import _flat, _inherits, _maps, _shape_of, _shows_both
from .dynopool import dynopool_output_size
from .op_registry import Geometry, op_call, spec_for_node

if TYPE_CHECKING:
    from .cost_probe import _LeafProbe


# --------------------------------------------------------------------------------------------
# size classes


@dataclass
class _Class:
    """One spatial size function; ``parent`` is None for the input and fixed sizes."""

    kind: str  # input | const | dynopool | window | same | transposed | scale | multiple | crop | opaque | tokens | pairs | cross | pooled
    parent: "_Class | None" = None
    size: tuple[int, int] = (1, 1)  # const / input
    group: int = -1  # dynopool: index into the group list
    # window: ((k, s, p, d, ceil) per axis); transposed: ((k, s, p, d, output_padding) per axis);
    # same: (s_h, s_w); scale: (f_h, f_w); dynopool: multiple;
    # multiple: (m_h, m_w), padded up to a multiple (Swin's pad to its window or to even sizes);
    # crop: (m_h, m_w), sliced down to a multiple (``x[:, :, :h // 2 * 2]``);
    # tokens: (extra,): a sequence of h*w + extra tokens, size (L, 1); pairs: size (L, L), L = h*w
    # (+ extra, when params holds it: a relative-position bias over class and patch tokens);
    # cross: size (h*w, h2*w2) of parent and ``other`` (attention of one sequence over another);
    # pooled: (k, s, p, d, ceil): a 1-d window over the parent's h*w tokens, size (L', 1)
    params: tuple = ()
    index: int = -1
    probe: "_LeafProbe | None" = None  # opaque: the leaf module, run alone per input size
    base: tuple[float, float] = (1.0, 1.0)  # dynopool: output round(h * base / s) (DynResize)
    guessed: bool = False  # read off the two passes alone: the whole model is checked once more
    other: "_Class | None" = None  # cross: the second sequence
    others: tuple = ()  # opaque: the classes of the probed call's other moving inputs
    flat: bool = False  # window: shown flattened (an unfold's N x C k^2 x L), followed by element count

    def probed(self, sizes: dict[int, tuple[int, int]], dh: int = 0, dw: int = 0) -> tuple[tuple[int, int], int]:
        """An opaque class's probe at its inputs' ``sizes`` (the parent's ``dh``/``dw`` larger)."""
        h, w = sizes[self.parent.index]
        return self.probe(h + dh, w + dw, tuple(sizes[o.index] for o in self.others))

    def predict(self, sizes: dict[int, tuple[int, int]], strides: Sequence[tuple[float, float]]) -> tuple[int, int]:
        """Integer output size given the parent's integer size (``sizes`` by class index)."""
        if self.kind in ("input", "const"):
            return self.size
        h, w = sizes[self.parent.index]
        if self.kind == "dynopool":
            s, m, b = strides[self.group], self.params or (1, 1), self.base
            return dynopool_output_size(h, s[0] / b[0], m[0]), dynopool_output_size(w, s[1] / b[1], m[1])
        if self.kind == "window":
            return _window_out(h, *self.params[0]), _window_out(w, *self.params[1])
        if self.kind == "same":
            return max(1, -(-h // self.params[0])), max(1, -(-w // self.params[1]))
        if self.kind == "transposed":
            return _transposed_out(h, *self.params[0]), _transposed_out(w, *self.params[1])
        if self.kind == "multiple":
            return -(-h // self.params[0]) * self.params[0], -(-w // self.params[1]) * self.params[1]
        if self.kind == "crop":
            return h // self.params[0] * self.params[0], w // self.params[1] * self.params[1]
        if self.kind == "scale":
            return int(math.floor(h * self.params[0])), int(math.floor(w * self.params[1]))
        if self.kind == "opaque":
            return self.probed(sizes)[0]
        if self.kind == "tokens":
            return h * w + self.params[0], 1
        if self.kind == "pairs":  # (extra,): h*w + extra tokens a side (a class token's row and column)
            n = h * w + (self.params[0] if self.params else 0)
            return n, n
        if self.kind == "cross":
            h2, w2 = sizes[self.other.index]
            return h * w, h2 * w2
        if self.kind == "pooled":
            return _window_out(h * w, *self.params), 1
        raise AssertionError(self.kind)


def _transposed_out(n: int, k: int, s: int, p: int, d: int, output_padding: int) -> int:
    """Output length of a transposed convolution (``p`` is the total padding of the axis)."""
    return (n - 1) * s - p + d * (k - 1) + output_padding + 1


def _window_out(n: int, k: int, s: int, p: int, d: int, ceil: bool) -> int:
    """Output length of a conv/pool window op (``p`` is the total padding of the axis)."""
    span = n + p - d * (k - 1) - 1
    out = (-(-span // s) if ceil else span // s) + 1
    if ceil and (out - 1) * s >= n + p // 2:  # PyTorch: the last window must start inside
        out -= 1
    return out


# --------------------------------------------------------------------------------------------
# candidate rules per node kind (a table, not an if/elif chain per caller)


@dataclass
class _Rule:
    """A candidate explanation of a node's output size class."""

    kind: str  # inherit | new
    cls: _Class | None = None  # new: the class to create; inherit: the class to reuse
    flops_on: str = "in"  # which class the node's FLOPs scale with: "in" or "out"


def _keeps_size(wp: tuple) -> bool:
    """A stride-1 window whose padding exactly offsets the kernel: output size = input size."""
    return all(s == 1 and p == d * (k - 1) and not ceil for k, s, p, d, ceil in wp)


def _registry_rules(n: fx.Node, gm: fx.GraphModule, ref: dict[fx.Node, Any], pert: dict[fx.Node, Any],
                    parent: _Class) -> list[_Rule]:
    """Candidate rules from the op registry's geometry of ``n`` (none for an op it does not know,
    nor for a call whose kernel, stride or padding the forward computes from the sizes: a global
    pool written ``F.avg_pool2d(x, x.shape[2:])`` reads as a 16-pixel window at 16 pixels and as
    an 18-pixel one at 18, and a 16-pixel window fits both passes, then empties the map below 16)."""
    spec = spec_for_node(n, gm)
    if spec is None or spec.geometry is None:
        return []

    def value_in(infos: dict[fx.Node, Any]) -> Callable[[fx.Node], Any]:
        def value_of(a: fx.Node) -> Any:
            info = infos.get(a)
            return info.shape if isinstance(info, TensorInfo) else info
        return value_of

    call = op_call(n, gm, value_in(ref), spec)
    if call.args and _static_args(call) != _static_args(op_call(n, gm, value_in(pert), spec)):
        return []
    return [r for g in spec.geometry(call) if (r := _geometry_rule(g, parent)) is not None]


#: tensor arguments that move with the map but that no geometry reads (an unpool's indices)
_MAP_ARGS = ("indices",)


def _static_args(call: Any) -> dict[str, Any]:
    return {k: v for k, v in (call.args or {}).items() if k not in _MAP_ARGS}


def _geometry_rule(g: Geometry, parent: _Class) -> _Rule | None:
    """The size class a registry geometry describes (None: it keeps the size, or is not static)."""
    if g.kind == "fixed":
        return _Rule("new", _Class("const"), g.flops_on)
    if g.kind == "scale":
        return _Rule("new", _Class("scale", parent, params=g.factor), g.flops_on)
    if g.kind == "same":
        return _Rule("new", _Class("same", parent, params=g.stride), g.flops_on)
    if g.kind == "transposed":
        tp = tuple((g.kernel[i], g.stride[i], g.padding[i], g.dilation[i], int(g.factor[i])) for i in range(2))
        return _Rule("new", _Class("transposed", parent, params=tp), g.flops_on)
    if g.padding is None:
        return None
    wp = tuple((g.kernel[i], g.stride[i], g.padding[i], g.dilation[i], g.ceil) for i in range(2))
    return None if _keeps_size(wp) else _Rule("new", _Class("window", parent, params=wp, flat=g.flat), g.flops_on)


_TOKEN_KINDS = ("tokens", "pairs", "cross", "pooled")

#: 1-d window modules, which act on the last dim: over a token sequence (N, C, L)
_SEQUENCE_WINDOWS = (nn.AvgPool1d, nn.MaxPool1d, nn.Conv1d)


def _mod_constants(n: fx.Node, depth: int = 8, ops: tuple = (operator.mod,), skip_first: bool = True) -> set[int]:
    """Int divisors of the ``x % m`` calls (``ops``) that ``n``'s arguments are computed from (a
    pad to a multiple of ``m``: ``(m - W % m) % m`` or ``W % 2``; a crop: ``W // 2 * 2``)."""
    found: set[int] = set()
    seen: set[fx.Node] = set()
    frontier = list(n.all_input_nodes)[1 if skip_first else 0:]  # the padded tensor itself does not count
    for _ in range(depth):
        nxt = []
        for a in frontier:
            if a in seen or a.op != "call_function":
                continue
            seen.add(a)
            if a.target in ops and len(a.args) == 2 and isinstance(a.args[1], int) and a.args[1] > 1:
                found.add(a.args[1])
            nxt += a.all_input_nodes
        frontier = nxt
    return found


_REGROUPS = {"flatten", "reshape", "view", torch.flatten, torch.reshape}
_BUILTIN_MODULES = ("torch", "operator", "_operator", "builtins", "math")


def _own_function(n: fx.Node) -> bool:
    """A call of a model's own function that fx does not enter (``torch.fx.wrap``)."""
    if n.op != "call_function":
        return False
    return (getattr(n.target, "__module__", None) or "builtins").split(".")[0] not in _BUILTIN_MODULES


def _downsample_rules(n: fx.Node, info_r: Any, info_p: Any, parent: _Class,
                      sizes_ref: dict[int, tuple[int, int]], sizes_pert: dict[int, tuple[int, int]]) -> list[_Rule]:
    """A reshape, or a function fx does not enter, that folds ``k x k`` blocks of a map into
    channels (Swin's patch merging: pad to even, view as ``(N, H/2, 2, W/2, 2, C)``, permute,
    flatten; torchvision's ``_patch_merging_pad``): ``ceil(h / k)``, the smallest ``k`` both
    passes agree with."""
    if not (_own_function(n) or (n.op in ("call_method", "call_function") and n.target in _REGROUPS)):
        return []
    if not _maps(info_r, info_p):
        return []
    if info_r.shape[0] != info_p.shape[0]:  # windows as a batch (Swin's partition), not a map
        return []
    sizes = (sizes_ref[parent.index], sizes_pert[parent.index])
    rules = []
    for a in (2, 1):  # N x C x H x W, then channels-last
        outs = (info_r.shape[a:a + 2], info_p.shape[a:a + 2])
        if outs[0] == outs[1]:  # a fixed window, not the map folded
            continue
        k = []
        for axis in (0, 1):
            fits = [f for f in range(1, 9) if all(-(-s[axis] // f) == o[axis] for s, o in zip(sizes, outs))]
            k.append(fits[0] if fits else None)
        if None not in k and k != [1, 1]:
            rules.append(_Rule("new", _Class("same", parent, params=tuple(k), guessed=True), "out"))
    return rules


_CREATIONS = (torch.zeros, torch.ones, torch.empty, torch.full)
_CREATION_METHODS = ("new_zeros", "new_ones", "new_empty", "new_full")


def _pad_multiple_rules(n: fx.Node, info_r: Any, info_p: Any, parent: _Class,
                        sizes_ref: dict[int, tuple[int, int]], sizes_pert: dict[int, tuple[int, int]]) -> list[_Rule]:
    """A ``F.pad`` whose amounts are computed at run time to reach a multiple of ``m`` per axis
    (Swin's windows and patch merging): ``ceil(h / m) * m``, with ``m`` among the divisors its
    amounts are computed with; checked against both passes (and, as a guessed rule, the whole
    model against fvcore at a third setting)."""
    padded = n.op == "call_function" and n.target is F.pad
    created = (n.op == "call_function" and n.target in _CREATIONS) or (n.op == "call_method" and n.target in _CREATION_METHODS)
    if not (padded or created) or not _maps(info_r, info_p):
        return []
    # amounts as ``(m - W % m) % m`` or ``ceil(W / m) * m - W``; a tensor made at a multiple's
    # size too (the Swin code's mask: ``zeros((1, ceil(H / ws) * ws, ...))``)
    ops = (operator.mod, operator.truediv, operator.floordiv)
    constants = sorted(_mod_constants(n, ops=ops, skip_first=padded or n.op == "call_method"), reverse=True)
    (h_r, w_r), (h_p, w_p) = sizes_ref[parent.index], sizes_pert[parent.index]
    rules = []
    for a in (2, 1):  # N x C x H x W, then channels-last
        out_r, out_p = info_r.shape[a:a + 2], info_p.shape[a:a + 2]
        per_axis = []
        for n_r, n_p, o_r, o_p in ((h_r, h_p, out_r[0], out_p[0]), (w_r, w_p, out_r[1], out_p[1])):
            fits = [m for m in (*constants, 1) if -(-n_r // m) * m == o_r and -(-n_p // m) * m == o_p]
            per_axis.append(fits[0] if fits else None)
        if None not in per_axis and per_axis != [1, 1]:
            rules.append(_Rule("new", _Class("multiple", parent, params=tuple(per_axis), guessed=True), "out"))
    return rules


def _crop_multiple_rules(n: fx.Node, info_r: Any, info_p: Any, parent: _Class,
                         sizes_ref: dict[int, tuple[int, int]], sizes_pert: dict[int, tuple[int, int]]) -> list[_Rule]:
    """A slice of a map whose bounds are computed at run time to crop it to a multiple of ``m``
    per axis (``x[:, :, :H // 2 * 2, :W // 2 * 2]`` before a 2x2 pool): ``floor(h / m) * m``, with
    ``m`` among the divisors its bounds are computed with; checked like ``_pad_multiple_rules``."""
    if n.op != "call_function" or n.target is not operator.getitem or not _maps(info_r, info_p):
        return []
    constants = sorted(_mod_constants(n, ops=(operator.floordiv, operator.mod)), reverse=True)
    (h_r, w_r), (h_p, w_p) = sizes_ref[parent.index], sizes_pert[parent.index]
    out_r, out_p = info_r.shape[2:4], info_p.shape[2:4]
    per_axis = []
    for n_r, n_p, o_r, o_p in ((h_r, h_p, out_r[0], out_p[0]), (w_r, w_p, out_r[1], out_p[1])):
        fits = [m for m in (*constants, 1) if n_r // m * m == o_r and n_p // m * m == o_p]
        per_axis.append(fits[0] if fits else None)
    if None in per_axis or per_axis == [1, 1]:
        return []
    return [_Rule("new", _Class("crop", parent, params=tuple(per_axis), guessed=True), "out")]


def _sequence_window_rules(n: fx.Node, gm: fx.GraphModule, ref: dict, pert: dict, parent: _Class,
                           sizes_ref: dict[int, tuple[int, int]], sizes_pert: dict[int, tuple[int, int]]) -> list[_Rule]:
    """A 1-d pool or convolution over a sequence of a class's ``h*w`` tokens laid out as
    ``(N, C, h*w)`` (Next-ViT's spatial reduction: ``AvgPool1d(r*r)`` of the keys' tokens):
    ``floor((h*w + 2p - d(k-1) - 1) / s) + 1`` tokens, when both passes show it."""
    if n.op != "call_module" or not n.all_input_nodes:
        return []
    m = gm.get_submodule(n.target)
    if not isinstance(m, _SEQUENCE_WINDOWS) or isinstance(getattr(m, "padding", 0), str):
        return []
    first = lambda v: v[0] if isinstance(v, (tuple, list)) else v  # noqa: E731
    params = (first(m.kernel_size), first(m.stride), 2 * first(m.padding), first(getattr(m, "dilation", 1)),
              bool(getattr(m, "ceil_mode", False)))
    cls = _Class("pooled", parent, params=params)
    for info, out, sizes in ((ref.get(n.all_input_nodes[0]), ref.get(n), sizes_ref),
                             (pert.get(n.all_input_nodes[0]), pert.get(n), sizes_pert)):
        h, w = sizes[parent.index]
        if not (isinstance(info, TensorInfo) and isinstance(out, TensorInfo) and len(info.shape) == len(out.shape) == 3):
            return []
        if info.shape[-1] != h * w or out.shape[-1] != cls.predict(sizes, ())[0]:
            return []
    return [_Rule("new", cls, "out")]


def _token_rules(info_r: Any, info_p: Any, parents: Sequence[_Class], sizes_ref: dict[int, tuple[int, int]]) -> list[_Rule]:
    """Token-sequence classes an output may start: ``h*w + e`` tokens of a parent class (class
    or register tokens concatenated, ``e`` read off the one dim that changed between the two
    passes; tokens sliced off: ``e < 0``) or ``(h*w)^2`` pairs (attention maps)."""
    tensors_r = [v for v in _flat(info_r) if isinstance(v, TensorInfo)]
    tensors_p = [v for v in _flat(info_p) if isinstance(v, TensorInfo)]
    changed: list[int] = []
    if tensors_r and tensors_p and len(tensors_r[0].shape) == len(tensors_p[0].shape):
        changed = [d for d, (a, b) in enumerate(zip(tensors_r[0].shape, tensors_p[0].shape)) if a != b]
    rules = []
    for c in parents:
        h, w = sizes_ref[c.index]
        if len(changed) == 1:
            extra = tensors_r[0].shape[changed[0]] - h * w
            rules.append(_Rule("new", _Class("tokens", c, params=(extra,)), "out"))
        rules.append(_Rule("new", _Class("pairs", c), "out"))
        if len(changed) == 2 and len({tensors_r[0].shape[d] for d in changed}) == 1:  # (L, L), L = h*w + extra
            extra = tensors_r[0].shape[changed[0]] - h * w
            if extra:
                rules.append(_Rule("new", _Class("pairs", c, params=(extra,)), "out"))
    if len(changed) == 2:  # (L1, L2): queries of one grid over keys of another (PVT's reduced keys, unfused)
        area = lambda c: sizes_ref[c.index][0] * sizes_ref[c.index][1]  # noqa: E731
        l1, l2 = (tensors_r[0].shape[d] for d in changed)
        rules += [_Rule("new", _Class("cross", a, other=b, guessed=True), "out")
                  for a in parents if area(a) == l1 for b in parents if b is not a and area(b) == l2]
    return rules


#: derivatives of one size with respect to strides: {(group, axis): value}
_Grad = dict[tuple[int, int], float]


def _scaled_grad(d: _Grad, f: float) -> _Grad:
    return {k: v * f for k, v in d.items()}


def _combine(da: _Grad, fa: float, db: _Grad, fb: float) -> _Grad:
    """``fa * da + fb * db``: the derivative of ``a * b`` is ``_combine(da, b, db, a)``."""
    out = {k: v * fa for k, v in da.items()}
    for k, v in db.items():
        out[k] = out.get(k, 0.0) + v * fb
    return out


def _accumulate(grads: list[list[float]], d: _Grad) -> None:
    for (g, axis), v in d.items():
        grads[g][axis] += v


@dataclass
class _ClassTerm:
    cls: _Class
    coefficient: float = 0.0


@dataclass
class _ResizeTerm:
    """A DynResize: ``per_pixel x h x w`` of its output class where that differs from its
    input's size, 0 where it is the identity (as fvcore counts it, see flops.py)."""

    cls: _Class
    parent: _Class
    per_pixel: float

    def flops(self, sizes: dict[int, tuple[int, int]]) -> float:
        h, w = sizes[self.cls.index]
        return 0.0 if (h, w) == sizes[self.parent.index] else self.per_pixel * h * w


@dataclass
class _Evaluation:
    flops: float
    grads: list[tuple[float, float]] = field(default_factory=list)
    sizes: dict[int, tuple[int, int]] = field(default_factory=dict)


def _with_indices(info: Any) -> Any:
    """A max pool's ``(values, indices)`` pair (``return_indices=True``) as its values: both one size."""
    if (isinstance(info, tuple) and len(info) == 2 and all(isinstance(t, TensorInfo) for t in info)
            and info[0].shape == info[1].shape and info[1].dtype == torch.int64):
        return info[0]
    return info


def _check(rule, info_r, info_p, sizes_ref, sizes_pert, strides_r, strides_p):
    """``None`` if ``rule`` contradicts an observation, else the new class's two sizes."""
    if rule.kind == "inherit":
        c = rule.cls
        if _inherits(info_r, info_p, sizes_ref[c.index], sizes_pert[c.index]):
            return ()
        return None
    c = rule.cls
    if c.kind == "const":
        if _shape_of(info_r) != _shape_of(info_p):
            return None
        sp = _spatial(info_r) or (1, 1)
        c.size = sp
        return sp, sp
    try:
        r = c.predict(sizes_ref, strides_r)
        p = c.predict(sizes_pert, strides_p)
    except ProbeFailed:
        return None
    if c.kind in _TOKEN_KINDS or c.flat or (c.kind == "opaque" and c.probe.tokens):  # (a leaf over a grid's tokens)
        return (r, p) if min(r + p) > 0 and _inherits(info_r, info_p, r, p) else None
    info_r, info_p = _with_indices(info_r), _with_indices(info_p)
    if not _shows_both(info_r, info_p, r, p):
        return None
    return r, p
