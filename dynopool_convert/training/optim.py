"""Parameter groups, optimiser and scheduler (timm's factories), and the task loss."""
from __future__ import annotations

from torch import nn

from ..dynopool import scale_parameters
from ..errors import UserInputError
from .recipes import TrainConfig

__all__ = ["param_groups", "build_optimizer", "build_scheduler", "GROUP_NAMES"]

GROUP_NAMES = ("weights", "no_decay", "scales")


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """Three groups: weights (decayed), biases/norms (no decay), DynOPool strides (own lr, no decay;
    left out when ``scale_lr`` is 0, so that no warm-up or schedule moves them)."""
    scales = scale_parameters(model)
    scale_ids = {id(p) for p in scales}
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad or id(p) in scale_ids:
            continue
        (decay if p.ndim > 1 else no_decay).append(p)
    groups = [
        {"name": "weights", "params": decay, "weight_decay": cfg.weight_decay, "lr": cfg.lr},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0, "lr": cfg.lr},
        {"name": "scales", "params": scales, "weight_decay": 0.0, "lr": cfg.scale_lr},
    ]
    if cfg.scale_lr <= 0:
        groups.pop()
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: TrainConfig):
    """timm's ``create_optimizer_v2`` over :func:`param_groups`."""
    from timm.optim import create_optimizer_v2

    try:
        return create_optimizer_v2(param_groups(model, cfg), opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                   momentum=cfg.momentum)
    except ValueError as err:  # timm: "Optimizer X not found in registry", invalid values
        raise UserInputError(f"train.opt {cfg.opt!r}: {' '.join(str(err).split())} (any timm.optim name, e.g. sgd, adamw)") from err


def build_scheduler(optimizer, cfg: TrainConfig, total_steps: int):
    """timm's ``create_scheduler_v2`` scheduled per optimiser step (``step_update(step)``)."""
    from timm.scheduler import create_scheduler_v2

    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, round(0.05 * total_steps))
    try:
        scheduler, _ = create_scheduler_v2(
            optimizer, sched=cfg.sched, num_epochs=total_steps, warmup_epochs=min(warmup, max(0, total_steps - 1)),
            warmup_lr=cfg.warmup_lr, min_lr=cfg.min_lr, step_on_epochs=False, updates_per_epoch=1,
        )
    except ValueError as err:  # timm: "Unknown scheduler 'X'."
        raise UserInputError(f"train.sched {cfg.sched!r}: {' '.join(str(err).split())} (e.g. cosine, step, poly, tanh)") from err
    return scheduler
