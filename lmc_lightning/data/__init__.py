"""LightningDataModules for image classification, plus the IDX reader/writer and batch transforms they use."""

from lmc_lightning.data.base import BaseDataModule
from lmc_lightning.data.cifar import CIFAR10DataModule, CIFAR100DataModule
from lmc_lightning.data.cue import CueDataModule
from lmc_lightning.data.idx import read_idx, write_idx
from lmc_lightning.data.loaders import DeviceLoader, ShardedSampler, TensorBatchDataset
from lmc_lightning.data.mnist import FashionMNISTDataModule, MNISTDataModule
from lmc_lightning.data.tinyimagenet import TinyImageNetDataModule
from lmc_lightning.data.transforms import BatchTransform, random_crop, random_hflip

__all__ = [
    "BaseDataModule",
    "BatchTransform",
    "CIFAR100DataModule",
    "CIFAR10DataModule",
    "CueDataModule",
    "DeviceLoader",
    "FashionMNISTDataModule",
    "MNISTDataModule",
    "ShardedSampler",
    "TensorBatchDataset",
    "TinyImageNetDataModule",
    "random_crop",
    "random_hflip",
    "read_idx",
    "write_idx",
]
