"""Random augmentation as a pure function of (seed, epoch, sample index).

``SeededSamples`` produces sample i of epoch e under the torch seed derived from (seed, e, i) and
restores the global RNG afterwards. The images a step sees then depend on nothing else: not on worker
processes, not on accelerate's one-batch prefetch, not on the number of training processes, not on
whatever else drew random numbers. That is what makes ``--resume`` reproduce an uninterrupted run
exactly, mid-epoch included, with or without DataLoader workers.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset


class SeededSamples(Dataset):
    """Wraps a dataset; ``set_epoch`` (called by accelerate's data loader) selects the epoch's seeds."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset = dataset
        # shared memory: worker processes (persistent ones included) see the epoch the main process sets
        self._seed_epoch = torch.tensor([seed, 0], dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        self._seed_epoch[1] = epoch

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        seed, epoch = self._seed_epoch.tolist()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(seed, epoch, index))
            return self.dataset[index]


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed from (seed, epoch, index); Python's int-tuple hash is the same in every process."""
    return hash((seed, epoch, index)) & (2**63 - 1)
