"""The two ways batches are made: a DataLoader over host tensors, or slices of tensors resident on the device."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from lmc_lightning.data.chunks import StepChunk
from lmc_lightning.data.transforms import BatchTransform


def mix_seed(*parts: int) -> int:
    """A well-spread 32-bit seed derived from several integers (seed, epoch, rank, stream)."""
    return int(np.random.SeedSequence([int(p) & (2**64 - 1) for p in parts]).generate_state(1)[0])


class TensorBatchDataset(Dataset):
    """Map-style dataset over ``(images, labels)`` tensors that fetches a whole batch with one indexing op.

    ``DataLoader`` calls ``__getitems__`` with the batch's indices, so no per-sample Python work is done; pair it
    with a ``collate_fn`` that takes the ``(images, labels)`` tuple (e.g. a :class:`BatchTransform`).
    """

    def __init__(self, x: Tensor, y: Tensor) -> None:
        if len(x) != len(y):
            raise ValueError(f"{len(x)} images but {len(y)} labels")
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.x[index], self.y[index]

    def __getitems__(self, indices: list[int]) -> tuple[Tensor, Tensor]:
        index = torch.as_tensor(indices, dtype=torch.long)
        return self.x[index], self.y[index]


class ShardedSampler(Sampler[int]):
    """One rank's share of ``range(n)``, reshuffled every epoch from ``(seed, epoch)``; equal counts on all ranks.

    All ranks draw the same permutation and take every ``world_size``-th index from ``rank`` on, so shares are
    disjoint. To equalise counts, ``drop_uneven=True`` drops the last ``n % world_size`` indices of the
    permutation (training); otherwise the permutation is wrapped around to pad (evaluation, like
    ``DistributedSampler``). Each pass advances the epoch; :meth:`set_epoch` pins it (Lightning calls it).

    Args:
        n: Dataset size.
        shuffle: Draw a seeded permutation per epoch instead of ``0..n-1``.
        seed: Base seed, the same on all ranks.
        rank: This process's rank.
        world_size: Number of processes.
        drop_uneven: Drop instead of pad to make the total a multiple of ``world_size``.
    """

    def __init__(self, n: int, shuffle: bool = False, seed: int = 0, rank: int = 0, world_size: int = 1,
                 drop_uneven: bool = False) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, world_size={world_size}), got {rank}")
        if n < world_size and drop_uneven:
            raise ValueError(f"{n} samples cannot give each of {world_size} ranks at least one")
        self.n, self.shuffle, self.seed = n, shuffle, seed
        self.rank, self.world_size, self.drop_uneven = rank, world_size, drop_uneven
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch``'s permutation on the next pass."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n // self.world_size if self.drop_uneven else math.ceil(self.n / self.world_size)

    def draw(self) -> Tensor:
        """This rank's indices for the current epoch (CPU ``int64``), then advance the epoch."""
        if self.shuffle:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(mix_seed(self.seed, self.epoch)))
        else:
            order = torch.arange(self.n)
        self.epoch += 1
        total = len(self) * self.world_size
        if total > self.n:
            order = order.repeat(math.ceil(total / self.n))
        return order[:total][self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.draw().tolist())


class DeviceLoader:
    """Batches sliced from tensors already on the training device and transformed there.

    Nothing crosses the host-device boundary per batch (only the epoch's index vector, once). Iterating gives
    transformed ``(x, y)`` batches of this rank's share; ``sampler`` is exposed so Lightning sets its epoch. With
    ``steps_per_batch = S > 1`` it gives the same batches grouped ``S`` at a time into
    :class:`~lmc_lightning.data.chunks.StepChunk` tuples (``len()`` counts chunks, :attr:`num_steps` batches).

    Args:
        x: Stored images ``[N, C, H, W]`` on the device.
        y: Labels ``[N]`` on the same device.
        batch_size: Samples per batch (the last batch may be smaller).
        sampler: Which indices this rank takes each epoch.
        transform: Batch transform with constants on the device (:meth:`BatchTransform.to`).
        seed: Seed of the augmentation stream (mixed with epoch and rank).
        steps_per_batch: Batches per yielded item; 1: plain ``(x, y)`` batches.
    """

    batch_sampler = None  # read by Lightning's loader checks, which expect DataLoader's attributes

    def __init__(self, x: Tensor, y: Tensor, batch_size: int, sampler: ShardedSampler, transform: BatchTransform,
                 seed: int = 0, steps_per_batch: int = 1) -> None:
        if len(x) != len(y) or len(x) != sampler.n:
            raise ValueError(f"sizes disagree: {len(x)} images, {len(y)} labels, sampler over {sampler.n}")
        if steps_per_batch < 1:
            raise ValueError(f"steps_per_batch must be >= 1, got {steps_per_batch}")
        self.x, self.y, self.batch_size = x, y, batch_size
        self.sampler, self.transform, self.seed = sampler, transform, seed
        self.steps_per_batch = steps_per_batch

    @property
    def num_steps(self) -> int:
        """Batches per epoch (each a training step)."""
        return math.ceil(len(self.sampler) / self.batch_size)

    def __len__(self) -> int:
        return math.ceil(self.num_steps / self.steps_per_batch)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor] | StepChunk]:
        return self._batches() if self.steps_per_batch == 1 else self._chunks()

    def _chunks(self) -> Iterator[StepChunk]:
        chunk: list[tuple[Tensor, Tensor]] = []
        for batch in self._batches():  # made in order, so the augmentation stream is consumed as with S = 1
            chunk.append(batch)
            if len(chunk) == self.steps_per_batch:
                yield StepChunk(chunk)
                chunk = []
        if chunk:
            yield StepChunk(chunk)

    def _batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        epoch = self.sampler.epoch
        index = self.sampler.draw().to(self.x.device)
        generator = None
        if self.transform.stochastic:
            generator = torch.Generator(device=self.x.device)
            generator.manual_seed(mix_seed(self.seed, epoch, self.sampler.rank, 1))
        for chunk in index.split(self.batch_size):  # index_select: the gather, with less work than x[chunk]
            yield self.transform((self.x.index_select(0, chunk), self.y.index_select(0, chunk)), generator)
