"""fvcore probing for the cost model (``cost_model.py``): FLOPs per graph node at a stride
setting, size-independent parts of module calls, and leaves run alone per input size.
Package-internal."""
from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from .annotated_graph import TensorInfo
from .cost_grid_inputs import HEIGHT, grid_tensor, stored_grid
from .errors import UnsupportedModelError
from .flops import _quiet, flop_analysis


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
            if n.op in ("call_function", "call_method") and isinstance(ref.get(n), TensorInfo):
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
    if not (isinstance(info, TensorInfo) and len(info.shape) == 4 and isinstance(out, TensorInfo)):
        return 0.0
    module = gm.get_submodule(n.target)
    key = (type(module), module.extra_repr(), info.shape, out.shape, flops, on_output)
    if cache is not None and key in cache:
        return cache[key]
    # the spatial axes: N x C x H x W, else channels-last (N x H x W x C: Swin's blocks)
    for axes in ((2, 3), (1, 2)):
        big = list(info.shape)
        big[axes[0]] += 4
        big[axes[1]] += 4
        wrapper = _OneCall(module, (_SLOT,), {}, [])
        wrapper.inner = module
        try:
            f2 = _count_one(wrapper, (torch.zeros(big, dtype=info.dtype, device=_device(gm)),), gm)
        except Exception:  # the module refuses this layout: try the other
            continue
        shape1, shape2 = (out.shape, wrapper.last_shape) if on_output else (info.shape, tuple(big))
        if len(shape2) != len(shape1):
            continue
        a1, a2 = shape1[axes[0]] * shape1[axes[1]], shape2[axes[0]] * shape2[axes[1]]
        fixed = 0.0 if a1 == a2 else flops - (f2 - flops) / (a2 - a1) * a1
        break
    else:
        raise UnsupportedModelError(
            f"the FLOPs budget does not support this model yet: its cost model cannot run {type(module).__name__} "
            f"({n.name!r}) alone on a larger input of shape {info.shape} in either layout; convert and fine-tune "
            f"without a budget"
        )
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


def function_call(n: fx.Node, main: fx.Node, ref: dict[fx.Node, Any], gm: fx.GraphModule,
                  moving: dict[fx.Node, int] | None = None) -> tuple[tuple, dict, list[Any]]:
    """``n``'s call as ``_LeafProbe`` replays it: ``main`` probed, the ``moving`` inputs (node ->
    index among the probe's other sizes) as maps of those sizes, other tensors as zeros of
    their recorded shapes, other values as recorded."""
    tensors: list[Any] = []

    def slot(a: fx.Node) -> Any:
        info = ref.get(a)
        if a is main:
            tensors.append(None)
            return _SLOT
        if moving and a in moving and isinstance(info, TensorInfo) and len(info.shape) == 4:
            tensors.append((moving[a], info))
            return _SLOT
        if isinstance(info, TensorInfo):
            tensors.append(torch.zeros(info.shape, dtype=info.dtype, device=_device(gm)))
            return _SLOT
        return info

    return fx.node.map_arg(n.args, slot), fx.node.map_arg(n.kwargs, slot), tensors


def token_call(n: fx.Node, main: fx.Node, ref: dict[fx.Node, Any], pert: dict[fx.Node, Any], size_r: tuple[int, int],
               size_p: tuple[int, int], gm: fx.GraphModule
               ) -> tuple[tuple[tuple, dict, list[Any]], bool, list[tuple[str, str]]] | None:
    """``n``'s call as a token ``_LeafProbe`` replays it (``main``: ``N x (h * w) x C`` of a
    grid of sizes ``size_r``/``size_p`` at the two passes; ints moving as its height or width
    become ``GRID_H``/``GRID_W``; tensors made from the grid's sizes, remade per size
    (``cost_grid_inputs.py``); other tensors as recorded), whether the height and width moved
    alike (which is which is then a guess), and the grid sizes stored on the module before the
    call; or None where something else moves."""
    (h_r, w_r), (h_p, w_p) = size_r, size_p
    r, p = ref.get(main), pert.get(main)
    if not (isinstance(p, TensorInfo) and len(p.shape) == 3 and (r.shape[1], p.shape[1]) == (h_r * w_r, h_p * w_p)):
        return None
    tensors: list[Any] = []
    unknown, grid = [], []

    def slot(a: fx.Node) -> Any:
        info_r, info_p = ref.get(a), pert.get(a)
        if a is main:
            tensors.append(None)
            return _SLOT
        if isinstance(info_r, TensorInfo):
            moves = not isinstance(info_p, TensorInfo) or info_p.shape != info_r.shape
            remade = grid_tensor(a, gm, ref, pert, size_r, size_p) if moves else None
            if moves and remade is None:
                unknown.append(a)
            tensors.append(remade or torch.zeros(info_r.shape, dtype=info_r.dtype, device=_device(gm)))
            return _SLOT
        if isinstance(info_r, int) and info_r != info_p:
            sides = [g for g, pair in ((GRID_H, (h_r, h_p)), (GRID_W, (w_r, w_p))) if (info_r, info_p) == pair]
            # both sides moved alike: the height first, then the width (``attn(x, (H, W))``)
            side = sides[len(grid) % 2] if len(sides) == 2 else sides[0] if sides else None
            (grid if side is not None else unknown).append(a)
            return side
        if info_r != info_p:  # something else that moves (a shape as one value): not replayed
            unknown.append(a)
        return info_r

    call = fx.node.map_arg(n.args, slot), fx.node.map_arg(n.kwargs, slot), tensors
    stored = stored_grid(n, ref, pert, size_r, size_p)
    if unknown or stored is None:
        return None
    return call, bool(grid or stored or len(tensors) > 1) and (h_r, h_p) == (w_r, w_p), stored


#: the height and width of a token leaf's grid among its call's arguments (``_LeafProbe``'s ``tokens``)
GRID_H, GRID_W = object(), object()


#: a leaf is probed at most at this many times its reference input's area, or at any size
#: within the limits below (sizes beyond are infeasible to the budget: never chosen)
MAX_PROBE_GROWTH = 16
MAX_PROBE_TOKENS = 4096  # a token leaf: its attention maps grow with the square of this
MAX_PROBE_ELEMENTS = 1 << 24  # a map leaf: channels x height x width of its input


class ProbeFailed(RuntimeError):
    """A leaf module could not run alone on the input the probe made for it (e.g. its input is
    not N x C x H x W: Swin's channels-last blocks); the probe does not explain that node."""


class _LeafProbe:
    """A leaf module (or a function fx does not enter) run alone, per input size: (output
    (h, w), fvcore FLOPs), memoised.

    For leaves whose output size or FLOPs no rule explains (data-dependent forwards that fx
    cannot enter, such as timm's ``ConvMlp`` head, or torchvision's ``shifted_window_attention``,
    whose FLOPs follow the windows its input is padded to). A new input size costs one small fvcore count
    (milliseconds); sizes change rarely during training.
    """

    def __init__(self, module: Callable, in_info: TensorInfo, gm: fx.GraphModule, channels_last: bool = False,
                 call: tuple[tuple, dict, list[Tensor | None]] | None = None, memo: dict | None = None,
                 tokens: bool = False, stored: Sequence[tuple[str, str]] = ()) -> None:
        self.module, self.in_info, self.gm = module, in_info, gm
        self.channels_last = channels_last  # N x H x W x C in and out (Swin's blocks)
        # N x (h * w) x C in, the grid's h and w as GRID_H / GRID_W among the call's arguments
        # (Twins' window attention: ``attn(x, (H, W))``); an output of h * w tokens is the grid's
        self.tokens = tokens
        self.stored = list(stored)  # (attribute, HEIGHT or WIDTH): the grid set on the module before each run
        # a function's call: args and kwargs with _SLOT for each tensor, and those tensors
        # (None: the probed input); a module is called with the probed input alone
        self.call = call or ((_SLOT,), {}, [None])
        # (h, w, other inputs' sizes): (out h w, FLOPs); shared by probes of identical modules
        self.memo: dict[tuple, tuple[tuple[int, int], int] | ProbeFailed] = {} if memo is None else memo

    def __call__(self, h: int, w: int, others: tuple = ()) -> tuple[tuple[int, int], int]:
        key = (max(1, h), max(1, w), others)
        if isinstance(self.memo.get(key), ProbeFailed):  # a failure is remembered too: it cost a forward
            raise self.memo[key]
        if key not in self.memo and key[0] * key[1] > self._largest_area():
            # never run: a leaf's memory can grow with the square of its input (attention); at a
            # stride bound under placement exact a map may be 32x as tall (ConViT's gated
            # attention over 448 x 448 tokens took 17 GB before the kernel killed the process)
            self.memo[key] = ProbeFailed(f"{type(self.module).__name__} is not run on {key[0]}x{key[1]}: over "
                                         f"{MAX_PROBE_GROWTH}x its reference input and over the probes' size limit")
            raise self.memo[key]
        if key not in self.memo:
            n, c = self.in_info.shape[0], self.in_info.shape[-1 if self.channels_last or self.tokens else 1]
            shape = (n, *key[:2], c) if self.channels_last else (*self.in_info.shape[:-2], *key[:2])
            if self.tokens:
                shape = (n, key[0] * key[1], c)
            x = torch.zeros(shape, dtype=self.in_info.dtype, device=_device(self.gm))
            args, kwargs, tensors = self.call
            if self.tokens:
                args, kwargs = fx.node.map_aggregate((args, kwargs), lambda a: key[0] if a is GRID_H else key[1] if a is GRID_W else a)
            wrapper = _OneCall(self.module, args, kwargs, [])
            if isinstance(self.module, nn.Module):
                wrapper.inner = self.module
            saved = {name: getattr(self.module, name, None) for name, _ in self.stored}
            try:
                for name, side in self.stored:
                    setattr(self.module, name, key[0] if side == HEIGHT else key[1])
                flops = _count_one(wrapper, tuple(self._input(t, x, others, key) for t in tensors), self.gm)
            except Exception as err:  # the module's own code refused the made-up input
                failed = ProbeFailed(f"{type(self.module).__name__} cannot run alone on {shape}: {err}")
                self.memo[key] = failed
                raise failed from err
            finally:
                for name, value in saved.items():
                    setattr(self.module, name, value)
            out = wrapper.last_shape
            hw = (out[1], out[2]) if self.channels_last else (out[-2], out[-1])
            if self.tokens and len(out) == 3 and out[1] == key[0] * key[1]:
                hw, out = key[:2], (*out, 0)
            self.memo[key] = (hw if len(out) == 4 else (1, 1), flops)
        return self.memo[key]

    def _largest_area(self) -> int:
        """The largest input area (token count for a token leaf) this leaf is run at: up to
        ``MAX_PROBE_GROWTH`` times its reference one, and at any size within the probes' limit."""
        shape = self.in_info.shape
        if self.tokens:
            return max(MAX_PROBE_GROWTH * shape[1], MAX_PROBE_TOKENS)
        area, channels = (shape[1] * shape[2], shape[3]) if self.channels_last else (shape[-2] * shape[-1], math.prod(shape[1:-2]))
        return max(MAX_PROBE_GROWTH * area, MAX_PROBE_ELEMENTS // max(channels, 1))

    def _input(self, t: Any, x: Tensor, others: tuple, key: tuple) -> Tensor:
        """One tensor of the replayed call: the probed map, a moving input at its size, one made
        from the grid's sizes, or as recorded."""
        if t is None:
            return x
        if callable(t) and not isinstance(t, Tensor):
            return t(key[0], key[1])
        if isinstance(t, tuple):  # (index among the other sizes, its recorded TensorInfo), N x C x H x W
            index, info = t
            h, w = others[index] if index < len(others) else info.shape[-2:]
            return torch.zeros((*info.shape[:-2], max(1, h), max(1, w)), dtype=info.dtype, device=_device(self.gm))
        return t


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
        if isinstance(info, TensorInfo):
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
    from .flops import FlopCountAnalysis, _dynopool_as_one_op, _traceable_unpool, set_handles

    was_training = module.training
    module.eval()
    with _quiet(), torch.no_grad(), _dynopool_as_one_op(gm), _traceable_unpool():
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
