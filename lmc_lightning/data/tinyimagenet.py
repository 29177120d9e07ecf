"""TinyImageNet-200 from its JPEG folders (``tiny-imagenet-200/``); its labelled val set is our test split."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from lmc_lightning.data.base import BaseDataModule

IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png"}


def restructure_val(folder: str | os.PathLike) -> bool:
    """Move ``val/images/*.JPEG`` into ``val/<wnid>/`` class folders as listed in ``val/val_annotations.txt``.

    Idempotent and safe to resume or race (each file is moved with one ``os.replace``).

    Args:
        folder: The ``tiny-imagenet-200`` folder.

    Returns:
        Whether anything was moved.

    Raises:
        FileNotFoundError: If the annotation file or an image it lists is missing.
    """
    val = Path(folder) / "val"
    images = val / "images"
    if not images.is_dir():
        return False
    annotations = val / "val_annotations.txt"
    if not annotations.is_file():
        raise FileNotFoundError(f"{annotations} is missing: it is needed to sort {images} into class folders. "
                                "Re-download TinyImageNet (download=True).")
    moved = False
    for line in annotations.read_text().splitlines():
        fields = line.split("\t")
        if len(fields) < 2:
            continue
        name, wnid = fields[0], fields[1]
        src, dst = images / name, val / wnid / name
        if src.is_file():
            dst.parent.mkdir(exist_ok=True)
            os.replace(src, dst)
            moved = True
        elif not dst.is_file():
            raise FileNotFoundError(f"{src} (listed in {annotations}) is missing; re-download TinyImageNet.")
    try:
        images.rmdir()
    except OSError:  # another process removed it, or stray files remain; the class folders are complete either way
        pass
    return moved


def _decode(path: Path, size: int) -> np.ndarray:
    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"{path} is not a readable image ({err}); re-download TinyImageNet.") from err
    if array.shape != (size, size, 3):
        raise ValueError(f"{path} is {array.shape[1]}x{array.shape[0]}, expected {size}x{size}")
    return array


def read_class_folders(folder: Path, classes: list[str], size: int = 64,
                       workers: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Decode ``folder/<class>/**/*.JPEG`` into images ``[N, 3, size, size]`` uint8 and labels ``[N]`` int64.

    Labels index ``classes``; files are read in sorted order within each class.
    """
    files, labels = [], []
    for label, name in enumerate(classes):
        class_dir = folder / name
        if not class_dir.is_dir():
            raise FileNotFoundError(f"class folder {class_dir} is missing; re-download TinyImageNet.")
        found = sorted(p for p in class_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        files += found
        labels += [label] * len(found)
    images = np.empty((len(files), size, size, 3), dtype=np.uint8)
    with ThreadPoolExecutor(max(1, min(workers, os.cpu_count() or 1))) as pool:
        for i, array in enumerate(pool.map(lambda p: _decode(p, size), files)):
            images[i] = array
    return images.transpose(0, 3, 1, 2).copy(), np.asarray(labels, dtype=np.int64)


class TinyImageNetDataModule(BaseDataModule):
    """TinyImageNet-200: 100k training images of ``3x64x64`` in 200 classes; its 10k labelled val images are the
    test split (``val_split`` holds out a validation set from training).

    Expects ``root/tiny-imagenet-200/`` with ``wnids.txt``, ``train/<wnid>/images/*.JPEG`` and ``val/``; the flat
    ``val/images`` is sorted into ``val/<wnid>/`` once (by ``prepare_data``, or ``setup`` if that did not run).
    Class indices follow the sorted wnids. Augmentation (crop with padding 8, flip) is on by default.
    Arguments: see :class:`~lmc_lightning.data.base.BaseDataModule`.
    """

    num_classes = 200
    input_shape = (3, 64, 64)
    mean = (0.4802, 0.4481, 0.3975)
    std = (0.2770, 0.2691, 0.2821)
    crop_padding = 8
    folder_name = "tiny-imagenet-200"
    url = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
    archive_md5 = "90528d7ca1a48142e341f4ef8d21d0de"

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
        """The ``tiny-imagenet-200`` folder."""
        return Path(self.root).expanduser() / self.folder_name

    def _missing(self) -> list[Path]:
        return [p for p in (self.folder / "wnids.txt", self.folder / "train", self.folder / "val") if not p.exists()]

    def prepare_data(self) -> None:
        """Download when asked, then sort the val images into class folders (both once, on one process)."""
        super().prepare_data()
        if not self._missing():
            restructure_val(self.folder)

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
        restructure_val(self.folder)
        wnids = sorted({line.strip() for line in (self.folder / "wnids.txt").read_text().splitlines() if line.strip()})
        if len(wnids) != self.num_classes:
            raise ValueError(f"{self.folder / 'wnids.txt'} lists {len(wnids)} classes, expected {self.num_classes}")
        size = self.input_shape[-1]
        data = {}
        for split, sub in (("train", "train"), ("test", "val")):
            images, labels = read_class_folders(self.folder / sub, wnids, size)
            data[split] = (torch.from_numpy(images), torch.from_numpy(labels))
        return data
