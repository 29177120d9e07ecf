"""Base LightningDataModule for in-memory image classification datasets."""

from __future__ import annotations

import os
from typing import Any, Literal

import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader

from lmc_lightning.data.chunks import StepChunk
from lmc_lightning.data.loaders import DeviceLoader, ShardedSampler, TensorBatchDataset
from lmc_lightning.data.transforms import BatchTransform

SPLITS = ("train", "val", "test")
Split = Literal["train", "val", "test"]


class BaseDataModule(LightningDataModule):
    """A classification dataset held in memory as tensors, served by one loader factory.

    Subclasses set ``num_classes``, ``input_shape``, ``mean``, ``std`` (and ``crop_padding``) and implement
    :meth:`_load` (read from disk) and, if they can, :meth:`_download`. ``prepare_data`` only downloads;
    ``setup`` loads, holds out the validation split and picks the training subset.

    Args:
        root: Folder holding the dataset files (or where to download them).
        batch_size: Training batch size (per process under DDP).
        eval_batch_size: Validation/test batch size; ``None``: ``batch_size``.
        num_workers: DataLoader worker processes (ignored when ``device_resident``).
        val_split: Held out from the training set with ``seed``: a fraction in (0, 1) or a count >= 1; 0: none
            (then validation is skipped).
        train_subset: Keep only this many of the remaining training samples; ``None``: all.
        subset_mode: ``"first"``: the first ``train_subset`` in file order; ``"random"``: a seeded random choice.
        augment: Random crop (zero padding ``crop_padding``) and horizontal flip on training batches.
        normalize: Standardise each channel with the dataset's ``mean``/``std``; otherwise floats in [0, 1].
        download: Let ``prepare_data`` download the dataset when it is not found.
        seed: Seed of the validation hold-out, random subset, shuffling and augmentation; ``None``: the run's seed
            (``seed_everything`` / ``--seed_everything``, read from ``PL_GLOBAL_SEED`` when the datamodule is
            built), 0 when none was set.
        device_resident: Move the whole dataset to the training device once and make batches there.
        random_erasing: Probability of random erasing on training batches (MCSurface: 0.5; scale 0.02-0.25,
            ratio 0.3-3.3, value 0), on the device; 0: off.
        random_grayscale: Probability of turning a training image grey (MCSurface's surfaces: 0.1); 0: off.
        steps_per_batch: With ``device_resident``: hand the module this many consecutive training batches at once
            (a :class:`~lmc_lightning.data.chunks.StepChunk`); a module that accepts them
            (``supports_step_chunks``, e.g. ``EndpointModule``) makes the same optimiser steps, one per batch,
            while Lightning's per-batch work runs once per chunk (for small nets whose step is host-bound).
            Lightning then counts chunks as batches: ``limit_train_batches``, ``val_check_interval``,
            ``log_every_n_steps`` and the ``on_train_batch_*`` hooks go by chunks, ``global_step`` by optimiser
            steps. Single process only (not under DDP). 1: plain batches.
    """

    num_classes: int
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_padding: int = 4

    def __init__(
        self,
        root: str = "data",
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        val_split: int | float = 0,
        train_subset: int | None = None,
        subset_mode: Literal["first", "random"] = "first",
        augment: bool = False,
        normalize: bool = True,
        download: bool = False,
        seed: int | None = None,
        device_resident: bool = False,
        random_erasing: float = 0.0,
        random_grayscale: float = 0.0,
        steps_per_batch: int = 1,
    ) -> None:
        super().__init__()
        if not (0 <= random_erasing <= 1 and 0 <= random_grayscale <= 1):
            raise ValueError("random_erasing and random_grayscale are probabilities in [0, 1], got "
                             f"{random_erasing} and {random_grayscale}.")
        if batch_size < 1 or (eval_batch_size is not None and eval_batch_size < 1):
            raise ValueError(f"batch sizes must be >= 1, got {batch_size=}, {eval_batch_size=}")
        if steps_per_batch < 1 or (steps_per_batch > 1 and not device_resident):
            raise ValueError(f"steps_per_batch must be >= 1, and > 1 needs device_resident=True; got "
                             f"{steps_per_batch=}, {device_resident=}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if val_split < 0 or (val_split >= 1 and val_split != int(val_split)):
            raise ValueError(f"val_split must be a fraction in [0, 1) or a whole count >= 1, got {val_split}")
        if train_subset is not None and train_subset < 1:
            raise ValueError(f"train_subset must be >= 1 or None, got {train_subset}")
        if subset_mode not in ("first", "random"):
            raise ValueError(f"subset_mode must be 'first' or 'random', got {subset_mode!r}")
        # Not sent to the logger: its keys (seed, batch_size) would clash with the model's; config.yaml keeps them.
        self.save_hyperparameters(logger=False)
        self.root = root
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.val_split = val_split
        self.train_subset = train_subset
        self.subset_mode = subset_mode
        self.augment = augment
        self.normalize = normalize
        self.download = download
        self.seed = seed if seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))
        self.device_resident = device_resident
        self.random_erasing = random_erasing
        self.random_grayscale = random_grayscale
        self.steps_per_batch = steps_per_batch
        self._splits: dict[str, tuple[Tensor, Tensor]] = {}
        self._resident: dict[str, tuple[Tensor, Tensor]] = {}

    # Subclass hooks -------------------------------------------------------------------------------------------------

    def _load(self) -> dict[str, tuple[Tensor, Tensor]]:
        """Read ``{"train": (x, y), "test": (x, y)}``: images ``[N, *input_shape]`` uint8 (or float in [0, 1]),
        labels ``[N]`` int64.

        Raises:
            FileNotFoundError: Naming the expected path(s) and how to obtain the data.
        """
        raise NotImplementedError

    def _download(self) -> None:
        """Download the dataset into ``root`` unless it is already there."""
        raise NotImplementedError(f"{type(self).__name__} cannot download its data; place the files in {self.root}")

    # Lightning hooks ------------------------------------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Download the dataset when ``download=True`` (runs on one process per node)."""
        if self.download:
            self._download()

    def setup(self, stage: str | None = None) -> None:
        """Load the data once, hold out ``val_split`` and pick ``train_subset``."""
        if self._splits:
            return
        raw = self._load()
        for split, (x, y) in raw.items():
            self._check(split, x, y)
        x, y = raw["train"]
        train_idx, val_idx = self._split_indices(len(x))
        self._splits = {
            "train": (x, y) if train_idx is None else (x[train_idx], y[train_idx]),
            "val": (x[val_idx], y[val_idx]),
            "test": raw["test"],
        }

    def teardown(self, stage: str | None = None) -> None:
        """Free the device copies (host tensors stay for a later stage)."""
        self._resident.clear()

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """An ``(x, y)`` batch already on ``device`` (``device_resident``) is returned as it is, without Lightning's
        walk over the collection; anything else goes through Lightning's transfer. (Lightning then uses this hook, not
        a LightningModule's own ``transfer_batch_to_device``.)"""
        if (type(batch) in (tuple, list) and len(batch) == 2
                and all(type(t) is Tensor and t.device == device for t in batch)):
            return batch
        if type(batch) is StepChunk and all(type(t) is Tensor and t.device == device for b in batch for t in b):
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def train_dataloader(self) -> DataLoader | DeviceLoader:
        module = self.trainer.lightning_module if self.trainer is not None else None
        if self.steps_per_batch > 1 and module is not None and not getattr(module, "supports_step_chunks", False):
            raise ValueError(f"steps_per_batch={self.steps_per_batch}: {type(module).__name__} takes one batch per "
                             "training step; use steps_per_batch=1 (chunks of batches: EndpointModule).")
        return self._dataloader_factory("train")

    def val_dataloader(self) -> DataLoader | DeviceLoader | list:
        # An empty list tells Lightning there is nothing to validate.
        return self._dataloader_factory("val") if len(self._get("val")[0]) else []

    def test_dataloader(self) -> DataLoader | DeviceLoader:
        return self._dataloader_factory("test")

    def predict_dataloader(self) -> DataLoader | DeviceLoader:
        return self._dataloader_factory("test")

    # Public helpers -------------------------------------------------------------------------------------------------

    def split_tensors(self, split: Split) -> tuple[Tensor, Tensor]:
        """A whole split as model-ready CPU tensors: normalised float images (no augmentation) and int64 labels.

        Raises:
            RuntimeError: Before :meth:`setup`.
            ValueError: For an unknown split, or ``"val"`` when ``val_split`` is 0.
        """
        x, y = self._get(split)
        if split == "val" and len(x) == 0:
            raise ValueError("there is no validation split: set val_split to a fraction or count > 0")
        return self._transform(augment=False)((x, y.clone()))

    # Internals ------------------------------------------------------------------------------------------------------

    def _check(self, split: str, x: Tensor, y: Tensor) -> None:
        name = type(self).__name__
        if tuple(x.shape[1:]) != tuple(self.input_shape) or y.shape != x.shape[:1]:
            raise ValueError(f"{name} {split} data has images {tuple(x.shape)} and labels {tuple(y.shape)}; "
                             f"expected [N, {', '.join(map(str, self.input_shape))}] and [N]. Re-download it.")
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise ValueError(f"{name} {split} labels span [{int(y.min())}, {int(y.max())}] but there are "
                             f"{self.num_classes} classes. Re-download the data.")

    def _split_indices(self, n: int) -> tuple[Tensor | None, Tensor]:
        """Seeded ``(train, val)`` indices into the training set, each sorted; train ``None`` means all of it."""
        n_val = round(self.val_split * n) if self.val_split < 1 else int(self.val_split)
        if n_val >= n:
            raise ValueError(f"val_split={self.val_split} leaves no training data out of {n} samples")
        if self.train_subset is not None and self.train_subset > n - n_val:
            raise ValueError(f"train_subset={self.train_subset} exceeds the {n - n_val} training samples available")
        if n_val == 0 and self.train_subset is None:
            return None, torch.empty(0, dtype=torch.long)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))
        val, rest = perm[:n_val].sort().values, perm[n_val:]
        k = self.train_subset if self.train_subset is not None else len(rest)
        train = rest[:k].sort().values if self.subset_mode == "random" else rest.sort().values[:k]
        return train, val

    def _get(self, split: str) -> tuple[Tensor, Tensor]:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if not self._splits:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before its data is used")
        return self._splits[split]

    def _transform(self, augment: bool) -> BatchTransform:
        return BatchTransform(self.mean, self.std, self.normalize, augment, self.crop_padding)

    def _placement(self) -> tuple[torch.device, int, int]:
        """``(device, rank, world_size)`` from the attached trainer, else CPU on a single process."""
        if self.trainer is None:
            return torch.device("cpu"), 0, 1
        return self.trainer.strategy.root_device, self.trainer.global_rank, self.trainer.world_size

    def _dataloader_factory(self, split: Split) -> DataLoader | DeviceLoader:
        """The loader for ``split``: resident on the device, or a DataLoader over host tensors."""
        return self._loader(split, *self._get(split), train=split == "train")

    def _loader(self, key: str, x: Tensor, y: Tensor, train: bool) -> DataLoader | DeviceLoader:
        """A loader over ``(x, y)`` (shuffled, augmented and sharded as training data when ``train``); ``key`` names
        the tensors' device-resident copy."""
        batch_size = self.batch_size if train else self.eval_batch_size
        transform = self._transform(augment=train and self.augment)
        if train and isinstance(transform, BatchTransform):  # erasing / grayscale on training batches only
            transform.erasing, transform.grayscale = self.random_erasing, self.random_grayscale
        device, rank, world_size = self._placement()
        if self.device_resident:
            if key not in self._resident or self._resident[key][0].device != device:
                self._resident[key] = (x.to(device), y.to(device))
            x, y = self._resident[key]
            sampler = ShardedSampler(len(x), shuffle=train, seed=self.seed, rank=rank, world_size=world_size,
                                     drop_uneven=train)
            return DeviceLoader(x, y, batch_size, sampler, transform.to(device), seed=self.seed,
                                steps_per_batch=self.steps_per_batch if train else 1)
        # One process: a sampler whose order is a function of (seed, epoch), which Lightning sets every epoch, so a
        # resumed run sees the same order as an uninterrupted one. Under DDP Lightning puts in a DistributedSampler
        # (seeded, set_epoch as well) in place of the shuffle.
        sampler = ShardedSampler(len(x), shuffle=True, seed=self.seed) if train and world_size == 1 else None
        return DataLoader(
            TensorBatchDataset(x, y),
            batch_size=batch_size,
            shuffle=train and sampler is None,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=transform,
            pin_memory=device.type == "cuda" or (self.trainer is None and torch.cuda.is_available()),
            persistent_workers=self.num_workers > 0,
            generator=torch.Generator().manual_seed(self.seed) if train and sampler is None else None,
        )
