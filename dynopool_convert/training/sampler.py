"""A resumable, rank-aware shuffling sampler: the order depends only on (seed, epoch)."""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler

__all__ = ["EpochSampler"]


class EpochSampler(Sampler[int]):
    """Shuffles ``n`` indices with a generator seeded by ``seed + epoch`` and deals them to ranks.

    Like ``DistributedSampler`` (pads to a multiple of ``world`` by repeating), plus ``start``:
    skip the first ``start`` indices of this rank's share, to resume in the middle of an epoch.
    """

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1, shuffle: bool = True) -> None:
        self.n, self.seed, self.rank, self.world, self.shuffle = n, seed, rank, world, shuffle
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def per_rank(self) -> int:
        """Indices each rank gets per epoch (before ``start``)."""
        return -(-self.n // self.world)

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        total = self.per_rank() * self.world
        order += order[: total - len(order)]
        return iter(order[self.rank : total : self.world][self.start :])

    def __len__(self) -> int:
        return self.per_rank() - self.start
