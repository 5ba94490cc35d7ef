"""Freeze a converted model: learned sizes fixed as Python ints, learnable sites replaced (DESIGN.md §6).

``freeze(model, input_size)`` runs the model once at its reference input size, records the
input size each learnable site sees, and replaces every module that has a
``frozen(in_size) -> nn.Module`` method (DynOPool, and any other learnable resizing module that
implements it) by the static module it returns. The adaptive average pools that hold pinned
sites' input sizes are frozen too (identity, plain average pool, or exact averaging matmuls),
and so are the model's own adaptive average and max pools to sizes other than 1x1 (modules or
``F.adaptive_*_pool2d`` calls: an SPP head), which ONNX exports only where the sizes divide,
so that nothing left depends on the input size at run time. The result traces, scripts with
``torch.jit.trace``, exports (ONNX, ``torch.export``) and counts with plain fvcore.
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn

from .convert import check_input_size
from .errors import UserInputError
from .frozen import frozen_adaptive_avg, frozen_adaptive_max

__all__ = ["freeze", "frozen_parts", "frozen_sites", "reference_input_size"]


def _is_learnable_site(module: nn.Module) -> bool:
    return callable(getattr(module, "frozen", None))


def _is_size_holder(module: nn.Module) -> bool:
    """An adaptive average or max pool to a size other than 1x1 (a pin, or the model's own: an
    SPP head): its kernel follows its input, and ONNX exports it only where the sizes divide."""
    if not isinstance(module, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)) or getattr(module, "return_indices", False):
        return False
    size = tuple(module.output_size) if isinstance(module.output_size, (tuple, list)) else (module.output_size,) * 2
    return None not in size and size != (1, 1)


_ADAPTIVE_CALLS = {F.adaptive_avg_pool2d: nn.AdaptiveAvgPool2d, F.adaptive_max_pool2d: nn.AdaptiveMaxPool2d}


def _adaptive_calls_as_modules(gm: nn.Module) -> None:
    """In a GraphModule, each call of ``F.adaptive_avg_pool2d``/``adaptive_max_pool2d`` with a
    static output size becomes a call of the equal module (in place), so that ``frozen_parts``
    finds and freezes it like the modules."""
    if not isinstance(gm, fx.GraphModule):
        return
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _ADAPTIVE_CALLS:
            continue
        args = dict(zip(("input", "output_size", "return_indices"), node.args), **node.kwargs)
        size, x = args.get("output_size"), args.get("input")
        if args.get("return_indices") or not isinstance(x, fx.Node) or not (
                isinstance(size, int) or (isinstance(size, (tuple, list)) and all(isinstance(v, int) for v in size))):
            continue
        if not _is_size_holder(_ADAPTIVE_CALLS[node.target](size)):  # a global pool exports as it is
            continue
        name = f"adaptive_pool_call_{count}"
        while hasattr(gm, name):
            count += 1
            name = f"adaptive_pool_call_{count}"
        gm.add_submodule(name, _ADAPTIVE_CALLS[node.target](size))
        with gm.graph.inserting_before(node):
            module_call = gm.graph.call_module(name, (x,))
        module_call.meta = dict(node.meta)
        node.replace_all_uses_with(module_call)
        gm.graph.erase_node(node)
        count += 1
    if count:
        gm.graph.lint()
        gm.recompile()


def frozen_sites(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules ``freeze`` replaces: learnable sites (with a ``frozen`` method) and pins."""
    return [(name, m) for name, m in model.named_modules() if name and (_is_learnable_site(m) or _is_size_holder(m))]


def reference_input_size(model: nn.Module) -> tuple[int, int, int] | None:
    """The reference ``(C, H, W)`` a converted GraphModule was converted at, when it records one."""
    size = getattr(model, "meta", {}).get("dynopool_input_size")
    return check_input_size(size) if size is not None else None


def _input_sizes(model: nn.Module, names: list[str], input_size: tuple[int, int, int]) -> dict[str, tuple[int, int]]:
    """The spatial input size each named module sees on one forward at ``input_size``."""
    seen: dict[str, tuple[int, int]] = {}
    clashes: dict[str, set[tuple[int, int]]] = {}

    def hook(name: str):
        def record(_module, args):
            size = (int(args[0].shape[-2]), int(args[0].shape[-1]))
            if seen.setdefault(name, size) != size:
                clashes.setdefault(name, {seen[name]}).add(size)
        return record

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_size, device=device, dtype=dtype))
    except Exception as err:
        msg = " ".join(str(err).split())[:200]
        raise UserInputError(f"the model fails on an input of size {list(input_size)}: {type(err).__name__}: {msg}") from err
    finally:
        for h in handles:
            h.remove()
    if clashes:
        name, sizes = next(iter(clashes.items()))
        raise UserInputError(f"cannot freeze site {name!r}: it runs more than once, at the sizes {sorted(sizes)}")
    return seen


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def frozen_parts(model: nn.Module, input_size: Sequence[int] | None = None) -> dict[str, tuple[tuple[int, int], nn.Module]]:
    """What ``freeze`` puts where: module path -> (the input size it sees, its static replacement).

    Runs ``model`` once (eval mode, no gradient, batch of one) at ``input_size`` (default: the
    reference size the converted model records); ``model`` is left as it was.
    """
    size = check_input_size(input_size) if input_size is not None else reference_input_size(model)
    if size is None:
        raise UserInputError("freeze needs the reference input size (C, H, W): pass input_size (a checkpoint's input_size)")
    targets = frozen_sites(model)
    was_training = model.training
    model.eval()
    try:
        sizes = _input_sizes(model, [name for name, _ in targets], size)
    finally:
        model.train(was_training)
    parts = {}
    for name, module in targets:
        if name not in sizes:
            if _is_learnable_site(module):
                raise UserInputError(f"cannot freeze site {name!r}: it does not run on an input of size {list(size)}")
            continue  # an unused pool keeps its op
        if _is_learnable_site(module):
            static = module.frozen(sizes[name])
        else:
            freeze_pool = frozen_adaptive_max if isinstance(module, nn.AdaptiveMaxPool2d) else frozen_adaptive_avg
            static = freeze_pool(sizes[name], _pair(module.output_size))
        parts[name] = (sizes[name], static)
    return parts


def freeze(model: nn.Module, input_size: Sequence[int] | None = None) -> nn.Module:
    """A copy of ``model`` (in eval mode) with its learned sizes fixed at ``input_size``.

    ``input_size`` is the reference ``(C, H, W)`` (a checkpoint's ``input_size``); by default the
    one the converted model records. Each module with a ``frozen(in_size)`` method is replaced
    by what that returns for the input size it sees there (DynOPool: ``max_pool2d`` /
    ``avg_pool2d`` at an exact 2x, else bilinear resize to ``2H' x 2W'`` then a 2x2 pool), and
    each pin's adaptive pool by its static equivalent (``frozen_parts``). No stride parameter
    remains. The frozen model computes the converted model's output at ``input_size`` (to float
    rounding) and keeps those sizes at any other input: export it for the reference size.
    """
    size = check_input_size(input_size) if input_size is not None else reference_input_size(model)
    frozen = copy.deepcopy(model)
    _adaptive_calls_as_modules(frozen)
    for name, (_, static) in frozen_parts(frozen, size).items():
        _replace(frozen, name, static)
    return frozen.eval()


def _pair(size) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
