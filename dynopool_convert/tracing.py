"""Leaf-aware torch.fx tracing (DESIGN.md §2).

Built on torchvision's ``NodePathTracer`` (node names are module paths, ``_N`` suffixes for
repeated calls) with timm's notrace registries (``get_notrace_modules``/``get_notrace_functions``)
and torchvision's default leaves (``torchvision.ops``). The op registry's modules (every module
a site handler rewrites, DynOPool) are kept as leaves too, so that e.g. timm's ``Conv2dSame``
shows up as one node. The one tracer of the package: ``annotated_graph`` builds on it.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import math
import re
import sys
import types
from dataclasses import dataclass, field
from typing import Iterator

import torchvision
from torch import Tensor, fx, nn
from torch.utils import _pytree as pytree

from .errors import UserInputError
from . import size_branches
from .numpy_sizes import NUMPY_REFUSAL, numpy_of_sizes
from .size_branches import CONTROL_FLOW_REFUSAL, BranchingTracer

__all__ = ["Traced", "trace_model", "leaf_module_types"]


@dataclass
class Traced:
    """A traced model: the GraphModule and the qualified name of each node (site names)."""

    graph_module: fx.GraphModule
    node_names: dict[str, str]  # fx node.name -> qualified (module path) name
    notes: list[str] = field(default_factory=list)  # module classes kept as leaves, and why


#: torchvision.ops modules that are plain compositions of layers (torchvision keeps them as
#: leaves; we must see the strided convs inside them)
_TRACE_THROUGH = frozenset({"Conv2dNormActivation", "Conv3dNormActivation", "SqueezeExcitation", "MLP", "Permute"})


def leaf_module_types() -> list[type]:
    """Module classes fx must not enter: timm's notrace modules, torchvision ops, the op registry's."""
    from timm.layers import get_notrace_modules

    from .op_registry import leaf_module_types as registry_leaves

    ops = [
        obj for obj in vars(torchvision.ops).values()
        if isinstance(obj, type) and issubclass(obj, nn.Module) and obj.__name__ not in _TRACE_THROUGH
    ]
    return list(dict.fromkeys([*get_notrace_modules(), *ops, *registry_leaves(), *_mode_dependent_modules(),
                               *_einops_layers()]))


def _einops():
    """einops where it is installed (research code reshapes with it; fx cannot trace into it:
    it asks its backend registry for the type of a Proxy), else None. Not a dependency."""
    try:
        import einops
    except ImportError:
        return None
    return einops


def _einops_functions() -> list:
    """einops' tensor functions, recorded as single calls (a shape rearrangement the cost model
    reads off its two passes, as it reads a reshape)."""
    einops = _einops()
    names = ("rearrange", "reduce", "repeat", "einsum", "pack", "unpack")
    return [getattr(einops, n) for n in names if einops is not None and callable(getattr(einops, n, None))]


def _einops_layers() -> list[type]:
    """einops' layer classes (``Rearrange``, ``Reduce``): leaves."""
    if _einops() is None:
        return []
    try:
        from einops.layers import torch as layers
    except ImportError:
        return []
    return [cls for cls in (getattr(layers, "Rearrange", None), getattr(layers, "Reduce", None)) if isinstance(cls, type)]


def _mode_dependent_modules() -> list[type]:
    """Modules whose forward branches on ``self.training`` in Python: as leaves they keep
    following ``.train()``/``.eval()`` after tracing (which is done in eval mode)."""
    from timm.layers import DropBlock2d, DropPath

    return [DropPath, DropBlock2d]


def _notrace_functions() -> list:
    """timm's notrace functions, the op registry's (e.g. timm's ``*_pool2d_same``: sites) and einops'."""
    from timm.layers import get_notrace_functions

    from .op_registry import autowrap_functions

    return list(dict.fromkeys([*get_notrace_functions(), *autowrap_functions(), *_einops_functions()]))


def _culprit(err: BaseException) -> str:
    """Best guess at the module or function whose forward broke tracing, from the traceback."""
    tb = err.__traceback__
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        module = frame.f_locals.get("self")
        filename = frame.f_code.co_filename
        if "torch/fx" in filename or "torchvision/models/feature_extraction" in filename or filename == size_branches.__file__:
            continue
        where = f"{frame.f_code.co_name}() in {filename.rsplit('/', 1)[-1]}:{frame.f_lineno}"
        if isinstance(module, nn.Module):
            return f"{type(module).__module__}.{type(module).__name__}.{where}"
        return where
    return "unknown location"


def _default_args(model: nn.Module) -> dict | None:
    """Forward parameters after the input that have defaults (``mask=None``, flags): traced at
    their default value, so that ``if mask is not None`` takes the branch a plain call takes."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    concrete = {p.name: p.default for p in params[1:] if p.kind in kinds and p.default is not inspect.Parameter.empty}
    return concrete or None


def _plain_arguments(graph: fx.Graph, concrete: dict | None) -> fx.Graph:
    """``graph`` called with the input alone: fx flattens a default that is a container
    (``out_indices=(0, 1)``) into placeholders whose generated signature does not compile
    (SyntaxError); their uses take the traced values instead."""
    if not concrete or not any(isinstance(v, (tuple, list, dict)) for v in concrete.values()):
        return graph
    leaves = pytree.tree_leaves(list(concrete.values()))
    placeholders = [n for n in graph.nodes if n.op == "placeholder"][1:]
    if len(leaves) != len(placeholders):
        return graph
    for node, value in zip(placeholders, leaves):
        for user in list(node.users):
            user.args, user.kwargs = fx.node.map_arg((user.args, user.kwargs), lambda a: value if a is node else a)
        graph.erase_node(node)
    out_spec = getattr(getattr(graph._codegen, "pytree_info", None), "out_spec", None)
    output = next(n for n in graph.nodes if n.op == "output")
    if out_spec is not None:  # the output, flattened for the pytree signature, as the model returns it
        output.args = (pytree.tree_unflatten(list(output.args[0]), out_spec),)
    graph._codegen = fx.graph.CodeGen()
    return graph


#: how many module classes ``trace_model`` may turn into leaves to get past tracing failures
MAX_AUTO_LEAVES = 8
#: ``node.meta`` key of a traced node's qualified name (module path, then the op's name)
QUALNAME = "qualname"


def _failing_module(err: BaseException, root: nn.Module) -> nn.Module | None:
    """The innermost submodule (not the root) whose forward was running when tracing failed."""
    tb = err.__traceback__
    found = None
    while tb is not None:
        module = tb.tb_frame.f_locals.get("self")
        if isinstance(module, nn.Module) and module is not root and not isinstance(module, fx.GraphModule):
            found = module
        tb = tb.tb_next
    return found


def _hides_sites(module: nn.Module) -> bool:
    """Whether ``module`` holds a resizing op: a strided module, or a forward of its own that
    slices every other row and column (the Swin paper code's patch merging: ``x[:, 0::2, 1::2]``)."""
    from .sites import site_module_types

    types = tuple(site_module_types())
    return any((isinstance(m, types) and getattr(m, "stride", 1) not in (1, (1, 1), None)) or _slices_by_two(type(m))
               for m in module.modules())


#: two axes indexed with steps of 2 (``0::2, 1::2``, ``::2, ::2``)
_EVERY_OTHER = re.compile(r"[01]?::2\s*,\s*[01]?::2")


@functools.lru_cache(maxsize=512)
def _slices_by_two(cls: type) -> bool:
    """Whether ``cls``'s own forward (not a library's) indexes two axes with steps of 2."""
    if cls.__module__.split(".")[0] in _LIBRARIES or cls.forward is nn.Module.forward:
        return False
    try:
        return bool(_EVERY_OTHER.search(inspect.getsource(cls.forward)))
    except (OSError, TypeError):
        return False


def _root_class_modules(model: nn.Module) -> list[types.ModuleType]:
    """The Python modules that define the root's classes (torch's excepted).

    fx replaces the autowrapped (notrace) functions only in the globals of the root's forward
    and of each submodule's forward; a helper method that a subclass defines in another file
    (timm's distilled DeiT ``_pos_embed``, calling ``resample_abs_pos_embed``) needs its
    module's globals patched too.
    """
    found: list[types.ModuleType] = []
    for cls in type(model).__mro__:
        module = sys.modules.get(cls.__module__)
        if module is not None and not cls.__module__.startswith("torch") and module not in found:
            found.append(module)
    return found


#: libraries whose code is traceable as it is (or kept whole by their notrace registries)
_LIBRARIES = ("torch", "torchvision", "timm", "einops")
#: builtins that fx refuses on a traced value, recorded as calls in the model's own code instead
_SIZE_BUILTINS = ("int", "float", "len")
#: fx's refusals of them ("int() argument must be ... not 'Proxy'", "'len' is not supported ...")
_SIZE_BUILTIN_REFUSALS = re.compile(r"(int|float)\(\) argument must be .*not '\w*Proxy'|'len' is not supported")


#: library functions registered with ``torch.fx.wrap`` that are traced into all the same: their
#: strided slices are a site (torchvision's Swin patch merging: pad to even, four quarters, cat)
_WRAPPED_TRACED_INTO = (("torchvision.models.swin_transformer", "_patch_merging_pad"),)


@contextlib.contextmanager
def _traced_into() -> Iterator[None]:
    """``_WRAPPED_TRACED_INTO``'s functions unregistered from ``torch.fx.wrap`` until the block ends."""
    from torch.fx import _symbolic_trace

    table = getattr(_symbolic_trace, "_wrapped_fns_to_patch", None)
    removed = {}
    if isinstance(table, dict):
        for module_name, name in _WRAPPED_TRACED_INTO:
            module = sys.modules.get(module_name)
            key = (id(vars(module)), name) if module is not None else None
            if key in table:
                removed[key] = table.pop(key)
    try:
        yield
    finally:
        if removed:
            table.update(removed)


def _own_module_names(model: nn.Module) -> set[str]:
    """The Python modules defining the model's classes, libraries' (``_LIBRARIES``) excepted."""
    names = {type(m).__module__ for m in model.modules()} | {c.__module__ for c in type(model).__mro__}
    return {n for n in names if n in sys.modules and n.split(".")[0] not in _LIBRARIES}


@contextlib.contextmanager
def _int_of_sizes(model: nn.Module) -> Iterator[None]:
    """``int``, ``float`` and ``len`` of a traced value in the model's own code (not a library's)
    recorded as calls, as ``torch.fx.wrap("int")`` in each of its modules would: vit-pytorch's PiT
    rebuilds its token grid with ``h=int(sqrt(n))``, which fx refused ("int() argument must be
    ... not 'Proxy'"); a module that defines such a name itself is left alone. Only after a trace
    failed so: while wrapped, ``int`` is no type (``isinstance(k, int)`` would raise)."""
    from torch.fx import _symbolic_trace

    table = getattr(_symbolic_trace, "_wrapped_fns_to_patch", None)  # torch.fx.wrap's table
    added = []
    if isinstance(table, dict):
        for name in sorted(_own_module_names(model)):
            module = sys.modules[name]
            for builtin in _SIZE_BUILTINS:
                key = (id(vars(module)), builtin)
                if builtin not in vars(module) and key not in table:
                    table[key] = vars(module)
                    added.append(key)
    try:
        yield
    finally:
        for key in added:
            table.pop(key, None)


def trace_model(model: nn.Module, example: Tensor | None = None) -> Traced:
    """Trace ``model`` (in eval mode, then restored) into a GraphModule sharing its submodules.

    Python branches on ``self.training`` inside traced-through code are frozen at their eval
    value (e.g. auxiliary heads are dropped); leaf modules (dropout, drop path, batch norm)
    keep following the mode. When tracing fails inside a submodule that holds no resizing op,
    the instances of that module's class that hold none are kept as leaves and tracing is tried
    again (``Traced.notes`` says which); the same happens on every replay, so plans stay valid.

    With ``example`` (an input of the reference size), an ``if`` on traced sizes that fx refused
    in the model's own forward or in a module holding a resizing op is taken as the example
    takes it (``size_branches.py``; one note per branch).

    Raises ``UserInputError`` naming the module or function that could not be traced.
    """
    extra: list[type] = []  # classes whose instances without a resizing op are kept whole
    leaf_ids: set[int] = set()  # those instances
    notes: list[str] = []
    was_training = model.training
    model.eval()
    try:
        builtins_wrapped = numpy_wrapped = branching = False
        while True:
            tracer = BranchingTracer(
                leaf_modules=leaf_module_types(), autowrap_functions=_notrace_functions(),
                autowrap_modules=(math, torchvision.ops, *[m for m in (_einops(),) if m is not None]),
                leaf_ids=leaf_ids, example=example if branching else None, may_fix=lambda m: m is model or _hides_sites(m))
            if hasattr(tracer, "_autowrap_search"):  # private in torch.fx: patch, do not autowrap, these
                tracer._autowrap_search = [*tracer._autowrap_search, *_root_class_modules(model)]
            try:
                with (_traced_into(), _int_of_sizes(model) if builtins_wrapped else contextlib.nullcontext(),
                      numpy_of_sizes(_own_module_names(model)) if numpy_wrapped else contextlib.nullcontext()):
                    graph = _plain_arguments(tracer.trace(model, concrete_args=_default_args(model)), _default_args(model))
                break
            except Exception as err:  # fx raises many types (TraceError, TypeError, RuntimeError...)
                msg = " ".join(str(err).split())[:200]
                if not builtins_wrapped and _SIZE_BUILTIN_REFUSALS.search(msg):
                    builtins_wrapped = True  # only then: wrapped, they are no types (isinstance(k, int))
                    continue
                if not numpy_wrapped and NUMPY_REFUSAL in msg:
                    numpy_wrapped = True  # np.ceil(H / ws) of a traced size: recorded as a call
                    continue
                failing = _failing_module(err, model)
                if (not branching and example is not None and CONTROL_FLOW_REFUSAL in msg
                        and (failing is None or _hides_sites(failing))):
                    branching = True  # only then: a branch taken at one size is a constraint
                    continue
                if failing is None or type(failing) in extra or _hides_sites(failing) or len(extra) >= MAX_AUTO_LEAVES:
                    hint = ("register the module with timm.layers.register_notrace_module or the function with "
                            "register_notrace_function" if failing is not None else
                            "the model's own forward: move code that branches on tensor values or sizes into a "
                            "submodule, which is then kept whole, or into a function registered with "
                            "timm.layers.register_notrace_function")
                    raise UserInputError(
                        f"cannot trace {type(model).__name__} with torch.fx: {_culprit(err)} raised {type(err).__name__}: {msg}"
                        f" ({hint})"
                    ) from err
                extra.append(type(failing))
                # its instances that hold a resizing op stay traced (PyramidNet's blocks branch on
                # their channel counts: the downsampling ones' branches are taken as at the reference)
                leaf_ids.update(id(m) for m in model.modules() if type(m) is type(failing) and not _hides_sites(m))
                notes.append(f"traced {type(failing).__name__} as a leaf: tracing into it failed at {_culprit(err)} "
                             f"({type(err).__name__}: {msg[:100]})")
        if branching:
            notes += [f"traced with a branch on sizes fixed: {b}" for b in tracer.branches]
    finally:
        model.train(was_training)
    name = model.__class__.__name__
    gm = fx.GraphModule(tracer.root, graph, name)
    gm.train(was_training)
    node_names = {node.name: tracer.node_to_qualname.get(node, node.name) for node in graph.nodes}
    for node in gm.graph.nodes:  # kept on the node: the cost model finds a node's modules by it
        node.meta[QUALNAME] = node_names[node.name]
    return Traced(gm, node_names, notes)
