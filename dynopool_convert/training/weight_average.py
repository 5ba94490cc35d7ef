"""An exponential moving average of the weights (``train.model_ema``), strides left out.

timm's ``ModelEmaV3`` keeps the average (its lerp, its warm-up rule for the decay); what is
ours is which tensors count. The DynOPool strides are not averaged: the sizes of the saved
model are the ones it trained at last (a stride halfway between two sizes would give a size
neither was trained at), and the budget projection of the saved copy reads the live strides.
So the averaged weights are loaded into the budget-projected copy that is evaluated and saved,
and never into the model being trained.
"""
from __future__ import annotations

import torch
from torch import nn

from ..dynopool import scale_parameters

__all__ = ["WeightAverage"]


class WeightAverage:
    """The average of ``model``'s floating-point parameters and buffers but its strides."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        from timm.utils import ModelEmaV3

        # warm-up: the decay grows as 1 - (1 + step)^(-2/3) up to ``decay``, so that a short
        # fine-tuning run averages its own steps instead of staying at the starting weights
        self.ema = ModelEmaV3(model, decay=decay, use_warmup=True)
        scale_ids = {id(p) for p in scale_parameters(model)}
        self.strides = {name for name, p in model.named_parameters(remove_duplicate=False) if id(p) in scale_ids}

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Fold ``model``'s weights after optimiser step ``step`` (1-based) into the average."""
        self.ema.update(model, step=step)

    def _weights(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {k: v for k, v in model.state_dict().items() if k not in self.strides and v.is_floating_point()}

    @torch.no_grad()
    def load_into(self, copy: nn.Module) -> nn.Module:
        """Put the averaged weights into ``copy`` (a copy of the trained model, strides kept)."""
        averaged = self.ema.module.state_dict()
        for name, value in self._weights(copy).items():
            value.copy_(averaged[name])
        return copy

    def state(self, model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
        """For the training state: the average, and ``model``'s own weights (the saved model holds
        the average, so a resumed run needs the trained weights from here)."""
        cpu = lambda sd: {k: v.detach().cpu().clone() for k, v in sd.items()}  # noqa: E731
        return {"average": cpu(self.ema.module.state_dict()), "trained": cpu(self._weights(model))}

    @torch.no_grad()
    def restore(self, model: nn.Module, state: dict[str, dict[str, torch.Tensor]]) -> None:
        """Undo :meth:`state`: the average back in place, the trained weights back into ``model``."""
        self.ema.module.load_state_dict(state["average"])
        for name, value in self._weights(model).items():
            value.copy_(state["trained"][name])
