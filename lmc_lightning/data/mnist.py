"""MNIST and Fashion-MNIST from their IDX files (``train-images-idx3-ubyte.gz``, ...)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from lmc_lightning.data.base import BaseDataModule
from lmc_lightning.data.idx import read_idx

IDX_STEMS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _idx_file(folder: Path, stem: str) -> Path | None:
    """``folder/stem.gz`` or the uncompressed ``folder/stem``, whichever exists."""
    for path in (folder / f"{stem}.gz", folder / stem):
        if path.is_file():
            return path
    return None


class MNISTDataModule(BaseDataModule):
    """MNIST digits, 60k training and 10k test images of ``1x28x28``.

    The four IDX files (``.gz`` or uncompressed) are looked for in ``root/mnist``, ``root`` and torchvision's
    ``root/MNIST/raw``; ``download=True`` fetches them into ``root/mnist``. Arguments: see
    :class:`~lmc_lightning.data.base.BaseDataModule` (``augment`` is off by default).
    """

    num_classes = 10
    input_shape = (1, 28, 28)
    mean = (0.1307,)
    std = (0.3081,)
    folder_name = "mnist"
    torchvision_name = "MNIST"
    mirrors = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
    md5 = {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    }
    system_folders: tuple[str, ...] = ()
    install_hint = ""

    def candidate_folders(self) -> list[Path]:
        """Folders searched, in order, for the IDX files."""
        root = Path(self.root).expanduser()
        return [root / self.folder_name, root, root / self.torchvision_name / "raw",
                *map(Path, self.system_folders)]

    def find_folder(self) -> Path | None:
        """The first candidate folder holding all four files, or ``None``."""
        for folder in self.candidate_folders():
            if all(_idx_file(folder, stem) for stems in IDX_STEMS.values() for stem in stems):
                return folder
        return None

    def _download(self) -> None:
        if self.find_folder() is not None:
            return
        from torchvision.datasets.utils import download_url

        target = Path(self.root).expanduser() / self.folder_name
        for filename, md5 in self.md5.items():
            errors = []
            for mirror in self.mirrors:
                try:
                    download_url(mirror + filename, str(target), filename=filename, md5=md5)
                    break
                except (OSError, RuntimeError) as err:  # URLError is an OSError
                    errors.append(f"{mirror}: {err}")
            else:
                raise RuntimeError(f"could not download {filename} into {target}:\n" + "\n".join(errors))

    def _load(self) -> dict[str, tuple[Tensor, Tensor]]:
        folder = self.find_folder()
        if folder is None:
            names = ", ".join(f"{stem}.gz" for stems in IDX_STEMS.values() for stem in stems)
            looked = ", ".join(str(p) for p in self.candidate_folders())
            hint = f", or {self.install_hint}" if self.install_hint else ""
            raise FileNotFoundError(
                f"{type(self).__name__}: IDX files ({names}) not found in any of: {looked}. "
                f"Pass download=True (CLI: --data.download true) to fetch them into "
                f"{Path(self.root).expanduser() / self.folder_name}{hint}."
            )
        data = {}
        for split, (image_stem, label_stem) in IDX_STEMS.items():
            images_path, labels_path = _idx_file(folder, image_stem), _idx_file(folder, label_stem)
            images, labels = read_idx(images_path), read_idx(labels_path)
            if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
                raise ValueError(f"{images_path} ({images.shape}) and {labels_path} ({labels.shape}) do not form "
                                 "an image/label pair; re-download them.")
            data[split] = (torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels).long())
        return data


class FashionMNISTDataModule(MNISTDataModule):
    """Fashion-MNIST, 60k training and 10k test images of ``1x28x28``.

    Looked for like MNIST (``root/fashion-mnist``, ``root``, ``root/FashionMNIST/raw``) and then in the Debian
    package's ``/usr/share/datasets/fashion-mnist`` (``apt-get install dataset-fashion-mnist``).
    """

    mean = (0.2860,)
    std = (0.3530,)
    folder_name = "fashion-mnist"
    torchvision_name = "FashionMNIST"
    mirrors = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",)
    md5 = {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    }
    system_folders = ("/usr/share/datasets/fashion-mnist",)
    install_hint = "install the Debian package: apt-get install dataset-fashion-mnist"
