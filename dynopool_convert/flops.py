"""FLOP counting by fvcore's convention (DESIGN.md §3): one fused multiply-add = one FLOP.

``count_flops(model, (3, H, W))`` runs fvcore's ``FlopCountAnalysis`` on a batch of one, in
eval mode (batch norm counts 2 FLOPs per element, as for inference), with the warnings of
fvcore and of the jit tracer silenced. DynOPool's own cost is counted through a handle: while
counting, every DynOPool site runs as one opaque custom op (``dynopool_flops::resample``)
that fvcore sees as a single node, instead of the index_select/lerp/max_pool ops (or the
numba autograd Function) of its real forward. The count assigned to that op is
``DYNOPOOL_FLOPS_PER_OUTPUT`` per output element (per batch item and channel):

- 4 query points, each a bilinear read: 4 FLOPs each, as fvcore counts
  ``upsample_bilinear2d`` (4 per interpolated value) -> 16;
- the aggregation of the four values (max or mean): 1 per aggregated value, as fvcore counts
  ``adaptive_avg_pool2d`` (1 per input element) -> 4.

Convolutions with string padding (``padding="same"``, which the conversion gives stride-1
convs with even kernels, e.g. a ViT's patch embedding) run as ``aten::_convolution_mode``,
which fvcore does not count; a handle counts them as fvcore counts ``aten::_convolution``.
``F.scaled_dot_product_attention`` (the attention of timm's and torchvision's ViTs), which
fvcore does not count either, is counted as the two matmuls it replaces, as fvcore counts
explicit ``q @ k^T`` and ``attn @ v``: ``N x heads x L_q x L_k x (d + d_v)``. ``torch.einsum``
of two operands is counted as fvcore counts it, exactly (fvcore's own count is rounded to four
digits: ``_einsum_handle``). Recurrent layers
(``nn.LSTM``/``GRU``/``RNN`` and their cells: timm's Sequencer), which fvcore does not count
either, count their weight matrices' multiply-adds at every step of every sequence, per
direction and layer (their gates' elementwise work uncounted, as fvcore counts no elementwise op).

>>> import torch.nn as nn
>>> count_flops(nn.Conv2d(3, 8, 3, padding=1), (3, 8, 8))  # 8*8 outputs * 8 channels * 27 MACs
13824
"""
from __future__ import annotations

import contextlib
import logging
import math
import types
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from fvcore.nn import FlopCountAnalysis


def _load_fvcore() -> type:
    """Import fvcore on first use (the operator and training run without it, e.g. on GPU images)."""
    with warnings.catch_warnings():  # fvcore.nn scripts its focal loss at import: deprecated jit.script
        warnings.simplefilter("ignore", FutureWarning)
        from fvcore.nn import FlopCountAnalysis
        from fvcore.nn.jit_handles import conv_flop_count, get_shape
    globals().update(FlopCountAnalysis=FlopCountAnalysis, conv_flop_count=conv_flop_count, get_shape=get_shape)
    return FlopCountAnalysis


def __getattr__(name: str) -> Any:
    if name in ("FlopCountAnalysis", "conv_flop_count", "get_shape"):
        _load_fvcore()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

from .dynopool import DynOPool, dynopool2d, dynopool_modules
from .dynresize import DynResize, dynresize2d
from .errors import UnsupportedModelError, UserInputError, input_size_hint

__all__ = [
    "count_flops",
    "flops_by_module",
    "flop_analysis",
    "format_flops",
    "DYNOPOOL_FLOPS_PER_OUTPUT",
    "DYNOPOOL_OP",
    "DYNRESIZE_FLOPS_PER_OUTPUT",
    "DYNRESIZE_OP",
    "set_handles",
]

#: FLOPs charged per DynOPool output element: 4 bilinear reads x 4 + 4 aggregated values.
DYNOPOOL_FLOPS_PER_OUTPUT: int = 4 * 4 + 4

#: Name of the opaque op a DynOPool site runs as while being counted.
DYNOPOOL_OP = "dynopool_flops::resample"


@torch.library.custom_op(DYNOPOOL_OP, mutates_args=())
def _resample_for_counting(
    x: Tensor, stride: Tensor, aggregate: str, r_min: float, r_max: float, backend: str, m_h: int, m_w: int
) -> Tensor:
    """DynOPool's forward as one op for the jit tracer (the value is the real output)."""
    return dynopool2d(x, stride, aggregate, (r_min, r_max), backend, (m_h, m_w)).clone()


@_resample_for_counting.register_fake
def _(x: Tensor, stride: Tensor, aggregate: str, r_min: float, r_max: float, backend: str, m_h: int, m_w: int) -> Tensor:
    return torch.empty_like(x)  # shape not needed symbolically: counting runs on real tensors


#: FLOPs charged per DynResize output element, as fvcore counts ``upsample_bilinear2d`` (the
#: op a frozen DynResize becomes); none where the size is unchanged (the identity runs nothing).
#: An antialiased shrink (``DynResize(antialias=True)``, not the default) runs a filter about
#: twice the shrink ratio wide per axis and is counted the same, as fvcore has no count for it.
DYNRESIZE_FLOPS_PER_OUTPUT: int = 4

#: Name of the opaque op a DynResize site runs as while being counted.
DYNRESIZE_OP = "dynopool_flops::resize"


@torch.library.custom_op(DYNRESIZE_OP, mutates_args=())
def _resize_for_counting(x: Tensor, stride: Tensor, b_h: float, b_w: float, r_min: float, r_max: float,
                         m_h: int, m_w: int, antialias: bool) -> Tensor:
    """DynResize's forward as one op for the jit tracer (the value is the real output)."""
    return dynresize2d(x, stride, (b_h, b_w), (r_min, r_max), (m_h, m_w), antialias=antialias).clone()


@_resize_for_counting.register_fake
def _(x: Tensor, stride: Tensor, b_h: float, b_w: float, r_min: float, r_max: float, m_h: int, m_w: int,
      antialias: bool) -> Tensor:
    return torch.empty_like(x)


def _per_output(flops_per_element: int, identity_free: bool = False) -> Callable[[list[Any], list[Any]], int]:
    def handle(inputs: list[Any], outputs: list[Any]) -> int:
        shape = get_shape(outputs[0])
        if identity_free and list(shape) == list(get_shape(inputs[0])):
            return 0
        n = 1
        for d in shape:
            n *= int(d)
        return flops_per_element * n

    return handle


_dynopool_handle = _per_output(DYNOPOOL_FLOPS_PER_OUTPUT)


def _conv_mode_handle(inputs: list[Any], outputs: list[Any]) -> int:
    x, w, out = get_shape(inputs[0]), get_shape(inputs[1]), get_shape(outputs[0])
    return int(conv_flop_count(x, w, out, transposed=False))


def _attention_handle(inputs: list[Any], outputs: list[Any]) -> int:
    q, k, v = (get_shape(t) for t in inputs[:3])
    batch = 1
    for d in q[:-2]:
        batch *= int(d)
    l_q, d_qk, l_k, d_v = int(q[-2]), int(q[-1]), int(k[-2]), int(v[-1])
    return batch * l_q * l_k * (d_qk + d_v)


def _einsum_handle(inputs: list[Any], outputs: list[Any]) -> int:
    """``aten::einsum`` contracting two operands (some index summed), as fvcore counts it but
    exact: the product of every index's size (one multiply-add per term, as fvcore counts
    ``abc,abd->acd``); for other contractions fvcore reads numpy's count off
    ``np.einsum_path``'s printed report, rounded to four digits, which no size rule of the cost
    model can follow. Other forms (one or three operands, an ellipsis, no summed index):
    fvcore's own."""
    from fvcore.nn.jit_handles import einsum_flop_jit

    equation = str(inputs[0].toIValue()).replace(" ", "")
    operands = list(inputs[1].node().inputs())
    lhs, arrow, rhs = equation.partition("->")
    terms = lhs.split(",")
    if not arrow:  # implicit output: the indices that appear once
        rhs = "".join(sorted(c for c in set(lhs) if c.isalpha() and lhs.count(c) == 1))
    if len(operands) != 2 or len(terms) != 2 or "." in equation or not any(c not in rhs for c in lhs if c != ","):
        return int(einsum_flop_jit(inputs, outputs))
    sizes: dict[str, int] = {}
    for term, value in zip(terms, operands):
        for letter, size in zip(term, get_shape(value)):
            sizes[letter] = int(size)
    return math.prod(sizes.values())


def _matrix_macs(values: Iterable[Any]) -> int:
    """The elements of the 2-d tensors among ``values`` (weight matrices: one MAC each per step)."""
    total = 0
    for v in values:
        shape = get_shape(v)
        if shape is not None and len(shape) == 2:
            total += int(shape[0]) * int(shape[1])
    return total


def _recurrent_handle(inputs: list[Any], outputs: list[Any]) -> int:
    """``aten::lstm``/``gru``/``rnn_*``: every step of every sequence (the output's leading
    dims, padded or packed) runs every direction's and layer's weight matrices (the weights
    list: the one of 2-d tensors; the initial states are 3-d)."""
    steps = math.prod(int(d) for d in get_shape(outputs[0])[:-1])
    lists = [v.node().inputs() for v in inputs if v.node().kind() == "prim::ListConstruct"]
    return steps * sum(_matrix_macs(values) for values in lists)


def _recurrent_cell_handle(inputs: list[Any], outputs: list[Any]) -> int:
    """``aten::lstm_cell``/``gru_cell``/``rnn_*_cell``: one step, ``w_ih`` and ``w_hh``."""
    batch = math.prod(int(d) for d in get_shape(inputs[0])[:-1])
    return batch * _matrix_macs(inputs[2:4])


_RECURRENT_OPS = ("aten::lstm", "aten::gru", "aten::rnn_tanh", "aten::rnn_relu")
_RECURRENT_CELL_OPS = ("aten::lstm_cell", "aten::gru_cell", "aten::rnn_tanh_cell", "aten::rnn_relu_cell")


def set_handles(fa: FlopCountAnalysis) -> FlopCountAnalysis:
    """Add this module's op handles (DynOPool, string-padded convolutions, fused attention,
    recurrent layers) to ``fa``."""
    fa.set_op_handle(DYNOPOOL_OP, _dynopool_handle)
    fa.set_op_handle(DYNRESIZE_OP, _per_output(DYNRESIZE_FLOPS_PER_OUTPUT, identity_free=True))
    fa.set_op_handle("aten::_convolution_mode", _conv_mode_handle)
    fa.set_op_handle("aten::scaled_dot_product_attention", _attention_handle)
    fa.set_op_handle("aten::einsum", _einsum_handle)
    for op in _RECURRENT_OPS:
        fa.set_op_handle(op, _recurrent_handle)
    for op in _RECURRENT_CELL_OPS:
        fa.set_op_handle(op, _recurrent_cell_handle)
    return fa


def _counting_forward(self: DynOPool, x: Tensor) -> Tensor:
    r_min, r_max = self.r_bounds
    if isinstance(self, DynResize):
        return _resize_for_counting(x, self.stride_tensor(), *self.base, r_min, r_max, *self.multiple, self.antialias)
    return _resample_for_counting(x, self.stride_tensor(), self.aggregate, r_min, r_max, self.backend, *self.multiple)


@contextlib.contextmanager
def _dynopool_as_one_op(model: nn.Module) -> Iterator[None]:
    """Route every DynOPool of ``model`` through the opaque counting op, then restore."""
    patched = []
    try:
        for _, m in dynopool_modules(model):
            if "forward" not in m.__dict__:
                m.forward = types.MethodType(_counting_forward, m)
                patched.append(m)
        yield
    finally:
        for m in patched:
            del m.forward


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the jit tracer's and fvcore's warnings (unsupported ops are counted as 0)."""
    logger = logging.getLogger("fvcore")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def _no_mha_fast_path() -> Iterator[None]:
    """``nn.MultiheadAttention`` on its standard path while counting: in eval mode without
    gradients it would run one fused op (``aten::_native_multi_head_attention``) that fvcore does
    not count, and torchvision's ViTs would lose a third of their FLOPs (ViT-B/16: 11.3G for
    fvcore's 17.6G)."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


def _traced_unpool_check(output_size: list[Any], dim: int) -> None:
    """torch's own check of a max-unpool output size, on a size the tracer made a tensor."""
    if int(output_size[dim]) < 0:
        raise ValueError(f"max_unpooling: output_size must contain non-negative spatial dimensions, but got "
                         f"output_size[{dim}]={int(output_size[dim])}")


@contextlib.contextmanager
def _traceable_unpool() -> Iterator[None]:
    """``F.max_unpool*`` traceable while counting. Under torch.jit tracing (fvcore) sizes are
    0-d tensors, and torch's ``_check_unpool_output_size`` hands ``size >= 0`` (a tensor) to
    ``torch._check_value``, which raises TypeError for a non-bool: a torch bug that fails every
    model with ``nn.MaxUnpool2d``. ``F._unpool_output_size`` looks the check up as a module
    global at each call, so it is swapped for one that reads the size as an int."""
    functional = torch.nn.functional
    original = getattr(functional, "_check_unpool_output_size", None)
    if original is None:  # a torch without the check
        yield
        return
    functional._check_unpool_output_size = _traced_unpool_check
    try:
        yield
    finally:
        functional._check_unpool_output_size = original


def _check_input_size(input_size: Sequence[int]) -> tuple[int, int, int]:
    size = tuple(int(v) for v in input_size)
    if len(size) != 3 or min(size) < 1:
        raise UserInputError(f"input size must be three positive integers (C, H, W), got {tuple(input_size)}")
    return size  # type: ignore[return-value]


@contextlib.contextmanager
def flop_analysis(model: nn.Module, input_size: Sequence[int] = (3, 224, 224)) -> Iterator[FlopCountAnalysis]:
    """fvcore's ``FlopCountAnalysis`` of ``model`` at ``input_size`` (batch 1, eval mode).

    A context manager: the model is in eval mode and its DynOPool sites are counted with the
    DynOPool handle while the analysis is read. Statistics are computed lazily, so read them
    inside the ``with`` block::

        with flop_analysis(model, (3, 64, 64)) as fa:
            per_module = fa.by_module()
    """
    c, h, w = _check_input_size(input_size)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    was_training = model.training
    model.eval()
    try:
        with _quiet(), torch.no_grad(), _dynopool_as_one_op(model), _no_mha_fast_path(), _traceable_unpool():
            fa = _load_fvcore()(model, torch.zeros(1, c, h, w, device=device, dtype=dtype))
            set_handles(fa)
            fa.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
            try:
                fa.total()  # run the trace while the patches are in place
            except Exception as err:  # the model failing at the user's input size is user-fixable
                _raise_for_failed_count(model, err, (c, h, w), torch.zeros(1, c, h, w, device=device, dtype=dtype))
            yield fa
    finally:
        model.train(was_training)


def _raise_for_failed_count(model: nn.Module, err: Exception, size: tuple[int, int, int], x: Tensor) -> None:
    """One line for a failed count: the model fails at this size (user-fixable), or, where the
    model itself runs, fvcore's torch.jit trace of it fails (an op whose Python wrapper does not
    trace)."""
    msg = " ".join(str(err).split())[:200]
    try:
        model(x)
    except Exception:
        raise UserInputError(
            f"the model fails on an input of size {list(size)}: {type(err).__name__}: {msg}; {input_size_hint(msg, size)}"
        ) from err
    raise UnsupportedModelError(
        f"fvcore cannot count this model's FLOPs (the model runs on an input of size {list(size)}, but fvcore's "
        f"torch.jit trace of it fails: {type(err).__name__}: {msg}); dynopool counts FLOPs with fvcore only"
    ) from err


def count_flops(model: nn.Module, input_size: Sequence[int] = (3, 224, 224)) -> int:
    """FLOPs of one forward pass of ``model`` on a ``1 x C x H x W`` input, by fvcore.

    Works on original and converted models alike; DynOPool sites are counted with
    ``DYNOPOOL_FLOPS_PER_OUTPUT`` per output element (see the module docstring).
    """
    with flop_analysis(model, input_size) as fa:
        return int(fa.total())


def flops_by_module(model: nn.Module, input_size: Sequence[int] = (3, 224, 224)) -> dict[str, int]:
    """FLOPs per module (qualified name -> count, children included; ``""`` is the total)."""
    with flop_analysis(model, input_size) as fa:
        return {name: int(v) for name, v in fa.by_module().items()}


def format_flops(n: float) -> str:
    """Human-readable FLOPs with three significant digits: ``4111512576 -> '4.11G'``.

    >>> format_flops(4111512576), format_flops(750_000), format_flops(12)
    ('4.11G', '750k', '12')
    """
    n = float(n)
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        # compare the rounded value so that 999.7e6 reads '1G', not '1e+03M'
        if abs(float(f"{n:.3g}")) >= scale:
            return f"{float(f'{n / scale:.3g}'):g}{unit}"
    return f"{n:.3g}"
