"""Getting the model in and out: load / convert-first / resume, budget-checked saving."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..dynopool import scale_parameters
from ..errors import UserInputError
from . import upstream
from .recipes import FinetuneConfig

__all__ = ["ModelBundle", "load_model", "project_copy", "save_model", "restore_raw_strides", "as_float32", "LAST", "BEST", "CONVERTED"]

LAST, BEST, CONVERTED = "last.pt", "best.pt", "converted.pt"


@dataclass
class ModelBundle:
    """A model with what its checkpoint says about it."""

    model: nn.Module
    plan: Any
    source: str
    build_args: dict | None
    input_size: tuple[int, int, int]
    budget: int | None
    training: dict | None
    extra: dict | None


def _from_checkpoint(path: Path, trust_source: bool) -> ModelBundle:
    ck = upstream.load_checkpoint(path, trust_source=trust_source)
    return ModelBundle(ck.model, ck.plan, ck.source, ck.build_args, tuple(int(v) for v in ck.input_size),
                       ck.budget, ck.training, ck.extra)


def _convert_first(cfg: FinetuneConfig, num_classes: int, budget: int | str | None) -> ModelBundle:
    """Build ``cfg.model`` and convert it with ``cfg.convert`` (then fit it to the budget)."""
    source = upstream.resolve_source(cfg.model)
    build_args = dict(cfg.build_args)
    if source.startswith(("timm:", "torchvision:", "dynopool_convert.")) and not (cfg.weights or cfg.pretrained):
        build_args.setdefault("num_classes", num_classes)  # with weights: their head, replaced if need be
    if cfg.input_size and len(cfg.input_size) != 3:
        raise UserInputError(f"recipe key 'input_size' must be [C, H, W], got {cfg.input_size}")
    policy = {k: v for k, v in vars(cfg.convert).items() if v is not None}
    done = upstream.convert_source(source, build_args, input_size=cfg.input_size or None, weights=cfg.weights,
                                   pretrained=cfg.pretrained, budget=budget, keep_fit=True, **policy)
    return ModelBundle(done.model, done.plan, source, done.build_args, done.input_size, done.budget, None, done.extra)


def load_model(cfg: FinetuneConfig, checkpoint: str | Path | None, out_dir: Path, resume: bool,
               num_classes: int, budget: int | str | None, trust_source: bool = False) -> tuple[ModelBundle, bool]:
    """The model to train and whether it was converted here (to be saved as ``converted.pt``).

    ``budget`` (FLOPs, or a share of the original's such as ``0.7x``; None: the checkpoint's)
    becomes ``bundle.budget``, read against the original FLOPs the checkpoint records."""
    if budget is not None and (resume or checkpoint is not None):
        bundle, converted_here = load_model(cfg, checkpoint, out_dir, resume, num_classes, None, trust_source)
        bundle.budget = upstream.parse_budget(budget, upstream.original_flops(bundle.extra))
        return bundle, converted_here
    if resume:
        last = out_dir / LAST
        if not last.is_file():
            raise UserInputError(f"--resume: {last} does not exist (nothing to resume)")
        bundle = _from_checkpoint(last, trust_source)
        if not bundle.training:
            raise UserInputError(f"--resume: {last} holds no training state")
        restore_raw_strides(bundle.model, bundle.training)
        return bundle, False
    if checkpoint is not None:
        return _from_checkpoint(Path(checkpoint), trust_source), False
    if cfg.model:
        return _convert_first(cfg, num_classes, budget), True
    raise UserInputError("give a CHECKPOINT (from 'dynopool convert') or a recipe that names a model")


def restore_raw_strides(model: nn.Module, training: dict) -> None:
    """Put back the strides as they were in training (the saved weights are budget-projected)."""
    raw = training.get("raw_strides")
    params = scale_parameters(model)
    if raw is None or len(raw) != len(params):
        raise UserInputError("the checkpoint's training state does not match its model's scale parameters")
    with torch.no_grad():
        for p, value in zip(params, raw):
            p.copy_(value)


def project_copy(model: nn.Module, budget: int | None, input_size) -> tuple[nn.Module, int, dict | None]:
    """A copy of ``model`` projected into ``budget``, with its fvcore FLOPs checked (not assumed)."""
    projected = copy.deepcopy(model)
    info = None
    if budget is not None:
        info = upstream.project_to_budget(projected, budget, input_size).as_dict()
    flops = int(upstream.count_flops(projected, input_size))
    if budget is not None and flops > budget:
        raise RuntimeError(f"budget projection failed: {flops} FLOPs > budget {budget} (a bug, please report)")
    return projected, flops, info


def save_model(path: Path, bundle: ModelBundle, model: nn.Module, training: dict | None, extra: dict | None) -> Path:
    """Atomically write ``model`` with the bundle's source/plan/budget (checkpoint contract)."""
    return upstream.save_checkpoint(
        path, model, bundle.plan, bundle.source, build_args=bundle.build_args, input_size=bundle.input_size,
        budget=bundle.budget, training=training, extra=extra,
    )


def as_float32(model: nn.Module) -> str:
    """Cast ``model`` to float32 in place where some weights are in another floating dtype (a
    model built in half precision: optimiser steps in float16 lose small updates, and its
    weights would meet float32 images); a note saying so, or "" when all were float32."""
    low = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()
                  if p.is_floating_point() and p.dtype != torch.float32})
    if not low:
        return ""
    model.float()
    return (f"the model's weights are {', '.join(low)}: fine-tuned and saved in float32 "
            "(train.amp runs bfloat16 autocast on CUDA)")
