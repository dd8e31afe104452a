"""A deterministic, resumable, rank-sharded batch order, and per-sample seeding of data augmentation.

Together they make what a step sees a function of (seed, epoch, batch) alone: not of the number of data-loader
workers, of which worker loaded a sample, or of where an earlier run was interrupted.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler, get_worker_info

from evpretrain.training.rng import preserved_rng, sample_seed, seed_all


class EpochBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches of ``(sample index, epoch)`` keys for one rank, starting at a settable data position.

    Each epoch draws a permutation of ``range(num_samples)`` from a generator seeded with ``seed + epoch`` (as
    ``DistributedSampler``); rank ``r`` of ``world_size`` takes positions ``r, r + world_size, ...`` of it, and its
    batch ``b`` holds positions ``(b * batch_size + j) * world_size + r``. So the ranks' batches ``b`` together
    are exactly a single process's batch ``b`` of ``batch_size * world_size``. The tail that does not fill a
    global batch is dropped (a different tail each epoch), so that every rank runs the same number of steps.
    """

    def __init__(self, num_samples: int, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.batches_per_epoch = num_samples // (batch_size * world_size)
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"the dataset has {num_samples} samples, fewer than one global batch of "
                f"{batch_size} x {world_size} processes"
            )
        self.epoch = 0
        self.start_batch = 0

    def set_position(self, epoch: int, batch: int) -> None:
        """Make the next iteration yield ``epoch``'s batches from batch ``batch`` on."""
        if not 0 <= batch < self.batches_per_epoch:
            raise ValueError(f"batch {batch} is outside an epoch of {self.batches_per_epoch} batches")
        self.epoch = epoch
        self.start_batch = batch

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """(batches_per_epoch, batch_size) sample indices of this rank in ``epoch``."""
        generator = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(self.num_samples, generator=generator)
        used = self.batches_per_epoch * self.batch_size * self.world_size
        return order[:used].view(self.batches_per_epoch, self.batch_size, self.world_size)[:, :, self.rank]

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start_batch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch = self.epoch
        for batch in self.epoch_order(epoch)[self.start_batch :].tolist():
            yield [(index, epoch) for index in batch]


class SeededSamples(Dataset):
    """``dataset`` read by ``(index, epoch)`` keys, each sample on RNG streams seeded from (seed, epoch, index).

    A dataset that augments with Python's ``random``, numpy's global RNG or torch's CPU RNG thus gets the same
    randomness in the main process and in any worker, on every run; in the main process the caller's own streams
    are restored after each sample. (A dataset that makes its own generator, e.g. ``np.random.default_rng()``, is
    not covered: seed that from the sample's index and the epoch, as ``PretrainDataset`` does.) A dataset whose
    ``deterministic`` attribute is true draws nothing and is read directly.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, epoch = key
        if getattr(self.dataset, "deterministic", False):
            return self.dataset[index]
        seed = sample_seed(self.seed, epoch, index)
        if get_worker_info() is not None:  # a worker's streams serve data alone: no need to restore them (~70 us)
            seed_all(seed, cuda=False)
            return self.dataset[index]
        with preserved_rng(seed):
            return self.dataset[index]
