"""TEMPORARY stand-ins for the conversion, checkpoint and budget modules of other helpers.

Used by :mod:`.upstream` only while ``dynopool_convert.{checkpoint,convert,models,flops,budget,
cost_model}`` are missing (not merged yet); ``upstream.STANDINS_IN_USE`` names the pieces in use
and the CLI prints a warning. Deliberately minimal:
- convert: swaps ``nn.MaxPool2d`` modules with stride > 1 for DynOPool (no fx, no tying);
- cost model: conv FLOPs at continuous sizes ``H*W / prod(s_h*s_w)`` over the stride parameters
  applied before the conv in execution order (right for chains, up to rounding);
- count_flops: Conv2d/Linear multiply-adds at the rounded sizes (fvcore's convention for them);
- project_to_budget: raises all strides by a common factor until fvcore's count fits.
Delete this file once the real modules are on main.
"""
from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..dynopool import DynOPool, clamp_strides_, dynopool_modules, scale_parameters
from ..errors import UserInputError

FORMAT_VERSION = 0


# ----------------------------------------------------------------------------- models / convert

def resolve_source(name: str) -> str:
    if ":" in name:
        return name
    return f"timm:{name}"


def build_model(source: str, build_args: dict | None = None) -> nn.Module:
    kind, _, name = source.partition(":")
    args = dict(build_args or {})
    if kind == "timm":
        import timm

        return timm.create_model(name, pretrained=False, **args)
    if kind == "torchvision":
        import torchvision

        return torchvision.models.get_model(name, weights=None, **args)
    try:
        factory = getattr(importlib.import_module(kind), name)
    except (ImportError, AttributeError) as err:
        raise UserInputError(f"cannot import model source {source!r}: {err}") from err
    return factory(**args)


def convert(model: nn.Module, input_size=(3, 224, 224), **_: Any):
    """Swap stride>1 MaxPool2d for DynOPool(max); plan = the swapped module names."""
    sites = [name for name, m in model.named_modules() if isinstance(m, nn.MaxPool2d) and _stride(m) > 1]
    model = apply_plan(model, {"sites": [{"name": n, "stride": _stride(model.get_submodule(n))} for n in sites]})
    return _Result(model, {"sites": [{"name": n, "stride": 2.0} for n in sites], "standin": True})


def apply_plan(model: nn.Module, plan: dict) -> nn.Module:
    for i, site in enumerate(plan["sites"]):
        parent, _, leaf = site["name"].rpartition(".")
        old = model.get_submodule(site["name"])
        stride = site.get("stride", _stride(old))
        setattr(model.get_submodule(parent) if parent else model, leaf, DynOPool(float(stride), "max", group=i))
    return model


def _stride(m: nn.MaxPool2d) -> int:
    s = m.stride if m.stride is not None else m.kernel_size
    return int(s if isinstance(s, int) else s[0])


@dataclass
class _Result:
    model: nn.Module
    plan: dict


# ----------------------------------------------------------------------------- checkpoint

@dataclass
class Checkpoint:
    model: nn.Module
    plan: Any
    source: str
    build_args: dict | None
    input_size: tuple[int, int, int]
    budget: int | None
    training: dict | None
    extra: dict | None
    format_version: int = FORMAT_VERSION


def save_checkpoint(path, model, plan, source, build_args=None, input_size=(3, 224, 224), budget=None,
                    training=None, extra=None) -> Path:
    import os
    import tempfile

    path = Path(path)
    payload = {
        "format_version": FORMAT_VERSION, "source": source, "build_args": build_args, "plan": plan,
        "input_size": list(input_size), "budget": budget, "state_dict": model.state_dict(),
        "training": training, "extra": extra,
    }
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path, trust_source: bool = False) -> Checkpoint:
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"checkpoint not found: {path}")
    data = torch.load(path, map_location="cpu", weights_only=True)
    model = apply_plan(build_model(data["source"], data["build_args"]), data["plan"])
    model.load_state_dict(data["state_dict"], strict=True)
    return Checkpoint(model, data["plan"], data["source"], data["build_args"], tuple(data["input_size"]),
                      data["budget"], data["training"], data["extra"], data["format_version"])


# ----------------------------------------------------------------------------- budget

def parse_budget(text: str | int | float) -> int:
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgt]?)(?:flops)?\s*", str(text), re.I)
    if not m:
        raise UserInputError(f"bad budget {text!r}: use e.g. 4G, 500M, 4.1e9")
    scale = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


def count_flops(model: nn.Module, input_size) -> int:
    """Conv2d + Linear multiply-adds at the actual (rounded) sizes, fvcore's convention for them."""
    total = [0]

    def hook(mod, inp, out):
        if isinstance(mod, nn.Conv2d):
            total[0] += out[0].numel() * mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]
        else:
            total[0] += mod.in_features * mod.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_size, device=next(model.parameters()).device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return int(total[0])


class CostModel:
    """Differentiable FLOPs at the current strides, a pure function of them (continuous sizes).

    Each conv costs ``k * H * W / prod(s_h * s_w of the strides applied before it) / d``, with
    ``d`` the power of two of any other downsampling before it (found at construction).
    """

    def __init__(self, model: nn.Module, input_size) -> None:
        import math

        self.terms: list[tuple[float, list[nn.Parameter]]] = []
        self.constant = 0.0
        applied: dict[int, nn.Parameter] = {}
        area = float(input_size[1] * input_size[2])

        def pool_hook(mod, inp, out):
            applied.setdefault(id(mod.stride), mod.stride)

        def conv_hook(mod, inp, out):
            if isinstance(mod, nn.Conv2d):
                k = mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1] * mod.out_channels
                pools = list(applied.values())
                s_area = math.prod(float(p[0] * p[1]) for p in pools)
                ratio = area / s_area / (out.shape[2] * out.shape[3])
                d = 2.0 ** round(math.log2(ratio)) if ratio > 0 else 1.0
                self.terms.append((k * area / d, pools))
            else:
                self.constant += float(mod.in_features * mod.out_features)

        handles = [m.register_forward_hook(pool_hook) for _, m in dynopool_modules(model)]
        handles += [m.register_forward_hook(conv_hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                model(torch.zeros(1, *input_size, device=next(model.parameters()).device))
        finally:
            model.train(was_training)
            for h in handles:
                h.remove()

    def __call__(self) -> Tensor:
        total = torch.tensor(self.constant)
        for flops, pools in self.terms:
            scale = torch.tensor(1.0)
            for param in pools:
                scale = scale / (param[0] * param[1]).cpu()
            total = total + flops * scale
        return total


def budget_penalty(flops: Tensor, budget: float) -> Tensor:
    return torch.relu(flops / float(budget) - 1.0) ** 2


@torch.no_grad()
def project_to_budget(model: nn.Module, budget: int, input_size) -> dict:
    before = count_flops(model, input_size)
    flops, factor = before, 1.0
    for _ in range(200):
        if flops <= budget:
            return {"flops_before": before, "flops_after": flops, "factor": factor}
        for p in scale_parameters(model):
            p.mul_(1.02)
        factor *= 1.02
        clamp_strides_(model)
        flops = count_flops(model, input_size)
    raise UserInputError(f"cannot fit the model into {budget} FLOPs (still {flops})")
