"""CIFAR-10 and CIFAR-100 from their python pickle batches (``cifar-10-batches-py``, ``cifar-100-python``)."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from lmc_lightning.data.base import BaseDataModule


def read_cifar_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """Images ``[N, 3, 32, 32]`` uint8 and labels ``[N]`` of one pickled CIFAR batch file.

    The files are Python pickles, so only read ones from the official archive (checked by md5 on download).

    Raises:
        ValueError: If the file is not a readable CIFAR batch.
    """
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
        images = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(batch[label_key], dtype=np.int64)
    except (pickle.UnpicklingError, EOFError, AttributeError, KeyError, ValueError, TypeError) as err:
        raise ValueError(f"{path} is not a valid CIFAR batch ({type(err).__name__}: {err}); "
                         "delete it and re-download (download=True).") from err
    if len(images) != len(labels):
        raise ValueError(f"{path} holds {len(images)} images but {len(labels)} labels; delete it and re-download.")
    return images, labels


class CIFAR10DataModule(BaseDataModule):
    """CIFAR-10: 50k training and 10k test colour images of ``3x32x32`` in 10 classes.

    Expects ``root/cifar-10-batches-py/data_batch_1..5`` and ``test_batch``; ``download=True`` fetches and
    unpacks the official archive into ``root``. Augmentation (crop with padding 4, flip) is on by default.
    Arguments: see :class:`~lmc_lightning.data.base.BaseDataModule`.
    """

    num_classes = 10
    input_shape = (3, 32, 32)
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)
    folder_name = "cifar-10-batches-py"
    url = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
    archive_md5 = "c58f30108f718f92721af3b95e74349a"
    train_files: tuple[str, ...] = tuple(f"data_batch_{i}" for i in range(1, 6))
    test_files: tuple[str, ...] = ("test_batch",)
    label_key = "labels"

    def __init__(
        self,
        root: str = "data",
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        val_split: int | float = 0,
        train_subset: int | None = None,
        subset_mode: Literal["first", "random"] = "first",
        augment: bool = True,
        normalize: bool = True,
        download: bool = False,
        seed: int | None = None,
        device_resident: bool = False,
        random_erasing: float = 0.0,
        random_grayscale: float = 0.0,
        steps_per_batch: int = 1,
    ) -> None:
        super().__init__(root, batch_size, eval_batch_size, num_workers, val_split, train_subset, subset_mode,
                         augment, normalize, download, seed, device_resident, random_erasing, random_grayscale,
                         steps_per_batch)

    @property
    def folder(self) -> Path:
        """Folder of the batch files."""
        return Path(self.root).expanduser() / self.folder_name

    def _missing(self) -> list[Path]:
        return [self.folder / name for name in (*self.train_files, *self.test_files)
                if not (self.folder / name).is_file()]

    def _download(self) -> None:
        if not self._missing():
            return
        from torchvision.datasets.utils import download_and_extract_archive

        download_and_extract_archive(self.url, str(Path(self.root).expanduser()), md5=self.archive_md5)

    def _load(self) -> dict[str, tuple[Tensor, Tensor]]:
        missing = self._missing()
        if missing:
            raise FileNotFoundError(
                f"{type(self).__name__}: missing {', '.join(map(str, missing))}. Pass download=True "
                f"(CLI: --data.download true) to fetch {self.url} and unpack it into {Path(self.root).expanduser()}."
            )
        data = {}
        for split, names in (("train", self.train_files), ("test", self.test_files)):
            parts = [read_cifar_batch(self.folder / name, self.label_key) for name in names]
            images = np.concatenate([p[0] for p in parts])
            labels = np.concatenate([p[1] for p in parts])
            data[split] = (torch.from_numpy(images), torch.from_numpy(labels))
        return data


class CIFAR100DataModule(CIFAR10DataModule):
    """CIFAR-100 (fine labels): 50k training and 10k test images of ``3x32x32`` in 100 classes.

    Expects ``root/cifar-100-python/train`` and ``test``; otherwise as :class:`CIFAR10DataModule`.
    """

    num_classes = 100
    mean = (0.5071, 0.4865, 0.4409)
    std = (0.2673, 0.2564, 0.2762)
    folder_name = "cifar-100-python"
    url = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
    archive_md5 = "eb9058c3a382ffc7106e4002c42a8d85"
    train_files = ("train",)
    test_files = ("test",)
    label_key = "fine_labels"
