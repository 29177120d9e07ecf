"""One training batch per zoo member each step, member ``k`` in the data order of data seed ``seed + k``."""

from __future__ import annotations

from typing import Any

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler

from lmc_lightning.data.loaders import DeviceLoader, ShardedSampler, mix_seed


class ZooBatches:
    """Stacked batches ``([K, B, ...], [K, B])`` whose row ``k`` is what a loader with data seed ``seeds[k]`` gives.

    Built from the training loader of the datamodule (same dataset, batch size, transform and rank share):

    * a :class:`DeviceLoader` (``device_resident=True``): each member's permutation is drawn as
      :class:`ShardedSampler` draws it for seed ``seeds[k]``, all ``K`` index rows go to the device once per epoch,
      and a step cuts one ``[K, B]`` block and transforms it in one call (per member when augmenting, with the
      member's own augmentation stream), so row ``k`` equals the batch of a run with ``data.seed = seeds[k]``;
    * a ``DataLoader``: one loader per member, shuffled by a :class:`ShardedSampler` seeded ``seeds[k]`` (a
      ``DistributedSampler`` with that seed under DDP), as the datamodule builds its own.

    Batch ``i`` of an epoch is addressed by its index, so a run resumed at an epoch boundary continues every member
    exactly (mid-epoch too in the device-resident form without augmentation; otherwise the epoch's order or
    augmentation stream restarts).

    Args:
        loader: The datamodule's training loader.
        seeds: Data seed of each member.
        rank: This process's rank.
        world_size: Number of processes.
    """

    def __init__(self, loader: Any, seeds: list[int], rank: int = 0, world_size: int = 1) -> None:
        self.loader, self.seeds, self.rank, self.world_size = loader, list(seeds), rank, world_size
        self.device_resident = isinstance(loader, DeviceLoader)
        if not self.device_resident and not (isinstance(loader, DataLoader) and loader.batch_size is not None):
            raise TypeError(f"a zoo cannot build its members' data orders from a {type(loader).__name__}; use a "
                            "training DataLoader with a batch_size or device_resident=true.")
        self._members = None if self.device_resident else [self._member_loader(s) for s in self.seeds]
        self._index: Tensor | None = None
        self._iters: list[Any] = []
        self._epoch = -1

    def _member_loader(self, seed: int) -> DataLoader:
        loader = self.loader
        kwargs: dict[str, Any] = {}
        if self.world_size > 1:
            kwargs["sampler"] = DistributedSampler(loader.dataset, num_replicas=self.world_size, rank=self.rank,
                                                   shuffle=True, seed=seed)
        else:  # as the datamodule's single-process loader: the order is a function of (seed, epoch)
            kwargs["sampler"] = ShardedSampler(len(loader.dataset), shuffle=True, seed=seed)
        return DataLoader(loader.dataset, batch_size=loader.batch_size, num_workers=loader.num_workers,
                          collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, drop_last=loader.drop_last,
                          persistent_workers=loader.num_workers > 0, **kwargs)

    def start_epoch(self, epoch: int) -> None:
        """Draw every member's order for ``epoch``."""
        self._epoch = epoch
        if self.device_resident:
            base = self.loader.sampler
            rows = []
            for seed in self.seeds:
                sampler = ShardedSampler(base.n, shuffle=True, seed=seed, rank=self.rank,
                                         world_size=self.world_size, drop_uneven=base.drop_uneven)
                sampler.set_epoch(epoch)
                rows.append(sampler.draw())
            self._index = torch.stack(rows).to(self.loader.x.device)
            return
        for member in self._members:
            if isinstance(member.sampler, DistributedSampler | ShardedSampler):
                member.sampler.set_epoch(epoch)
        self._iters = [iter(member) for member in self._members]

    def batch(self, batch_idx: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """The stacked batch ``batch_idx`` of the current epoch, on ``device``."""
        if not self.device_resident:
            xs, ys = zip(*(move_data_to_device(next(it), device) for it in self._iters), strict=True)
            return torch.stack(xs), torch.stack(ys)
        loader, size = self.loader, self.loader.batch_size
        index = self._index[:, batch_idx * size:(batch_idx + 1) * size]
        k, b = index.shape
        if not loader.transform.augment:
            flat = index.reshape(-1)
            x, y = loader.transform((loader.x.index_select(0, flat), loader.y.index_select(0, flat)))
            return x.reshape(k, b, *x.shape[1:]), y.reshape(k, b)
        xs, ys = [], []
        for row, seed in zip(index, self.seeds, strict=True):
            generator = self._generators()[seed]
            x, y = loader.transform((loader.x.index_select(0, row), loader.y.index_select(0, row)), generator)
            xs.append(x)
            ys.append(y)
        return torch.stack(xs), torch.stack(ys)

    def _generators(self) -> dict[int, torch.Generator]:
        """Each member's augmentation stream for this epoch, seeded as its own DeviceLoader seeds it."""
        if getattr(self, "_gen_epoch", None) != self._epoch:
            device = self.loader.x.device
            self._gens = {}
            for seed in self.seeds:
                g = torch.Generator(device=device)
                g.manual_seed(mix_seed(seed, self._epoch, self.rank, 1))
                self._gens[seed] = g
            self._gen_epoch = self._epoch
        return self._gens
