"""Data loaders shared by every task.

Training: a DistributedSampler shards the shuffled dataset across processes (same seed on every
rank, `set_epoch` each epoch). Evaluation: each rank takes every world-th sample with no padding,
so every validation sample is counted exactly once when the per-rank sums are reduced.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from train.errors import ConfigError


def seeded_split(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, validation) indices of n samples from a seeded permutation: the same split in
    every process and every run with this seed; each side keeps at least one sample."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = min(max(1, round(n * val_fraction)), n - 1)
    return sorted(order[n_val:]), sorted(order[:n_val])


class ShardSampler(Sampler[int]):
    """Indices rank, rank + world, ... : disjoint across ranks, complete, no duplicates."""

    def __init__(self, dataset_len: int, num_replicas: int, rank: int):
        self.indices = range(rank, dataset_len, num_replicas)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class ResumableDistributedSampler(DistributedSampler):
    """DistributedSampler whose data order is defined by the global sample index, so a run can
    resume part-way into an epoch, even on a different number of processes.

    Each epoch is one permutation of the dataset (seed + epoch), the same on every rank; rank r
    takes positions r, r + world, ... of it. After k batches per rank, exactly the first
    k * batch_size * world positions are consumed, whatever the rank count was.
    """

    skip = 0  # global positions of the current epoch's permutation already consumed

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        super().set_epoch(epoch)
        self.skip = skip

    def _epoch_order(self) -> list[int]:
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)  # the same order DistributedSampler uses
        return torch.randperm(len(self.dataset), generator=generator).tolist()

    def _remaining(self) -> list[int]:
        rest = self._epoch_order()[: self.total_size][self.skip:]
        return rest[: len(rest) - len(rest) % self.num_replicas]  # equal shares: no rank waits

    def __iter__(self) -> Iterator[int]:
        return iter(self._remaining()[self.rank::self.num_replicas])

    def __len__(self) -> int:
        return len(self._remaining()) // self.num_replicas


class LengthGroupedSampler(ResumableDistributedSampler):
    """Cuts padding: within each window of `window` consecutive positions of the epoch's
    permutation, samples are sorted by length, so a batch (consecutive positions, dealt
    round-robin to the ranks) holds similar lengths. The windows stay in random order, and the
    order does not depend on the number of processes, so resuming stays exact on any world size.
    """

    def __init__(self, dataset: Dataset, lengths: list[int], window: int, **kwargs):
        super().__init__(dataset, **kwargs)
        if len(lengths) != len(dataset):
            raise ValueError(f"{len(lengths)} lengths for {len(dataset)} samples")
        self.lengths, self.window = lengths, window

    def _epoch_order(self) -> list[int]:
        order = super()._epoch_order()
        return [i for start in range(0, len(order), self.window)
                for i in sorted(order[start:start + self.window], key=self.lengths.__getitem__)]


def train_loader(dataset: Dataset, batch_size: int, num_replicas: int, rank: int, seed: int,
                 num_workers: int = 0, pin_memory: bool = False, collate_fn=None,
                 length_grouping: tuple[list[int], int] | None = None) -> DataLoader:
    """`length_grouping` = (length of each sample, window) turns on length-grouped batches."""
    kwargs = dict(num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
    if length_grouping is not None and length_grouping[1] > 1:
        sampler = LengthGroupedSampler(dataset, *length_grouping, **kwargs)
    else:
        sampler = ResumableDistributedSampler(dataset, **kwargs)
    if len(sampler) < batch_size:
        raise ConfigError(
            f"the training set has {len(dataset)} samples, fewer than one batch per process "
            f"({batch_size} x {num_replicas} processes); lower data.batch_size or add data")
    # Its own generator: creating an iterator must not draw from the global RNG, or a resumed
    # run's random stream (dropout, augmentation) would be shifted by one draw.
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True,
                      num_workers=num_workers, pin_memory=pin_memory,
                      persistent_workers=num_workers > 0, collate_fn=collate_fn,
                      generator=torch.Generator().manual_seed(seed))


def eval_loader(dataset: Dataset, batch_size: int, num_replicas: int, rank: int,
                num_workers: int = 0, pin_memory: bool = False, collate_fn=None) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size,
                      sampler=ShardSampler(len(dataset), num_replicas, rank),
                      num_workers=num_workers, pin_memory=pin_memory, collate_fn=collate_fn)


def batches_forever(loader: DataLoader, start_epoch: int = 0, skip_samples: int = 0):
    """Yield (epoch, samples consumed in the epoch by all ranks after this batch, batch) across
    epochs, reshuffling through `set_epoch`.

    `skip_samples` (global) resumes part-way into `start_epoch`: the sampler recomputes that
    epoch's order from the seed and drops what was already consumed, without loading it.
    """
    epoch, consumed = start_epoch, skip_samples
    per_batch = loader.batch_size * loader.sampler.num_replicas
    while True:
        loader.sampler.set_epoch(epoch, skip=consumed)
        if loader.generator is not None:  # worker seeds depend on the epoch only
            loader.generator.manual_seed(loader.sampler.seed + epoch)
        for batch in loader:
            consumed += per_batch
            yield epoch, consumed, batch
        epoch, consumed = epoch + 1, 0
