"""Data loaders shared by every task.

Training: a DistributedSampler shards the shuffled dataset across processes (same seed on every
rank, `set_epoch` each epoch). Evaluation: each rank takes every world-th sample with no padding,
so every validation sample is counted exactly once when the per-rank sums are reduced.
"""

from __future__ import annotations

import warnings
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from train.data.permutation import permute
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
    k * batch_size * world positions are consumed, whatever the rank count was. The permutation
    is computed a chunk of positions at a time (train.data.permutation): no list of the epoch's
    indices exists, so an epoch of 10^9 samples costs the same memory as one of 10.
    """

    skip = 0  # global positions of the current epoch's permutation already consumed
    CHUNK = 1 << 16  # positions computed at a time

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        super().set_epoch(epoch)
        self.skip = skip

    def _order(self, lo: int, hi: int) -> np.ndarray:
        """Indices at positions [lo, hi) of this epoch's order."""
        return permute(np.arange(lo, hi), len(self.dataset), self.seed, self.epoch)

    def _positions(self) -> tuple[int, int]:
        """[first, end) of the global positions still to be taken, in equal shares."""
        end = self.total_size  # drop_last: a multiple of the world size
        first = min(self.skip, end)
        return first, end - (end - first) % self.num_replicas

    def __iter__(self) -> Iterator[int]:
        first, end = self._positions()
        step = self.CHUNK - self.CHUNK % self.num_replicas  # chunks keep the rank phase
        for lo in range(first, end, step):
            order = self._order(lo, min(lo + step, end))
            yield from order[self.rank::self.num_replicas].tolist()

    def __len__(self) -> int:
        first, end = self._positions()
        return (end - first) // self.num_replicas


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
        self.lengths, self.window = np.asarray(lengths), window

    def _order(self, lo: int, hi: int) -> np.ndarray:
        w = self.window
        first, last = lo // w * w, -(-hi // w) * w  # whole windows around [lo, hi)
        order = super()._order(first, min(last, len(self.dataset)))
        windows = [order[i:i + w] for i in range(0, len(order), w)]
        grouped = np.concatenate([win[np.argsort(self.lengths[win], kind="stable")]
                                  for win in windows])
        return grouped[lo - first: hi - first]


class RepeatedAugmentationSampler(ResumableDistributedSampler):
    """Repeated augmentation (torchvision's RASampler, for ViT-style recipes): an epoch holds
    dataset / repeats samples, each `repeats` times at consecutive positions, so its copies go
    to different ranks (consecutive positions are dealt round-robin) and each is augmented
    differently. Position p takes the sample at position p // repeats of the epoch's
    permutation: the order stays a function of seed, epoch and global position, so resuming is
    exact on any number of processes."""

    def __init__(self, dataset: Dataset, repeats: int, **kwargs):
        super().__init__(dataset, **kwargs)
        self.repeats = repeats

    def _order(self, lo: int, hi: int) -> np.ndarray:
        return permute(np.arange(lo, hi) // self.repeats, len(self.dataset), self.seed,
                       self.epoch)


def train_loader(dataset: Dataset, batch_size: int, num_replicas: int, rank: int, seed: int,
                 num_workers: int = 0, pin_memory: bool = False, collate_fn=None,
                 length_grouping: tuple[list[int], int] | None = None,
                 repeats: int = 1) -> DataLoader:
    """`length_grouping` = (length of each sample, window) turns on length-grouped batches;
    `repeats` > 1 repeated augmentation. An IterableDataset (streaming) is split by rank
    instead of sampled."""
    if isinstance(dataset, torch.utils.data.IterableDataset):
        return stream_loader(dataset, batch_size, num_replicas, rank, num_workers, pin_memory,
                             collate_fn)
    kwargs = dict(num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
    if length_grouping is not None and length_grouping[1] > 1:
        sampler = LengthGroupedSampler(dataset, *length_grouping, **kwargs)
    elif repeats > 1:
        sampler = RepeatedAugmentationSampler(dataset, repeats, **kwargs)
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


def stream_loader(dataset, batch_size: int, num_replicas: int, rank: int, num_workers: int = 0,
                  pin_memory: bool = False, collate_fn=None):
    """A checkpointable loader of a stream: each rank reads its own part (its shards when
    they divide evenly, else every world-th row), and torchdata's StatefulDataLoader keeps
    where every worker's stream stands (state_dict / load_state_dict)."""
    from datasets.distributed import split_dataset_by_node
    from torchdata.stateful_dataloader import StatefulDataLoader

    if num_replicas > 1:
        dataset = split_dataset_by_node(dataset, rank=rank, world_size=num_replicas)
    warnings.filterwarnings("ignore", message="'set_vital' is deprecated")  # torchdata's own
    return StatefulDataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                              pin_memory=pin_memory, collate_fn=collate_fn, drop_last=True,
                              persistent_workers=False)


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


class TrainBatches:
    """The training batches of a run from where it stands, epoch after epoch, and where it
    stands after each batch (what a checkpoint saves): `position()`, the same on every rank,
    and for a stream `stream_state()`, each rank's own."""

    def __init__(self, loader, epoch: int = 0, samples_in_epoch: int = 0,
                 stream_state: dict | None = None):
        self.loader = loader
        self.epoch, self.consumed = epoch, samples_in_epoch
        self.streaming = not hasattr(loader, "sampler") or not hasattr(
            loader.sampler, "set_epoch")
        self.per_batch = loader.batch_size * (1 if self.streaming else
                                              loader.sampler.num_replicas)
        if self.streaming and stream_state is not None:
            loader.load_state_dict(stream_state["loader"])
        self._batches = self._stream() if self.streaming else batches_forever(
            loader, epoch, samples_in_epoch)

    def _stream(self):
        while True:
            for batch in self.loader:
                self.consumed += self.per_batch
                yield batch
            self.epoch, self.consumed = self.epoch + 1, 0

    def __next__(self):
        if self.streaming:
            return next(self._batches)
        self.epoch, self.consumed, batch = next(self._batches)
        return batch

    def position(self) -> dict:
        return {"epoch": self.epoch, "samples_in_epoch": self.consumed}

    def stream_state(self) -> dict | None:
        return {"loader": self.loader.state_dict()} if self.streaming else None

    def close(self) -> None:
        """Stop the loader's worker processes now, at the end of the run. Left to the garbage
        collector, the iterator may be collected after its own queues, its stop message never
        reaches the workers, and each one costs a 5 s join timeout at some later moment."""
        self._batches.close()  # ends the generator's loop over the loader
        iterator = self.loader._iterator  # kept by persistent and stateful loaders, else None
        if hasattr(iterator, "_shutdown_workers"):  # a multi-process iterator
            iterator._shutdown_workers()
        self.loader._iterator = None
