"""Head replacement: fine-tune a model trained on other classes (a 1000-class ImageNet model on a
4-class dataset) by replacing its classifier, as timm's ``reset_classifier`` does.

The converted model is an fx GraphModule (timm's ``reset_classifier`` is gone), so the
classifier is found by name: timm's ``pretrained_cfg['classifier']`` for timm sources (every one
of them where it names several: distillation heads; an ``nn.Identity`` there, a model built
without one, gets a ``Linear`` from its features), the last ``nn.Linear`` (else 1x1
convolution) for torchvision and ``module:factory`` ones (the latter, and the empty slot, only
where the source built with the new ``num_classes`` has that layer: checked on the meta
device). It becomes a fresh layer of the same kind with the new class count, and the
checkpoint's ``build_args['num_classes']`` follows, so that loading rebuilds the model with the
new head. timm's own ``Linear`` (MobileNetV3, GhostNet, LCNet, ...) is traced
through, not kept as a module: the graph reads its ``weight`` and ``bias`` by name
(``F.linear``), so those two parameters are replaced in place instead.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..errors import UserInputError
from .outputs import AUTO, Key, describe, pick_classes, resolve_output

__all__ = ["model_classes", "classifier_paths", "replace_classifier", "adapt_head", "check_classifier"]


def _probe(model: nn.Module, input_size: tuple[int, int, int], device) -> object:
    """The model's output on one zero input, in eval mode."""
    was = model.training
    model.eval()
    with torch.no_grad():
        out = model(torch.zeros(1, *input_size, device=device))
    model.train(was)
    return out


def model_classes(model: nn.Module, input_size: tuple[int, int, int], device, output: str = AUTO,
                  prefer: tuple[int, ...] = ()) -> int | None:
    """The class count the model outputs (the last dim of its logits, chosen by ``output``: see
    ``outputs.pick_classes``) on one input, None if not N x classes."""
    return pick_classes(_probe(model, input_size, device), output, prefer)


def classifier_paths(model: nn.Module, source: str) -> list[str]:
    """The qualified names of the classifier layers: timm's configured one, or all of its several
    (a distilled model's ``head`` and ``head_dist``, EfficientViM's per-stage ``heads``: the model
    averages or weighs their outputs); else the last Linear (else the last 1x1 convolution).
    Empty where there is none to replace."""
    names = dict(model.named_modules())
    if source.startswith("timm:"):
        import timm

        cfg = timm.models.get_pretrained_cfg(source[5:])
        wanted = getattr(cfg, "classifier", None) if cfg is not None else None
        several = list(wanted) if isinstance(wanted, (tuple, list)) else [wanted]
        if all(isinstance(w, str) and (_replaceable(names.get(w)) or _absent(names.get(w))) for w in several):
            return several  # nn.Identity where built without one (num_classes=0: MIM/self-supervised weights)
        if any(isinstance(w, str) and w in names for w in several):
            return []
    linears = [name for name, m in names.items() if isinstance(m, nn.Linear)]
    if linears:
        return linears[-1:]
    # a fully convolutional classifier (SqueezeNet: a 1x1 conv, then global pooling)
    pointwise = [name for name, m in names.items() if isinstance(m, nn.Conv2d)
                 and tuple(m.kernel_size) == (1, 1) and m.groups == 1]
    return pointwise[-1:]


def _absent(layer: nn.Module | None) -> bool:
    """timm's classifier slot of a model built with ``num_classes=0``."""
    return type(layer) is nn.Identity


def _replaceable(layer: nn.Module | None) -> bool:
    return isinstance(layer, (nn.Linear, nn.Conv2d)) or _traced_linear(layer)


def _traced_linear(layer: nn.Module | None) -> bool:
    """A traced-through linear layer: a bare module holding a 2-d ``weight`` (and a ``bias``)."""
    weight = getattr(layer, "weight", None)
    return (layer is not None and type(layer) is nn.Module and isinstance(weight, nn.Parameter) and weight.dim() == 2
            and not [n for n, _ in layer.named_children()])


def _fresh(layer: nn.Module, num_classes: int) -> nn.Module:
    if isinstance(layer, nn.Linear):
        new: nn.Module = nn.Linear(layer.in_features, num_classes, bias=layer.bias is not None)
    elif isinstance(layer, nn.Conv2d) and tuple(layer.kernel_size) == (1, 1) and layer.groups == 1:
        new = nn.Conv2d(layer.in_channels, num_classes, 1, bias=layer.bias is not None)
    else:
        raise UserInputError(f"the classifier is a {type(layer).__name__}, which dynopool does not replace")
    return new.to(device=layer.weight.device, dtype=layer.weight.dtype)


def replace_classifier(model: nn.Module, source: str, num_classes: int, features: int | None = None) -> str:
    """Swap every classifier layer of ``model`` (``classifier_paths``) for a fresh one with
    ``num_classes`` outputs (where built without one, a ``Linear`` from its ``features``
    outputs); their paths, comma-separated."""
    paths = classifier_paths(model, source)
    if not paths:
        raise UserInputError(
            f"cannot replace the classifier of {source!r} (no timm classifier or torchvision Linear found): "
            f"convert it with num_classes={num_classes}"
        )
    for path in paths:
        _replace_one(model, path, num_classes, features)
    return ", ".join(paths)


def _replace_one(model: nn.Module, path: str, num_classes: int, features: int | None) -> None:
    parent_name, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    layer = getattr(parent, attr)
    if _absent(layer):
        if features is None:
            raise UserInputError(f"{path!r} is no classifier (an nn.Identity)")
        like = next(model.parameters())
        setattr(parent, attr, nn.Linear(features, num_classes).to(device=like.device, dtype=like.dtype))
    elif _traced_linear(layer):
        bias = getattr(layer, "bias", None)
        new = nn.Linear(layer.weight.shape[1], num_classes, bias=bias is not None).to(
            device=layer.weight.device, dtype=layer.weight.dtype)
        layer.weight = new.weight
        if bias is not None:
            layer.bias = new.bias
    else:
        setattr(parent, attr, _fresh(layer, num_classes))


def adapt_head(model: nn.Module, bundle, data_classes: int, wanted: int | None, device,
               say: Callable[[str], None], output: str = AUTO) -> int | None:
    """Give ``model`` ``data_classes`` outputs (``wanted``, when given, must agree with the data):
    replace its classifier if its class count differs, say so in one line, and make the bundle's
    ``build_args`` rebuild that head. Returns the class count it had when replaced (0: it had
    none), else None."""
    if wanted is not None and wanted != data_classes:
        raise UserInputError(f"--num-classes {wanted} but the data has {data_classes} classes")
    paths = classifier_paths(model, bundle.source)
    names = dict(model.named_modules())
    # of several 2-D outputs, the data's width, else the classifier's (an embedding may come first)
    prefer = (data_classes, *[io[1] for p in paths if (io := _io(names.get(p))) is not None][:1])
    have = model_classes(model, bundle.input_size, device, output, prefer)
    if have is None or have == data_classes:
        return None
    # built without a classifier (an nn.Identity where timm names it): it outputs its features
    features = have if any(_absent(names.get(p)) for p in paths) else None
    if features is not None or not bundle.source.startswith(("timm:", "torchvision:")):
        # a slot timm leaves empty, or a module:factory source: what num_classes rebuilds is not known
        _check_rebuild(model, bundle, paths, data_classes, have, features)
    path = replace_classifier(model, bundle.source, data_classes, features)
    try:
        now = model_classes(model, bundle.input_size, device, output, (data_classes,))
    except RuntimeError:
        now = None
    if now != data_classes:
        raise UserInputError(f"replacing {path!r} did not give {data_classes} outputs: convert the model with "
                             f"num_classes={data_classes}")
    bundle.build_args = {**(bundle.build_args or {}), "num_classes": data_classes}
    if features is not None:
        say(f"head: the model was built without a classifier (it outputs {features} features): {path} added, "
            f"{features} -> {data_classes} classes, fresh weights")
        return 0
    say(f"head: {path} replaced ({have} -> {data_classes} classes, fresh weights)")
    return have


def _io(layer: nn.Module | None) -> tuple[int, int] | None:
    """(inputs, outputs) of a classifier layer: a Linear, a 1x1 conv or a traced-through linear."""
    if isinstance(layer, (nn.Linear, nn.Conv2d)) or _traced_linear(layer):
        return int(layer.weight.shape[1]), int(layer.weight.shape[0])
    return None


def _check_rebuild(model: nn.Module, bundle, paths: list[str], classes: int, have: int, features: int | None) -> None:
    """Where what ``num_classes`` rebuilds is not known (a timm model built without a classifier, a
    ``module:factory`` source), the model built with ``num_classes=classes`` (as its checkpoint is
    loaded; on the meta device: no weights) must hold, at each classifier path, a layer of this
    one's inputs (``features`` where the slot is empty) with ``classes`` outputs."""
    from . import upstream

    source = bundle.source
    names = dict(model.named_modules())
    wanted = {p: features if features is not None else (_io(names.get(p)) or (None,))[0] for p in paths}
    try:
        with torch.device("meta"):
            rebuilt = dict(upstream.build_model(source, {**(bundle.build_args or {}), "num_classes": classes})
                           .named_modules())
    except Exception:  # noqa: BLE001 - a factory without num_classes, or one that cannot build on meta
        rebuilt = {}
    if paths and all(n is not None and _io(rebuilt.get(p)) == (n, classes) for p, n in wanted.items()):
        return
    where = "was built without a classifier" if features is not None else f"outputs {have} classes"
    raise UserInputError(
        f"the model {where} but the data has {classes} classes, and {source!r} with num_classes={classes} does not "
        f"build this model with a {classes}-class classifier in place of its last layer: convert it with "
        f"--build-arg num_classes={classes}")


def check_classifier(model: nn.Module, input_size: tuple[int, int, int], device, num_classes: int,
                     output: str = AUTO, say: Callable[[str], None] | None = None) -> Key:
    """UserInputError unless ``model`` outputs ``N x num_classes`` logits (fine-tuning trains
    classifiers), alone or as the element of a tuple/list/dict output that ``output`` selects.
    Returns that element's key (None: the output itself); ``say`` is told which element it is."""
    out = _probe(model, input_size, device)
    if isinstance(out, (tuple, list, dict)):
        key, line = resolve_output(out, output, num_classes)
        if say is not None and line:
            say(line)
        return key
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise UserInputError(
            f"dynopool finetune trains image classifiers (outputs N x classes); this model outputs {describe(out)}: "
            f"convert a model whose forward returns the logits alone (a factory that wraps yours), or "
            f"train it in your own loop with dynopool_convert's CostModel, budget_penalty and project_to_budget "
            f"(README, 'Compute budget')"
        )
    resolve_output(out, output, num_classes)  # refuses an --output on a plain tensor
    if out.shape[1] != num_classes:
        raise UserInputError(
            f"the model outputs shape {tuple(out.shape)} but the data has {num_classes} classes: "
            f"convert the model with num_classes={num_classes} (and its input channels = {input_size[0]})"
        )
    return None
