"""Scoring a model on a dataset: per-image loss and correctness (validation and the held-out search)."""
from __future__ import annotations

import contextlib
from typing import Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .outputs import Key, select_logits

__all__ = ["autocast", "score", "val_sample"]


def autocast(device: torch.device, amp: str):
    """bfloat16 autocast on CUDA devices that support it (``amp`` "auto"/"bf16"), else nothing."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return contextlib.nullcontext()
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def score(model: nn.Module, data: Dataset, batch_size: int, workers: int, device: torch.device, amp: str,
          indices: Sequence[int] | None = None, output: Key = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image cross-entropy and correctness (on the CPU) of ``model`` in eval mode over ``data``
    (or its ``indices``), in order; the logits are the output's element ``output`` (None: all of it)."""
    loader = DataLoader(data, batch_size=batch_size, sampler=indices, num_workers=workers)
    model.eval()
    losses, correct = [torch.zeros(0)], [torch.zeros(0, dtype=torch.bool)]
    with torch.no_grad(), autocast(device, amp):
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            logits = select_logits(model(images), output).float()
            losses.append(nn.functional.cross_entropy(logits, labels, reduction="none").cpu())
            correct.append((logits.argmax(1) == labels).cpu())
    return torch.cat(losses), torch.cat(correct)


def val_sample(n: int, limit: int | None, seed: int) -> list[int]:
    """The validation images scored: all ``n``, or a fixed random sample of ``limit`` of them
    (seeded: the same images every epoch and after resuming), in order."""
    if limit is None or limit >= n:
        return list(range(n))
    sample = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:limit]
    return sorted(int(i) for i in sample)
