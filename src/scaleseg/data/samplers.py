"""Samplers whose position in the stream is part of the training state, so resumes are exact."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler


class ResumableSampler(Sampler):
    """Endless stream of (dataset index, position) pairs, starting at position `start`.

    Position p belongs to epoch p // n and takes slot p % n of that epoch's permutation, which is
    drawn from (seed, epoch) alone; so the stream from any position is the same whether the run
    started there or got there. The position also seeds the sample's augmentation.
    """

    def __init__(self, length: int, seed: int = 0, shuffle: bool = True, start: int = 0) -> None:
        if length <= 0:
            raise ValueError("ResumableSampler needs a non-empty dataset")
        self.length = length
        self.seed = seed
        self.shuffle = shuffle
        self.start = start

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.length)
        return np.random.default_rng([self.seed, epoch]).permutation(self.length)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        position = self.start
        epoch = position // self.length
        order = self._order(epoch)
        while True:
            if position // self.length != epoch:
                epoch = position // self.length
                order = self._order(epoch)
            yield int(order[position % self.length]), position
            position += 1

    def __len__(self) -> int:  # endless; DataLoader only uses this for warnings
        return 2**62
