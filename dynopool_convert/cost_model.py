"""A differentiable, exact and cheap model of a converted model's FLOPs (DESIGN.md §3).

``CostModel(model, input_size)`` is built once; calling it returns a scalar tensor equal to
fvcore's count of ``model`` at the current strides (rounded sizes) whose gradient reaches
every group's stride parameter. How:

1. **Per-node FLOPs at the reference strides**, from fvcore itself (``flops_by_module`` for
   module calls; ops at the top level of the graph are counted one by one).
2. **Size classes.** Every tensor of the fx graph carries the spatial size of one *size
   class*: the model input, a DynOPool output (``round(h / s)``), a strided or padded
   window op left unconverted (``floor((h + p - d(k-1) - 1) / s) + 1``, ceil mode,
   or timm's dynamic "same" padding ``ceil(h / s)``), an unconverted ``interpolate`` by a
   scale factor, or a fixed size (adaptive pools, global means, ``interpolate(size=...)``).
   Every other node inherits the class of its (largest) spatial input. Each node's rule is
   chosen from a short list of candidates and *verified* on two shape passes (at the
   reference strides and at perturbed, smaller strides); a node no candidate explains makes
   the build fail loudly instead of giving a silently wrong cost.
   **Token sequences** (ViTs) are classes too: ``L = h x w + e`` tokens of a spatial class
   (class, register or distillation tokens concatenated: ``e > 0``; sliced off: ``e < 0``),
   held as size ``(L, 1)``, and attention maps ``(L, L)`` (``q @ k^T``). Flattened tokens,
   heads and ``(N, heads, L, d)`` layouts inherit them (element counts in proportion). Each
   node touching them must also have FLOPs in proportion to one class's area at both
   strides (fvcore recounted at the perturbed ones: a linear layer follows ``L``,
   ``attn @ v`` follows ``L^2``), and the whole model must match fvcore's total there.
   fvcore counts ``F.scaled_dot_product_attention`` as 0 FLOPs (no handle), so it is 0 here.
3. **Evaluation**: integer sizes propagate through the classes in closed form (exactly the
   sizes the forward pass will produce) together with their continuous surrogates
   (``h / s`` instead of ``round(h / s)``) and the derivatives of those with respect to each
   group's ``(s_h, s_w)`` (forward mode, a few dozen Python operations). Each node's FLOPs
   are ``coefficient x h x w`` of the class they scale with (output size for convolutions,
   DynOPool and upsampling, input size for the rest, as fvcore counts them). The value uses
   the integer sizes; the gradient is the straight-through one, ``d(h x w) = w dh_cont + h
   dw_cont`` (token counts alike: ``dL = w dh_cont + h dw_cont``, ``d(L^2) = 2 L dL``). One
   autograd node returns value and gradient.
"""
from __future__ import annotations

import contextlib
import math
import operator
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch._subclasses.fake_tensor import FakeTensorMode

from .dynopool import DynOPool, dynopool_output_size, scale_parameters
from .dynresize import DynResize
from .errors import UnsupportedModelError, UserInputError
from .flops import DYNRESIZE_FLOPS_PER_OUTPUT, _quiet, count_flops, flop_analysis

__all__ = ["CostModel", "trace_for_cost"]


# --------------------------------------------------------------------------------------------
# tracing and shape passes


class _LeafTracer(fx.Tracer):
    """fx tracer that keeps DynOPool, convolutions and timm's not-traceable modules as leaves."""

    def __init__(self) -> None:
        try:
            from timm.layers import get_notrace_functions, get_notrace_modules

            self._notrace = tuple(get_notrace_modules())
            autowrap = tuple(get_notrace_functions())
        except ImportError:  # pragma: no cover - timm is a dependency
            self._notrace, autowrap = (), ()
        super().__init__(autowrap_functions=autowrap)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        # conv subclasses (timm's StdConv2d, Conv2dSame) stay whole, as the conversion keeps them
        if isinstance(m, (DynOPool, nn.Conv2d)) or (self._notrace and isinstance(m, self._notrace)):
            return True
        return super().is_leaf_module(m, qualname)


def trace_for_cost(model: nn.Module) -> fx.GraphModule:
    """``model`` itself if it is a GraphModule, else an fx trace sharing its submodules."""
    if isinstance(model, fx.GraphModule):
        return model
    tracer = _LeafTracer()
    graph = tracer.trace(model)
    return fx.GraphModule(tracer.root, graph, model.__class__.__name__)


_SHAPE_PRESERVING = (
    nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU,
    nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Dropout, nn.Identity,
)


class _Recorder(fx.Interpreter):
    """Runs the graph once and records every node's value summary (shapes, plain values)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.summary: dict[fx.Node, Any] = {}
        # read outside any fake-tensor mode: DynOPool sizes need the real stride values
        self.strides = {name: m.stride_value for name, m in gm.named_modules() if isinstance(m, DynOPool)}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        self.summary[n] = _summarise(out)
        return out

    def call_module(self, target: str, args: tuple, kwargs: dict) -> Any:
        m = self.fetch_attr(target)
        if isinstance(m, DynOPool):  # only the shape matters; the stride is a real tensor
            x = args[0]
            s_h, s_w = self.strides[target]
            h = dynopool_output_size(int(x.shape[-2]), s_h / m.base[0], m.multiple[0])
            w = dynopool_output_size(int(x.shape[-1]), s_w / m.base[1], m.multiple[1])
            return x.new_empty((*x.shape[:-2], h, w))
        if isinstance(m, _SHAPE_PRESERVING) and len(args) == 1 and not kwargs:
            return args[0]  # same shape; skips fake batch norm, which is slow
        return super().call_module(target, args, kwargs)


def _summarise(value: Any) -> Any:
    if isinstance(value, Tensor):
        return _TensorInfo(tuple(value.shape), value.dtype)
    if isinstance(value, (list, tuple)):
        return type(value)(_summarise(v) for v in value)
    return value


@dataclass(frozen=True)
class _TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _shape_pass(gm: fx.GraphModule, input_size: Sequence[int]) -> dict[fx.Node, Any]:
    param = next(gm.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    rec = _Recorder(gm)
    was_training = gm.training
    gm.eval()
    try:
        # fake tensors: shapes without the arithmetic (the parameters stay real)
        with _quiet(), torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True) as mode:
            rec.run(mode.from_tensor(torch.zeros(1, *input_size, device=device, dtype=dtype)))
    finally:
        gm.train(was_training)
    return rec.summary


# --------------------------------------------------------------------------------------------
# size classes


@dataclass
class _Class:
    """One spatial size function; ``parent`` is None for the input and fixed sizes."""

    kind: str  # input | const | dynopool | window | same | scale | opaque | tokens | pairs
    parent: "_Class | None" = None
    size: tuple[int, int] = (1, 1)  # const / input
    group: int = -1  # dynopool: index into the group list
    # window: ((k, s, p, d, ceil) per axis); same: (s_h, s_w); scale: (f_h, f_w); dynopool: multiple;
    # tokens: (extra,): a sequence of h*w + extra tokens, size (L, 1); pairs: size (h*w, h*w)
    params: tuple = ()
    index: int = -1
    probe: "_LeafProbe | None" = None  # opaque: the leaf module, run alone per input size
    base: tuple[float, float] = (1.0, 1.0)  # dynopool: output round(h * base / s) (DynResize)

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
        if self.kind == "scale":
            return int(math.floor(h * self.params[0])), int(math.floor(w * self.params[1]))
        if self.kind == "opaque":
            return self.probe(h, w)[0]
        if self.kind == "tokens":
            return h * w + self.params[0], 1
        if self.kind == "pairs":
            return h * w, h * w
        raise AssertionError(self.kind)


def _window_out(n: int, k: int, s: int, p: int, d: int, ceil: bool) -> int:
    """Output length of a conv/pool window op (``p`` is the total padding of the axis)."""
    span = n + p - d * (k - 1) - 1
    out = (-(-span // s) if ceil else span // s) + 1
    if ceil and (out - 1) * s >= n + p // 2:  # PyTorch: the last window must start inside
        out -= 1
    return out


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        return (int(v[0]), int(v[-1]))
    return (int(v), int(v))


def _spatial(info: Any) -> tuple[int, int] | None:
    if isinstance(info, _TensorInfo) and len(info.shape) == 4:
        return info.shape[2], info.shape[3]
    return None


# --------------------------------------------------------------------------------------------
# candidate rules per node kind (a table, not an if/elif chain per caller)


@dataclass
class _Rule:
    """A candidate explanation of a node's output size class."""

    kind: str  # inherit | new
    cls: _Class | None = None  # new: the class to create; inherit: the class to reuse
    flops_on: str = "in"  # which class the node's FLOPs scale with: "in" or "out"


def _window_params(kernel, stride, padding, dilation, ceil_mode) -> tuple | None:
    if isinstance(padding, str):
        return None
    k, s, p, d = _pair(kernel), _pair(stride), _pair(padding), _pair(dilation)
    return tuple((k[i], s[i], 2 * p[i], d[i], bool(ceil_mode)) for i in range(2))


def _keeps_size(wp: tuple) -> bool:
    """A stride-1 window whose padding exactly offsets the kernel: output size = input size."""
    return all(s == 1 and p == d * (k - 1) and not ceil for k, s, p, d, ceil in wp)


def _module_rules(m: nn.Module, parent: _Class) -> list[_Rule]:
    if isinstance(m, DynOPool):
        return []  # handled by the caller (needs the group index)
    if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
        is_conv = isinstance(m, nn.Conv2d)
        flops_on = "out" if is_conv else "in"
        dilation = m.dilation if hasattr(m, "dilation") and not isinstance(m, nn.AvgPool2d) else 1
        ceil = getattr(m, "ceil_mode", False)
        rules = []
        wp = _window_params(m.kernel_size, m.stride, m.padding, dilation, ceil)
        if wp is not None and not _keeps_size(wp):
            rules.append(_Rule("new", _Class("window", parent, params=wp), flops_on))
        if max(_pair(m.stride)) > 1:
            rules.append(_Rule("new", _Class("same", parent, params=_pair(m.stride)), flops_on))
        return rules
    if isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
        return [_Rule("new", _Class("const"), "in")]
    if isinstance(m, (nn.ConstantPad2d, nn.ZeroPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d, nn.CircularPad2d)):
        return _pad_rules(parent, m.padding)
    if isinstance(m, nn.Upsample):
        return _interpolate_rules(parent, m.size, m.scale_factor)
    return []


def _pad_rules(parent: _Class, pad: Any) -> list[_Rule]:
    """Padding ``(left, right[, top, bottom])``: a window of 1 with that total padding."""
    pad = tuple(int(v) for v in (pad if isinstance(pad, (tuple, list)) else (pad,) * 4))
    left, right = pad[0], pad[1] if len(pad) > 1 else pad[0]
    top, bottom = (pad[2], pad[3]) if len(pad) >= 4 else (0, 0)
    wp = ((1, 1, top + bottom, 1, False), (1, 1, left + right, 1, False))
    return [] if wp[0][2] == wp[1][2] == 0 else [_Rule("new", _Class("window", parent, params=wp), "in")]


def _interpolate_rules(parent: _Class, size: Any, scale_factor: Any) -> list[_Rule]:
    if size is not None:
        return [_Rule("new", _Class("const"), "out")]
    if scale_factor is not None:
        f = scale_factor if isinstance(scale_factor, (tuple, list)) else (scale_factor, scale_factor)
        return [_Rule("new", _Class("scale", parent, params=(float(f[0]), float(f[-1]))), "out")]
    return []


def _arg(node_args: tuple, kwargs: dict, i: int, name: str, default: Any) -> Any:
    if name in kwargs:
        return kwargs[name]
    return node_args[i] if len(node_args) > i else default


def _function_rules(target: Callable, args: tuple, kwargs: dict, parent: _Class) -> list[_Rule]:
    """Rules for call_function nodes (``args``: node args with plain values substituted)."""
    if target in (F.conv2d,):
        w = args[1] if len(args) > 1 else kwargs["weight"]
        k = w.shape[-2:] if isinstance(w, _TensorInfo) else (1, 1)
        wp = _window_params(k, _arg(args, kwargs, 3, "stride", 1), _arg(args, kwargs, 4, "padding", 0),
                            _arg(args, kwargs, 5, "dilation", 1), False)
        return [_Rule("new", _Class("window", parent, params=wp), "out")] if wp and not _keeps_size(wp) else []
    if target in (F.max_pool2d, F.avg_pool2d, torch.max_pool2d):
        is_max = target in (F.max_pool2d, torch.max_pool2d)
        k = _arg(args, kwargs, 1, "kernel_size", None)
        s = _arg(args, kwargs, 2, "stride", None) or k
        p = _arg(args, kwargs, 3, "padding", 0)
        d = _arg(args, kwargs, 4, "dilation", 1) if is_max else 1
        ceil = _arg(args, kwargs, 5 if is_max else 4, "ceil_mode", False)
        wp = _window_params(k, s, p, d, ceil)
        return [_Rule("new", _Class("window", parent, params=wp), "in")] if wp else []
    if target in (F.adaptive_avg_pool2d, F.adaptive_max_pool2d):
        return [_Rule("new", _Class("const"), "in")]
    if target is F.pad:
        return _pad_rules(parent, _arg(args, kwargs, 1, "pad", ()))
    if target is F.interpolate:
        return _interpolate_rules(parent, _arg(args, kwargs, 1, "size", None), _arg(args, kwargs, 2, "scale_factor", None))
    return []


_TOKEN_KINDS = ("tokens", "pairs")


def _token_rules(info_r: Any, info_p: Any, parents: Sequence[_Class], sizes_ref: dict[int, tuple[int, int]]) -> list[_Rule]:
    """Token-sequence classes an output may start: ``h*w + e`` tokens of a parent class (class
    or register tokens concatenated, ``e`` read off the one dim that changed between the two
    passes; tokens sliced off: ``e < 0``) or ``(h*w)^2`` pairs (attention maps)."""
    tensors_r = [v for v in _flat(info_r) if isinstance(v, _TensorInfo)]
    tensors_p = [v for v in _flat(info_p) if isinstance(v, _TensorInfo)]
    changed: list[int] = []
    if tensors_r and tensors_p and len(tensors_r[0].shape) == len(tensors_p[0].shape):
        changed = [d for d, (a, b) in enumerate(zip(tensors_r[0].shape, tensors_p[0].shape)) if a != b]
    rules = []
    for c in parents:
        if len(changed) == 1:
            h, w = sizes_ref[c.index]
            extra = tensors_r[0].shape[changed[0]] - h * w
            rules.append(_Rule("new", _Class("tokens", c, params=(extra,)), "out"))
        rules.append(_Rule("new", _Class("pairs", c), "out"))
    return rules


# --------------------------------------------------------------------------------------------
# the cost model


class _CostFunction(torch.autograd.Function):
    """Returns the precomputed value; backward returns the precomputed gradients."""

    @staticmethod
    def forward(ctx, value: Tensor, grads: tuple[Tensor, ...], *params: Tensor) -> Tensor:  # type: ignore[override]
        ctx.grads = grads
        return value.clone()

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        return (None, None, *(grad_out * g for g in ctx.grads))


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


class CostModel:
    """FLOPs of ``model`` at ``input_size`` as a differentiable function of its strides.

    >>> import torch.nn as nn
    >>> from dynopool_convert import DynOPool
    >>> net = nn.Sequential(DynOPool(2.0), nn.Conv2d(3, 8, 3, padding=1))
    >>> cost = CostModel(net, (3, 32, 32))
    >>> int(cost().item()), cost.flops()   # 16*16 outputs * (8*27 conv + 3*20 DynOPool)
    (70656, 70656)

    ``cost()`` reads the current stride parameters (``cost.parameters``, one per tied group,
    as ``scale_parameters(model)``) and returns a float32 scalar whose gradient reaches them;
    ``cost.flops(strides)`` evaluates exactly (an int) at given ``(s_h, s_w)`` per group
    without touching the model. ``unattributed`` is the part of fvcore's reference count the
    build could not place on a graph node (kept as a constant; 0 on every model tested).
    """

    def __init__(self, model: nn.Module, input_size: Sequence[int] = (3, 224, 224)) -> None:
        self.input_size = tuple(int(v) for v in input_size)
        gm = trace_for_cost(model)
        self._dynopools: dict[str, DynOPool] = {
            n.target: gm.get_submodule(n.target)
            for n in gm.graph.nodes
            if n.op == "call_module" and isinstance(gm.get_submodule(n.target), DynOPool)
        }
        params: dict[int, nn.Parameter] = {}
        for m in self._dynopools.values():
            params.setdefault(id(m.stride), m.stride)
        # in the order of scale_parameters(model): one per tied group
        ordered = [p for p in scale_parameters(model) if id(p) in params]
        ordered += [p for p in params.values() if all(p is not q for q in ordered)]
        self.parameters: list[nn.Parameter] = ordered
        self._group_of = {id(p): i for i, p in enumerate(self.parameters)}
        # stride bounds per group (every site of a group shares them): [1/r_max, 1/r_min]
        self._bounds = [(0.0, math.inf)] * len(self.parameters)
        for m in self._dynopools.values():
            self._bounds[self._group_of[id(m.stride)]] = (1.0 / m.r_bounds[1], 1.0 / m.r_bounds[0])

        ref = _shape_pass(gm, self.input_size)
        ref_strides = self._current_strides()
        with self._at_strides(self._clamp_all([(s_h * 0.7, s_w * 0.8) for s_h, s_w in ref_strides])):
            perturbed_strides = self._current_strides()  # as the parameters hold them (float32)
            pert = _shape_pass(gm, self.input_size)
        #: the strides the model had at build time, and fvcore's count there
        self.reference_strides = ref_strides
        node_flops, self.reference_flops, self._mixed = _node_flops(gm, ref, self.input_size)
        self._gm, self._ref, self._pert = gm, ref, pert
        self._perturbed_strides = perturbed_strides
        self._pert_counts: tuple[dict[fx.Node, int], int] | None = None
        self._by_proportion = False  # set when a tensor follows a class by its element count only
        self._build_classes(gm, ref, pert, ref_strides, perturbed_strides, node_flops)
        if self._by_proportion or any(c.kind in _TOKEN_KINDS for c in self._classes):
            self._check_totals()

    @contextlib.contextmanager
    def _at_strides(self, strides: Sequence[tuple[float, float]]) -> Iterator[None]:
        """The model's stride parameters temporarily set to ``strides``."""
        saved = [p.detach().clone() for p in self.parameters]
        try:
            with torch.no_grad():
                for p, s in zip(self.parameters, strides):
                    p.copy_(torch.tensor(s, dtype=p.dtype).reshape(p.shape))
            yield
        finally:
            with torch.no_grad():
                for p, v in zip(self.parameters, saved):
                    p.copy_(v)

    def _perturbed_counts(self) -> tuple[dict[fx.Node, int], int]:
        """fvcore's per-node FLOPs and total at the perturbed strides (counted once, when needed)."""
        if self._pert_counts is None:
            with self._at_strides(self._perturbed_strides):
                counts, total, _ = _node_flops(self._gm, self._pert, self.input_size)
            self._pert_counts = counts, total
        return self._pert_counts

    def _check_totals(self) -> None:
        """Where tokens are followed (token classes, or tensors that follow a class by their
        element count only), the whole model must also match fvcore at the perturbed strides
        (catches FLOPs that are zero at the reference, e.g. resampling) and at a third, unseen
        setting (catches sizes that fit both passes by chance, e.g. half of an even count)."""
        third = self._clamp_all([(s_h * 0.55, s_w * 0.65) for s_h, s_w in self.reference_strides])
        with self._at_strides(third):
            third = self._current_strides()
            try:
                total = count_flops(self._gm, self.input_size)
            except UserInputError as err:
                raise UnsupportedModelError(
                    f"the FLOPs budget does not support this model yet: it fails at strides {third}, where its cost "
                    f"model is checked; convert and fine-tune without a budget"
                ) from err
        for strides, fvcore in ((self._perturbed_strides, self._perturbed_counts()[1]), (third, total)):
            predicted = self.flops(strides)
            if predicted != fvcore:
                raise UnsupportedModelError(
                    f"the FLOPs budget does not support this model yet: its cost model predicts {predicted} FLOPs at "
                    f"strides {strides} where fvcore counts {fvcore}; convert and fine-tune without a budget"
                )

    # -- build ---------------------------------------------------------------------------

    def _current_strides(self) -> list[tuple[float, float]]:
        if not self.parameters:
            return []
        values = torch.stack([p.detach().reshape(2) for p in self.parameters]).cpu().tolist()
        out = []
        for (s_h, s_w), (lo, hi) in zip(values, self._bounds):
            out.append((min(max(s_h, lo), hi), min(max(s_w, lo), hi)))
        return out

    def _build_classes(self, gm, ref, pert, ref_strides, pert_strides, node_flops) -> None:
        ref_strides = self._clamp_all(ref_strides)
        pert_strides = self._clamp_all(pert_strides)

        classes: list[_Class] = []
        node_class: dict[fx.Node, _Class | None] = {}
        sizes_ref: dict[int, tuple[int, int]] = {}
        sizes_pert: dict[int, tuple[int, int]] = {}
        terms: dict[int, _ClassTerm] = {}
        opaque_terms: list[_Class] = []
        resize_terms: list[_ResizeTerm] = []
        fixed_cache: dict = {}
        constant = 0.0

        def add_class(c: _Class, r: tuple[int, int], q: tuple[int, int]) -> _Class:
            c.index = len(classes)
            classes.append(c)
            sizes_ref[c.index], sizes_pert[c.index] = r, q
            return c

        def area(c: _Class, sizes) -> int:
            h, w = sizes[c.index]
            return h * w

        for n in gm.graph.nodes:
            info_r, info_p = ref.get(n), pert.get(n)
            if n.op == "placeholder":
                sp = _spatial(info_r)
                node_class[n] = add_class(_Class("input", size=sp), sp, sp) if sp else None
                continue
            if n.op == "output":
                continue
            inputs = [node_class[a] for a in n.all_input_nodes if node_class.get(a) is not None]
            # the largest spatial input (broadcasting), preferring growing ones
            inputs.sort(key=lambda c: (area(c, sizes_pert), area(c, sizes_ref), c.kind != "const"), reverse=True)
            uniq: list[_Class] = []
            for c in inputs:
                if c not in uniq:
                    uniq.append(c)
            parent = uniq[0] if uniq else None

            rules: list[_Rule] = []
            if n.op == "call_module":
                m = gm.get_submodule(n.target)
                if isinstance(m, DynOPool):
                    g = self._group_of[id(m.stride)]
                    rules.append(_Rule("new", _Class("dynopool", parent, group=g, params=m.multiple, base=m.base), "out"))
                elif parent is not None:
                    rules += _module_rules(m, parent)
            elif n.op == "call_function" and parent is not None:
                args = _substitute(n.args, ref)
                kwargs = _substitute(n.kwargs, ref)
                rules += _function_rules(n.target, args, kwargs, parent)
            module = gm.get_submodule(n.target) if n.op == "call_module" else None
            probe_rule = None
            if module is not None and parent is not None and not _is_torch_builtin(module) and len(uniq) == 1:
                # a leaf we know nothing about (timm's ConvMlp or MobileViT block: data-dependent
                # sizes inside): probe it, per input size
                in_info = ref[n.all_input_nodes[0]] if n.all_input_nodes else None
                if isinstance(in_info, _TensorInfo) and len(in_info.shape) == 4:
                    probe = _LeafProbe(module, in_info, gm)
                    probe_rule = _Rule("new", _Class("opaque", parent, probe=probe), "opaque")
            if probe_rule is not None and _plain_custom(module) and node_flops.get(n, 0):
                rules.append(probe_rule)  # its FLOPs need not scale with its output size
            rules += [_Rule("inherit", c, "in") for c in uniq]
            if probe_rule is not None and probe_rule not in rules:
                rules.append(probe_rule)
            rules += _token_rules(info_r, info_p, uniq, sizes_ref)
            rules.append(_Rule("new", _Class("const"), "in"))

            chosen = None
            for rule in rules:
                out = self._check(rule, info_r, info_p, sizes_ref, sizes_pert, ref_strides, pert_strides)
                if out is not None:
                    chosen = rule
                    if rule.kind == "new":
                        add_class(rule.cls, *out)
                    break
            if chosen is None:
                raise UnsupportedModelError(
                    f"the FLOPs budget does not support this model yet: its cost model cannot follow the size of "
                    f"node {n.name!r} ({n.op} {getattr(n.target, '__name__', n.target)}): "
                    f"{_shape_of(info_r, others=True)} at the reference strides, "
                    f"{_shape_of(info_p, others=True)} at smaller strides (it follows spatial maps through "
                    f"convolutions, pools and resizes, and token sequences of h*w plus a fixed number of tokens with "
                    f"their attention maps; crops and other token counts are not modelled); "
                    f"convert and fine-tune without a budget"
                )
            # shapes (x.shape, x.size(2), ...) carry their tensor's class too: F.interpolate(
            # y, size=x.shape[-2:]) then follows x
            node_class[n] = chosen.cls if _has_tensor(info_r) or _is_shape_like(info_r) else None
            if chosen.kind == "inherit" and chosen.cls.kind != "const" and not _shows(info_r, sizes_ref[chosen.cls.index]):
                self._by_proportion = True

            if isinstance(module, DynResize) and isinstance(info_r, _TensorInfo):
                # charged only where it resizes (the identity runs nothing): not one class's area
                per_pixel = DYNRESIZE_FLOPS_PER_OUTPUT * math.prod(info_r.shape[:-2])
                resize_terms.append(_ResizeTerm(chosen.cls, parent, float(per_pixel)))
                continue
            flops = node_flops.get(n, 0)
            if chosen.flops_on == "opaque":  # FLOPs come from the probe, per input size
                opaque_terms.append(chosen.cls)
                constant -= chosen.cls.probe(*sizes_ref[parent.index])[1] - flops  # 0 if consistent
            elif any(c.kind in _TOKEN_KINDS for c in [chosen.cls, *uniq]):
                # the node's classes, or the square of its output's (attention inside one call)
                square = _Class("pairs", chosen.cls)
                square_sizes = square.predict(sizes_ref, ref_strides), square.predict(sizes_pert, pert_strides)
                candidates = [(c, sizes_ref[c.index], sizes_pert[c.index]) for c in [chosen.cls, *uniq]]
                on = self._verified_flops_class(n, flops, [*candidates, (square, *square_sizes)])
                if on is square:
                    add_class(square, *square_sizes)
                if on is not None:
                    term = terms.setdefault(on.index, _ClassTerm(on))
                    term.coefficient += flops / area(on, sizes_ref)
            elif flops:
                on = chosen.cls if chosen.flops_on == "out" or chosen.kind == "inherit" else parent
                if on is None:
                    constant += flops
                else:
                    fixed = 0.0
                    if n in self._mixed:  # e.g. timm's StdConv2d: conv (scales) + weight standardisation (fixed)
                        fixed = _fixed_part(gm, n, ref, flops, on_output=on is chosen.cls and chosen.kind != "inherit",
                                            cache=fixed_cache)
                    constant += fixed
                    term = terms.setdefault(on.index, _ClassTerm(on))
                    term.coefficient += (flops - fixed) / area(on, sizes_ref)

        attributed = constant + sum(t.coefficient * area(t.cls, sizes_ref) for t in terms.values())
        attributed += sum(c.probe(*sizes_ref[c.parent.index])[1] for c in opaque_terms)
        attributed += sum(t.flops(sizes_ref) for t in resize_terms)
        self.unattributed = int(round(self.reference_flops - attributed))
        self._constant = constant + self.unattributed
        self._classes = classes
        self._terms = [terms[i] for i in sorted(terms)]
        self._opaque_terms = opaque_terms
        self._resize_terms = resize_terms
        # classes needed to evaluate the terms (ancestors included), in creation order
        needed: set[int] = set()
        for c0 in [t.cls for t in self._terms] + opaque_terms + [t.cls for t in resize_terms]:
            c: _Class | None = c0
            while c is not None and c.index not in needed:
                needed.add(c.index)
                c = c.parent
        self._eval_classes = [c for c in classes if c.index in needed]

    def _verified_flops_class(self, n: fx.Node, flops: int,
                              candidates: Sequence[tuple[_Class, tuple[int, int], tuple[int, int]]]) -> _Class | None:
        """The first candidate class (with its sizes at the reference and perturbed strides)
        whose area ``n``'s FLOPs are proportional to at both (a linear layer follows its
        tokens, ``attn @ v`` the attention map); None for a node without FLOPs at both;
        refuses any other node."""
        flops_p = self._perturbed_counts()[0].get(n, 0)
        if flops == flops_p == 0:
            return None
        for c, (h_r, w_r), (h_p, w_p) in candidates:
            if h_r * w_r and flops * h_p * w_p == flops_p * h_r * w_r:
                return c
        raise UnsupportedModelError(
            f"the FLOPs budget does not support this model yet: the FLOPs of node {n.name!r} ({flops} at the "
            f"reference strides, {flops_p} at smaller strides) follow no size its cost model knows; "
            f"convert and fine-tune without a budget"
        )

    def _clamp_all(self, strides: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
        return [
            (min(max(s[0], lo), hi), min(max(s[1], lo), hi)) for s, (lo, hi) in zip(strides, self._bounds)
        ]

    @staticmethod
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
        r = c.predict(sizes_ref, strides_r)
        p = c.predict(sizes_pert, strides_p)
        if c.kind in _TOKEN_KINDS:
            return (r, p) if min(r + p) > 0 and _inherits(info_r, info_p, r, p) else None
        if _spatial(info_r) != r or _spatial(info_p) != p:
            return None
        return r, p

    # -- evaluation ----------------------------------------------------------------------

    def _evaluate(self, strides: Sequence[tuple[float, float]], with_grad: bool = True) -> _Evaluation:
        n_groups = len(self.parameters)
        raw = list(strides)
        strides = self._clamp_all(raw)
        sizes: dict[int, tuple[int, int]] = {}
        cont: dict[int, tuple[float, float]] = {}
        # derivatives of the continuous sizes: {class: (dh, dw)}, each {(group, axis): d size / d s_axis}
        # (spatial sizes depend on one axis of strides; a token count h*w + e on both)
        deriv: dict[int, tuple[_Grad, _Grad]] = {}
        for c in self._eval_classes:
            sizes[c.index] = c.predict(sizes, strides)
            if c.kind in ("input", "const"):
                cont[c.index] = (float(c.size[0]), float(c.size[1]))
                deriv[c.index] = ({}, {})
                continue
            ph, pw = cont[c.parent.index]
            dh0, dw0 = deriv[c.parent.index]
            if c.kind in _TOKEN_KINDS:  # h * w (+ e): the product rule at the integer sizes, as for terms
                h_in, w_in = sizes[c.parent.index]
                n = ph * pw + (c.params[0] if c.kind == "tokens" else 0)
                dn = _combine(dh0, w_in, dw0, h_in)
                cont[c.index] = (n, 1.0) if c.kind == "tokens" else (n, n)
                deriv[c.index] = (dn, {}) if c.kind == "tokens" else (dn, dn)
                continue
            if c.kind == "opaque":  # forward differences of the probed size function
                h_in, w_in = sizes[c.parent.index]
                out_h, out_w = sizes[c.index]
                sh = c.probe(h_in + 1, w_in)[0][0] - out_h
                sw = c.probe(h_in, w_in + 1)[0][1] - out_w
                cont[c.index] = (float(out_h), float(out_w))
                deriv[c.index] = (_scaled_grad(dh0, sh), _scaled_grad(dw0, sw))
                continue
            if c.kind == "dynopool":
                s_h, s_w = strides[c.group]
                fh, fw = c.base[0] / s_h, c.base[1] / s_w
                dh, dw = _scaled_grad(dh0, fh), _scaled_grad(dw0, fw)
                lo, hi = self._bounds[c.group]
                # the stride is clamped to its bounds: no gradient outside them
                if lo <= raw[c.group][0] <= hi:
                    dh[(c.group, 0)] = dh.get((c.group, 0), 0.0) - ph * fh * fh / c.base[0]
                if lo <= raw[c.group][1] <= hi:
                    dw[(c.group, 1)] = dw.get((c.group, 1), 0.0) - pw * fw * fw / c.base[1]
                cont[c.index] = (ph * fh, pw * fw)
            else:
                if c.kind == "window":
                    fh, fw = 1.0 / c.params[0][1], 1.0 / c.params[1][1]
                elif c.kind == "same":
                    fh, fw = 1.0 / c.params[0], 1.0 / c.params[1]
                else:  # scale
                    fh, fw = c.params
                dh, dw = _scaled_grad(dh0, fh), _scaled_grad(dw0, fw)
                cont[c.index] = (ph * fh, pw * fw)
            deriv[c.index] = (dh, dw)
        flops = self._constant
        grads = [[0.0, 0.0] for _ in range(n_groups)]
        for c in self._opaque_terms:
            h_in, w_in = sizes[c.parent.index]
            f = c.probe(h_in, w_in)[1]
            flops += f
            if with_grad:
                fh, fw = c.probe(h_in + 1, w_in)[1] - f, c.probe(h_in, w_in + 1)[1] - f
                dh, dw = deriv[c.parent.index]
                _accumulate(grads, _combine(dh, fh, dw, fw))
        for r in self._resize_terms:
            flops += r.flops(sizes)
            if with_grad:  # straight-through, also at the identity (where the charge is 0)
                h, w = sizes[r.cls.index]
                dh, dw = deriv[r.cls.index]
                _accumulate(grads, _combine(dh, r.per_pixel * w, dw, r.per_pixel * h))
        for t in self._terms:
            h, w = sizes[t.cls.index]
            flops += t.coefficient * h * w
            if with_grad:
                dh, dw = deriv[t.cls.index]
                _accumulate(grads, _combine(dh, t.coefficient * w, dw, t.coefficient * h))
        return _Evaluation(flops, [tuple(g) for g in grads], sizes)

    def flops(self, strides: Sequence[Sequence[float]] | None = None) -> int:
        """Exact FLOPs (int) at ``strides`` (one ``(s_h, s_w)`` per group; default: current)."""
        s = self._current_strides() if strides is None else [tuple(map(float, v)) for v in strides]
        return int(round(self._evaluate(s, with_grad=False).flops))

    def gradient(self, strides: Sequence[Sequence[float]] | None = None) -> list[tuple[float, float]]:
        """d FLOPs / d (s_h, s_w) per group (straight-through), as floats."""
        s = self._current_strides() if strides is None else [tuple(map(float, v)) for v in strides]
        return self._evaluate(s).grads

    def __call__(self) -> Tensor:
        """FLOPs at the current strides: a float32 scalar differentiable in every group's stride."""
        if not self.parameters:
            return torch.tensor(float(self._constant))
        raw = torch.stack([p.detach().reshape(2) for p in self.parameters]).cpu().tolist()
        ev = self._evaluate([tuple(v) for v in raw])
        device = self.parameters[0].device
        value = torch.tensor(ev.flops, dtype=torch.float32, device=device)
        grads = tuple(
            torch.tensor(g, dtype=p.dtype, device=p.device).reshape(p.shape) for g, p in zip(ev.grads, self.parameters)
        )
        return _CostFunction.apply(value, grads, *self.parameters)


# --------------------------------------------------------------------------------------------
# helpers


def _shape_of(info: Any, others: bool = False) -> Any:
    """Tensors as their shapes; other values as None (not compared: an int that changes carries
    no size, the tensors built from it are checked on their own), or as they are with
    ``others`` (for messages)."""
    if isinstance(info, _TensorInfo):
        return info.shape
    if isinstance(info, (list, tuple)):
        return tuple(_shape_of(v, others) for v in info)
    return info if others else None


def _is_shape_like(info: Any) -> bool:
    if isinstance(info, bool):
        return False
    if isinstance(info, int):
        return True
    return isinstance(info, (list, tuple)) and len(info) > 0 and all(_is_shape_like(v) for v in info)


def _has_tensor(info: Any) -> bool:
    if isinstance(info, _TensorInfo):
        return True
    return isinstance(info, (list, tuple)) and any(_has_tensor(v) for v in info)


def _flat(info: Any) -> list:
    if isinstance(info, (list, tuple)) and not isinstance(info, _TensorInfo):
        return [v for item in info for v in _flat(item)]
    return [info]


def _shows(info: Any, size: tuple[int, int]) -> bool:
    """Whether every tensor of ``info`` has ``size`` as its NCHW or NHWC spatial dims."""
    return all(
        len(t.shape) == 4 and size in (t.shape[2:4], t.shape[1:3]) for t in _flat(info) if isinstance(t, _TensorInfo)
    )


def _inherits(info_r: Any, info_p: Any, size_r: tuple[int, int], size_p: tuple[int, int]) -> bool:
    """Whether an output observed at two strides follows a class of sizes ``size_r``/``size_p``.

    Each tensor must show the size (NCHW or NHWC) at both, or have a number of elements in
    proportion to the area (flattened tokens); each int (a shape) must not change or change
    exactly as the class's height, width or area does (``ceil(h / p) * p`` does not: refused).
    """
    flat_r, flat_p = _flat(info_r), _flat(info_p)
    if len(flat_r) != len(flat_p):
        return False
    a_r, a_p = size_r[0] * size_r[1], size_p[0] * size_p[1]
    for r, p in zip(flat_r, flat_p):
        if isinstance(r, _TensorInfo) and isinstance(p, _TensorInfo):
            shows = len(r.shape) == 4 and (
                (r.shape[2:4] == size_r and p.shape[2:4] == size_p) or (r.shape[1:3] == size_r and p.shape[1:3] == size_p)
            )
            if not shows and p.numel * a_r != r.numel * a_p:
                return False
        elif isinstance(r, int) and not isinstance(r, bool) and isinstance(p, int):
            if r != p and (r, p) not in ((size_r[0], size_p[0]), (size_r[1], size_p[1]), (a_r, a_p)):
                return False
        elif type(r) is not type(p):
            return False
    return True


def _substitute(value: Any, summary: dict[fx.Node, Any]) -> Any:
    """Replace node references by their recorded summaries (plain values stay)."""
    return fx.node.map_arg(value, lambda a: summary.get(a))


def _node_flops(gm: fx.GraphModule, ref: dict[fx.Node, Any], input_size: Sequence[int]) -> tuple[dict[fx.Node, int], int, set[fx.Node]]:
    """fvcore FLOPs of each node at the reference strides, fvcore's total, and the module
    calls that run several kinds of counted ops (their FLOPs may not all scale with size)."""
    with flop_analysis(gm, input_size) as fa:
        by_module = {k: int(v) for k, v in fa.by_module().items()}
        by_op = fa.by_module_and_operator()
    total = by_module.get("", 0)
    calls: dict[str, list[fx.Node]] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            calls.setdefault(n.target, []).append(n)
    out: dict[fx.Node, int] = {}
    mixed: set[fx.Node] = set()
    inside = sum(v for k, v in by_module.items() if k and "." not in k)
    for target, nodes in calls.items():
        f = by_module.get(target, 0)
        if not f:
            continue
        if len(nodes) == 1:
            out[nodes[0]] = f
        else:  # a module called several times: count each call on its own
            for n in nodes:
                out[n] = _isolated_flops(gm, n, ref)
        if sum(1 for v in by_op.get(target, {}).values() if v) > 1:
            mixed.update(nodes)
    remainder = total - inside
    if remainder > 0:  # ops at the top level of the graph (functional calls), heads last
        for n in reversed(gm.graph.nodes):
            if n.op == "call_function" and n.target in _NO_FLOPS_FUNCTIONS:
                continue
            if n.op == "call_method" and n.target in _NO_FLOPS_METHODS:
                continue
            if n.op in ("call_function", "call_method") and isinstance(ref.get(n), _TensorInfo):
                f = _isolated_flops(gm, n, ref)
                if f:
                    out[n] = f
                    remainder -= f
                    if remainder <= 0:
                        break
    return out, total, mixed


def _fixed_part(gm: fx.GraphModule, n: fx.Node, ref: dict[fx.Node, Any], flops: int, on_output: bool,
                cache: dict | None = None) -> float:
    """The size-independent part ``a`` of a module call's FLOPs ``a + b * area``, from a second
    isolated count with the spatial input 4 pixels larger on each axis (``cache``: by module
    configuration and shapes, as FLOPs do not depend on weight values)."""
    x = n.all_input_nodes[0] if len(n.all_input_nodes) == 1 else None
    info = ref.get(x) if x is not None else None
    out = ref.get(n)
    if not (isinstance(info, _TensorInfo) and len(info.shape) == 4 and isinstance(out, _TensorInfo)):
        return 0.0
    module = gm.get_submodule(n.target)
    key = (type(module), module.extra_repr(), info.shape, out.shape, flops, on_output)
    if cache is not None and key in cache:
        return cache[key]
    big = _TensorInfo((*info.shape[:2], info.shape[2] + 4, info.shape[3] + 4), info.dtype)
    wrapper = _OneCall(module, (_SLOT,), {}, [])
    wrapper.inner = module
    f2 = _count_one(wrapper, (torch.zeros(big.shape, dtype=big.dtype, device=_device(gm)),), gm)
    shape1, shape2 = (out.shape, wrapper.last_shape) if on_output else (info.shape, big.shape)
    a1, a2 = shape1[-2] * shape1[-1], shape2[-2] * shape2[-1]
    fixed = 0.0 if a1 == a2 else flops - (f2 - flops) / (a2 - a1) * a1
    if cache is not None:
        cache[key] = fixed
    return fixed


def _device(gm: nn.Module) -> torch.device:
    param = next(gm.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _plain_custom(m: nn.Module) -> bool:
    """A module class not derived from any torch.nn layer (timm's ``BatchNormAct2d`` or
    ``StdConv2d`` are: their FLOPs follow their base layer's)."""
    return not any(c.__module__.startswith("torch.nn") and c is not nn.Module for c in type(m).__mro__)


def _is_torch_builtin(m: nn.Module) -> bool:
    return type(m).__module__.startswith("torch.")


class _LeafProbe:
    """A leaf module run alone, per input size: (output (h, w), fvcore FLOPs), memoised.

    For leaves whose output size no rule explains (data-dependent forwards that fx cannot
    enter, such as timm's ``ConvMlp`` head). A new input size costs one small fvcore count
    (milliseconds); sizes change rarely during training.
    """

    def __init__(self, module: nn.Module, in_info: _TensorInfo, gm: fx.GraphModule) -> None:
        self.module, self.in_info, self.gm = module, in_info, gm
        self.memo: dict[tuple[int, int], tuple[tuple[int, int], int]] = {}

    def __call__(self, h: int, w: int) -> tuple[tuple[int, int], int]:
        key = (max(1, h), max(1, w))
        if key not in self.memo:
            shape = (*self.in_info.shape[:-2], *key)
            x = torch.zeros(shape, dtype=self.in_info.dtype, device=_device(self.gm))
            wrapper = _OneCall(self.module, (_SLOT,), {}, [])
            wrapper.inner = self.module
            flops = _count_one(wrapper, (x,), self.gm)
            out = wrapper.last_shape
            self.memo[key] = ((out[-2], out[-1]) if len(out) == 4 else (1, 1), flops)
        return self.memo[key]


# top-level calls fvcore never counts (elementwise, activations, shape ops): skipped when
# looking for the functional ops that carry FLOPs, only to save time
_NO_FLOPS_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.getitem, operator.iadd,
    getattr, torch.cat, torch.stack, torch.flatten, torch.add, torch.mul, torch.relu, torch.sigmoid,
    torch.tanh, F.relu, F.relu6, F.gelu, F.silu, F.hardswish, F.hardsigmoid, F.dropout, F.pad,
}
_NO_FLOPS_METHODS = {
    "view", "reshape", "flatten", "permute", "transpose", "contiguous", "size", "chunk", "split",
    "unsqueeze", "squeeze", "add", "mul", "sigmoid", "relu", "relu_", "add_", "mul_", "expand",
}


class _OneCall(nn.Module):
    def __init__(self, fn: Callable, args: tuple, kwargs: dict, slots: list) -> None:
        super().__init__()
        self.fn, self.args_, self.kwargs_, self.slots = fn, args, kwargs, slots

    def forward(self, *tensors: Tensor) -> Any:
        values = iter(tensors)
        args, kwargs = fx.node.map_aggregate((self.args_, self.kwargs_), lambda a: next(values) if a is _SLOT else a)
        out = self.fn(*args, **kwargs)
        if isinstance(out, Tensor):
            self.last_shape = tuple(int(d) for d in out.shape)  # ints even while jit-traced
        return out


_SLOT = object()


def _isolated_flops(gm: fx.GraphModule, n: fx.Node, ref: dict[fx.Node, Any]) -> int:
    """fvcore's count of one node run alone on zero tensors of its recorded input shapes."""
    tensors: list[Tensor] = []

    def slot(a: fx.Node) -> Any:
        info = ref.get(a)
        if isinstance(info, _TensorInfo):
            tensors.append(torch.zeros(info.shape, dtype=info.dtype, device=_device(gm)))
            return _SLOT
        return info

    args = fx.node.map_arg(n.args, slot)
    kwargs = fx.node.map_arg(n.kwargs, slot)
    if n.op == "call_module":
        fn: Callable = gm.get_submodule(n.target)
    elif n.op == "call_method":
        fn = _method_caller(n.target)
    else:
        fn = n.target
    module = _OneCall(fn, args, kwargs, [])
    if isinstance(fn, nn.Module):
        module.inner = fn  # register so fvcore scopes it
    return _count_one(module, tuple(tensors), gm)


def _count_one(module: nn.Module, tensors: tuple, gm: fx.GraphModule) -> int:
    from .flops import FlopCountAnalysis, _dynopool_as_one_op, set_handles

    was_training = module.training
    module.eval()
    with _quiet(), torch.no_grad(), _dynopool_as_one_op(gm):
        fa = FlopCountAnalysis(module, tensors)
        set_handles(fa)
        fa.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
        total = int(fa.total())
    module.train(was_training)
    return total


def _method_caller(name: str) -> Callable:
    def call(self_, *args, **kwargs):
        return getattr(self_, name)(*args, **kwargs)

    return call
