"""Hand-made stand-ins for the report tests: a tiny converted network and its plan dict.

The network is what the conversion pass would produce from

    stem.conv   conv3x3 s2            -> DynOPool (group 0) + conv3x3 s1   (placement before)
    body        conv3x3 s1
    pool        max_pool 2x2 s2       -> DynOPool(max) (group 1)
    block.conv1 conv3x3 s2  \\ tied     -> DynOPool (group 2) + conv3x3 s1
    block.down  conv1x1 s2  / (add)    -> DynOPool (group 2, shared stride) + conv1x1 s1
    se          squeeze-excitation gate (broadcast multiply: does not tie, does not widen)
    late.conv   conv3x3 s2            reverted (kept as it is)
    head        global average pool, linear
"""
from __future__ import annotations

import torch
from torch import nn

from dynopool_convert import DynOPool


class TinyConverted(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem_pool = DynOPool(2.0, group=0)
        self.stem_conv = nn.Conv2d(3, 8, 3, 1, 1)
        self.body = nn.Conv2d(8, 8, 3, 1, 1)
        self.pool = DynOPool(2.0, "max", group=1)
        shared = nn.Parameter(torch.tensor([2.0, 2.0]))
        self.block_conv1_pool = DynOPool(shared, group=2)
        self.block_conv1 = nn.Conv2d(8, 16, 3, 1, 1)
        self.block_down_pool = DynOPool(shared, group=2)
        self.block_down = nn.Conv2d(8, 16, 1, 1, 0)
        self.se_pool = nn.AdaptiveAvgPool2d(1)
        self.se_fc = nn.Conv2d(16, 16, 1)
        self.late_conv = nn.Conv2d(16, 16, 3, 2, 1)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem_conv(self.stem_pool(x))
        x = torch.relu(self.body(x))
        x = self.pool(x)
        x = self.block_conv1(self.block_conv1_pool(x)) + self.block_down(self.block_down_pool(x))
        x = x * torch.sigmoid(self.se_fc(self.se_pool(x)))
        x = self.late_conv(x)
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def tiny_plan(size: int = 32) -> dict:
    """Plan dict shaped like ``Plan.to_dict()`` for ``TinyConverted`` at ``size`` x ``size``."""
    def site(name, op, kind, group, io, status="converted", reason=None, module=None, stride=2.0):
        entry = {
            "name": name, "op": op, "kind": kind, "status": status, "reason": reason, "group": group,
            "placement": "before" if kind == "conv" else None, "stride_init": [stride, stride],
            "input_size": [io[0], io[0]], "output_size": [io[1], io[1]],
        }
        if module:
            entry["module"] = module
        return entry

    s = size
    return {
        "input_size": [3, s, s],
        "sites": [
            site("stem.conv", "Conv2d(3, 8, k=3, s=2)", "conv", 0, (s, s // 2), module="stem_pool"),
            site("pool", "max_pool2d(k=2, s=2)", "pool", 1, (s // 2, s // 4)),
            site("block.conv1", "Conv2d(8, 16, k=3, s=2)", "conv", 2, (s // 4, s // 8), module="block_conv1_pool"),
            site("block.down", "Conv2d(8, 16, k=1, s=2)", "conv", 2, (s // 4, s // 8)),
            site("late_conv", "Conv2d(16, 16, k=3, s=2)", "conv", None, (s // 8, s // 16),
                 status="reverted", reason="validation: output shape changed at perturbed strides"),
        ],
        "groups": [
            {"id": 0, "sites": ["stem.conv"]},
            {"id": 1, "sites": ["pool"]},
            {"id": 2, "sites": ["block.conv1", "block.down"]},
        ],
        "policy": {"placement": "before", "aggregate": None, "include": None, "exclude": None},
        "notes": ["block.conv1 and block.down tied: joined by add"],
    }


def tiny_training() -> dict:
    """A ``training`` dict laid out as the finetune helper saves it: state, ``progress`` (with
    one ``history`` row per epoch, ``r`` as a list in ``scale_parameters`` order), config."""
    history = []
    for epoch in range(4):
        history.append({
            "kind": "epoch", "epoch": epoch, "step": 100 * (epoch + 1),
            "train_loss": 2.0 - 0.1 * epoch, "train_acc": 0.2 + 0.05 * epoch,
            "val_loss": 2.1 - 0.1 * epoch, "val_acc": 0.30 + 0.05 * epoch - (0.07 if epoch == 3 else 0.0),
            "flops": 100000 - 1000 * epoch, "budget": 100000,
            "r": [[0.5 + 0.02 * epoch, 0.5 - 0.03 * epoch], [0.5, 0.5 + 0.05 * epoch], [0.5, 0.5]],
            "lr": {"weights": 0.01, "scales": 0.001}, "time_s": 1.5,
        })
    return {
        "optimizer": {"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": []},
        "scheduler": {"last_epoch": 4},
        "rng": {"torch": torch.zeros(16, dtype=torch.uint8)},
        "progress": {"epoch": 4, "step": 400, "step_in_epoch": 0, "best_metric": 0.40, "best_epoch": 2,
                     "history": history, "epoch_sums": [0.0, 0.0, 0.0]},
        "raw_strides": [torch.tensor([2.0, 2.0])] * 3,
        "config": {"epochs": 4, "lr": 0.01},
        "world_size": 1,
        "total_steps": 400,
    }
