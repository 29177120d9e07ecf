"""Writers of tiny datasets in the real on-disk formats (IDX gz, CIFAR pickles, TinyImageNet JPEG folders).

Every image carries its index in the first two pixels of channel 0 (``x[0, 0, 0] = i % 256``,
``x[0, 0, 1] = i // 256``) so tests can tell which samples a split or batch holds; :func:`sample_ids` decodes it.
Labels are ``i % num_classes``. TinyImageNet images are JPEG (lossy), so they carry their class as a flat grey
level instead (``label`` for train, ``label`` + 1 for val), and no ids.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lmc_lightning.data.idx import write_idx

MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
               "t10k-labels-idx1-ubyte.gz")


def fake_images(n: int, shape: tuple[int, ...], num_classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random uint8 images ``[n, *shape]`` tagged with their index, and labels ``i % num_classes``."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
    flat = x.reshape(n, -1)
    flat[:, 0] = np.arange(n) % 256
    flat[:, 1] = np.arange(n) // 256
    return x, (np.arange(n) % num_classes).astype(np.uint8 if num_classes <= 256 else np.int64)


def sample_ids(x: torch.Tensor) -> torch.Tensor:
    """Indices tagged by :func:`fake_images` from un-normalised float images in [0, 1] (or uint8)."""
    flat = x.reshape(len(x), -1)
    flat = flat.round().long() if not x.is_floating_point() else (flat * 255).round().long()
    return flat[:, 0] + 256 * flat[:, 1]


def write_mnist(folder: Path, n_train: int = 200, n_test: int = 50) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The four (Fashion-)MNIST IDX ``.gz`` files with ``28x28`` images in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    data = {"train": fake_images(n_train, (28, 28), 10, seed=1), "test": fake_images(n_test, (28, 28), 10, seed=2)}
    for prefix, split in (("train", "train"), ("t10k", "test")):
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", data[split][0])
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", data[split][1])
    return data


def _pickle(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump({k.encode(): v for k, v in obj.items()}, f, protocol=2)  # bytes keys, as in the real files


def write_cifar10(root: Path, per_batch: int = 40, n_test: int = 50) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``root/cifar-10-batches-py/`` with five training batches, ``test_batch`` and ``batches.meta``."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    x, y = fake_images(5 * per_batch, (3, 32, 32), 10, seed=3)
    for b in range(5):
        part = slice(b * per_batch, (b + 1) * per_batch)
        _pickle(folder / f"data_batch_{b + 1}", {"batch_label": f"training batch {b + 1} of 5",
                                                  "labels": y[part].tolist(), "data": x[part].reshape(per_batch, -1)})
    xt, yt = fake_images(n_test, (3, 32, 32), 10, seed=4)
    _pickle(folder / "test_batch", {"batch_label": "testing batch 1 of 1", "labels": yt.tolist(),
                                    "data": xt.reshape(n_test, -1)})
    _pickle(folder / "batches.meta", {"label_names": [f"class{i}" for i in range(10)], "num_vis": 3072})
    return {"train": (x, y), "test": (xt, yt)}


def write_cifar100(root: Path, n_train: int = 300, n_test: int = 100) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``root/cifar-100-python/`` with ``train``, ``test`` (fine and coarse labels) and ``meta``."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    data = {}
    for name, n, seed in (("train", n_train, 5), ("test", n_test, 6)):
        x, y = fake_images(n, (3, 32, 32), 100, seed=seed)
        _pickle(folder / name, {"filenames": [f"img{i}.png" for i in range(n)], "fine_labels": y.tolist(),
                                "coarse_labels": (y // 5).tolist(), "data": x.reshape(n, -1)})
        data[name] = (x, y)
    _pickle(folder / "meta", {"fine_label_names": [f"fine{i}" for i in range(100)],
                              "coarse_label_names": [f"coarse{i}" for i in range(20)]})
    return data


def tiny_wnids(n: int = 200) -> list[str]:
    """Fake WordNet ids, listed unsorted in ``wnids.txt`` as in the real file."""
    return [f"n{(i * 7919) % 100000:08d}" for i in range(n)]


def write_tinyimagenet(root: Path, train_per_class: int = 2, val_per_class: int = 1) -> Path:
    """``root/tiny-imagenet-200/`` in the downloaded layout (flat ``val/images`` + ``val_annotations.txt``).

    Class ``c`` (index in the sorted wnids) has flat grey images of level ``c`` in train and ``c + 1`` in val.
    """
    folder = root / "tiny-imagenet-200"
    wnids = tiny_wnids()
    label = {w: i for i, w in enumerate(sorted(wnids))}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (folder / "words.txt").write_text("".join(f"{w}\tthing {i}\n" for i, w in enumerate(wnids)))
    for w in wnids:
        images = folder / "train" / w / "images"
        images.mkdir(parents=True)
        for k in range(train_per_class):
            Image.new("RGB", (64, 64), (label[w],) * 3).save(images / f"{w}_{k}.JPEG", quality=95)
        (folder / "train" / w / f"{w}_boxes.txt").write_text(
            "".join(f"{w}_{k}.JPEG\t0\t0\t63\t63\n" for k in range(train_per_class)))
    (folder / "val" / "images").mkdir(parents=True)
    lines = []
    for _ in range(val_per_class):
        for w in wnids:
            name = f"val_{len(lines)}.JPEG"
            Image.new("RGB", (64, 64), (label[w] + 1,) * 3).save(folder / "val" / "images" / name, quality=95)
            lines.append(f"{name}\t{w}\t0\t0\t63\t63")
    (folder / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    (folder / "test" / "images").mkdir(parents=True)
    Image.new("RGB", (64, 64)).save(folder / "test" / "images" / "test_0.JPEG")
    return folder


def write_all(root: Path) -> Path:
    """Every fake dataset under ``root`` (MNIST in ``root/mnist``, Fashion-MNIST in ``root/fashion-mnist``)."""
    write_mnist(root / "mnist")
    write_mnist(root / "fashion-mnist")
    write_cifar10(root)
    write_cifar100(root)
    write_tinyimagenet(root)
    return root
