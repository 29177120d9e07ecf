"""Datamodules on tiny fake files in the real formats, plus real Fashion-MNIST from the Debian package."""

from __future__ import annotations

import gzip
from pathlib import Path

import lightning as L
import pytest
import torch
from fake_datasets import MNIST_FILES, sample_ids, write_cifar10, write_mnist, write_tinyimagenet
from torch import nn

from lmc_lightning.data import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    FashionMNISTDataModule,
    MNISTDataModule,
    TinyImageNetDataModule,
)
from lmc_lightning.data.tinyimagenet import restructure_val

# class, num_classes, input_shape, train size, test size, augment default
MODULES = [
    (MNISTDataModule, 10, (1, 28, 28), 200, 50, False),
    (FashionMNISTDataModule, 10, (1, 28, 28), 200, 50, False),
    (CIFAR10DataModule, 10, (3, 32, 32), 200, 50, True),
    (CIFAR100DataModule, 100, (3, 32, 32), 300, 100, True),
    (TinyImageNetDataModule, 200, (3, 64, 64), 400, 200, True),
]
ID_MODULES = [MNISTDataModule, FashionMNISTDataModule, CIFAR10DataModule, CIFAR100DataModule]  # lossless fakes


def _setup(cls, root: Path, **kwargs):
    dm = cls(root=str(root), **kwargs)
    dm.prepare_data()
    dm.setup("fit")
    return dm


@pytest.mark.parametrize(("cls", "num_classes", "shape", "n_train", "n_test", "augment"), MODULES)
def test_shapes_and_attributes(cls, num_classes, shape, n_train, n_test, augment, fake_data_root):
    dm = cls(root=str(fake_data_root))
    assert (dm.num_classes, dm.input_shape, dm.augment) == (num_classes, shape, augment)  # before setup: CLI links
    dm.setup()
    x, y = dm.split_tensors("train")
    xt, yt = dm.split_tensors("test")
    assert x.shape == (n_train, *shape) and xt.shape == (n_test, *shape)
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.device.type == "cpu"
    assert set(y.tolist()) == set(range(num_classes)) and int(yt.max()) == num_classes - 1
    xb, yb = next(iter(dm.test_dataloader()))
    assert xb.shape == (min(dm.eval_batch_size, n_test), *shape) and yb.dtype == torch.int64


@pytest.mark.parametrize("cls", ID_MODULES)
def test_pixels_and_labels_read_exactly(cls, fake_data_root):
    dm = _setup(cls, fake_data_root, normalize=False)
    x, y = dm.split_tensors("train")
    assert torch.equal(sample_ids(x), torch.arange(len(x)))
    assert torch.equal(y, torch.arange(len(x)) % dm.num_classes)
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0 and float(x.max()) > 0.99


def test_val_split_fraction_count_and_seed(fake_data_root):
    ids = {}
    for val_split, seed in ((0.25, 0), (0.25, 0), (0.25, 1), (30, 0)):
        dm = _setup(MNISTDataModule, fake_data_root, val_split=val_split, seed=seed, normalize=False)
        train, val = sample_ids(dm.split_tensors("train")[0]), sample_ids(dm.split_tensors("val")[0])
        assert len(val) == (50 if val_split == 0.25 else 30) and len(train) + len(val) == 200
        assert torch.equal(torch.cat([train, val]).sort().values, torch.arange(200))  # disjoint, complete
        ids[(val_split, seed, len(ids))] = val
    runs = list(ids.values())
    assert torch.equal(runs[0], runs[1])  # same seed -> same hold-out
    assert not torch.equal(runs[0], runs[2])  # another seed -> another hold-out
    assert len(dm.val_dataloader().dataset) == 30


def test_no_val_split(fake_data_root):
    dm = _setup(MNISTDataModule, fake_data_root)
    assert dm.val_dataloader() == []
    with pytest.raises(ValueError, match="val_split"):
        dm.split_tensors("val")


def test_train_subset_first_and_random(fake_data_root):
    def subset(**kwargs):
        dm = _setup(CIFAR10DataModule, fake_data_root, val_split=20, normalize=False, **kwargs)
        return sample_ids(dm.split_tensors("train")[0]), sample_ids(dm.split_tensors("val")[0])

    full, val = subset()
    first, val_first = subset(train_subset=50)
    rand_a, val_a = subset(train_subset=50, subset_mode="random")
    rand_b, _ = subset(train_subset=50, subset_mode="random")
    rand_c, _ = subset(train_subset=50, subset_mode="random", seed=3)
    assert torch.equal(first, full[:50])  # first k of the remaining training samples, in file order
    assert torch.equal(val, val_first) and torch.equal(val, val_a)  # the hold-out does not depend on the subset
    assert len(rand_a) == 50 and len(set(rand_a.tolist()) - set(full.tolist())) == 0
    assert torch.equal(rand_a, rand_b) and not torch.equal(rand_a, rand_c) and not torch.equal(rand_a, first)
    assert rand_a.max() > 100  # drawn across the whole set, not the start


def test_bad_arguments_are_named(fake_data_root):
    with pytest.raises(ValueError, match="val_split"):
        MNISTDataModule(val_split=1.5)
    with pytest.raises(ValueError, match="train_subset"):
        MNISTDataModule(train_subset=0)
    with pytest.raises(ValueError, match="val_split=200"):
        _setup(MNISTDataModule, fake_data_root, val_split=200)
    with pytest.raises(ValueError, match="train_subset=190"):
        _setup(MNISTDataModule, fake_data_root, val_split=20, train_subset=190)
    with pytest.raises(RuntimeError, match="setup"):
        MNISTDataModule(root=str(fake_data_root)).split_tensors("train")
    with pytest.raises(ValueError, match="split must be one of"):
        _setup(MNISTDataModule, fake_data_root).split_tensors("training")


def test_real_fashion_mnist_debian_fallback_and_normalisation(tmp_path, fmnist_dir):
    dm = FashionMNISTDataModule(root=str(tmp_path))  # nothing in root: falls back to the Debian package
    assert dm.find_folder() == fmnist_dir
    dm.setup()
    x, y = dm.split_tensors("train")
    xt, _ = dm.split_tensors("test")
    assert x.shape == (60_000, 1, 28, 28) and xt.shape == (10_000, 1, 28, 28)
    assert abs(float(x.mean())) < 0.01 and abs(float(x.std()) - 1) < 0.01
    assert torch.bincount(y).tolist() == [6000] * 10


@pytest.mark.parametrize(("cls", "hint"), [
    (MNISTDataModule, "download=True"),
    (FashionMNISTDataModule, "apt-get install dataset-fashion-mnist"),
    (CIFAR10DataModule, "cifar-10-batches-py"),
    (CIFAR100DataModule, "cifar-100-python"),
    (TinyImageNetDataModule, "tiny-imagenet-200"),
])
def test_missing_data_error_names_path_and_remedy(cls, hint, tmp_path, monkeypatch):
    monkeypatch.setattr(FashionMNISTDataModule, "system_folders", ())
    dm = cls(root=str(tmp_path / "nowhere"))
    dm.prepare_data()  # download=False: does nothing
    with pytest.raises(FileNotFoundError) as info:
        dm.setup()
    assert str(tmp_path / "nowhere") in str(info.value) and hint in str(info.value) and "download=True" in str(
        info.value)


def test_corrupt_files_give_clear_errors(tmp_path):
    write_mnist(tmp_path / "mnist")
    (tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz.*re-download"):
        MNISTDataModule(root=str(tmp_path)).setup()
    with gzip.open(tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(b"\x00\x00\x08\x03" + b"\x00" * 20)  # valid header, truncated body
    with pytest.raises(ValueError, match="truncated"):
        MNISTDataModule(root=str(tmp_path)).setup()

    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="data_batch_3 is not a valid CIFAR batch"):
        CIFAR10DataModule(root=str(tmp_path)).setup()

    folder = write_tinyimagenet(tmp_path)
    bad = next((folder / "train").rglob("*.JPEG"))
    bad.write_bytes(b"\xff\xd8 broken")
    with pytest.raises(ValueError, match=bad.name):
        TinyImageNetDataModule(root=str(tmp_path)).setup()


def test_tinyimagenet_val_restructured_once(tmp_path):
    folder = write_tinyimagenet(tmp_path, train_per_class=1, val_per_class=2)
    annotations = dict(line.split("\t")[:2] for line in (folder / "val/val_annotations.txt").read_text().splitlines())
    TinyImageNetDataModule(root=str(tmp_path)).prepare_data()
    assert not (folder / "val" / "images").exists()
    for name, wnid in annotations.items():
        assert (folder / "val" / wnid / name).is_file()
    assert restructure_val(folder) is False  # nothing left to move
    raw = _setup(TinyImageNetDataModule, tmp_path, normalize=False)
    raw_test, test_labels = raw.split_tensors("test")
    raw_train, train_labels = raw.split_tensors("train")
    assert torch.bincount(test_labels).tolist() == [2] * 200
    # val images of class c are grey level c + 1, train ones level c: labels follow the sorted wnids everywhere
    assert torch.allclose(raw_test.mean((1, 2, 3)) * 255, test_labels.float() + 1, atol=1.5)
    assert torch.allclose(raw_train.mean((1, 2, 3)) * 255, train_labels.float(), atol=1.5)


@pytest.mark.parametrize("cls", [CIFAR10DataModule, TinyImageNetDataModule])
def test_augmentation_changes_pixels_not_shape(cls, fake_data_root):
    dm = _setup(cls, fake_data_root, batch_size=64, seed=0)
    plain = _setup(cls, fake_data_root, batch_size=64, seed=0, augment=False)
    xa, ya = next(iter(dm.train_dataloader()))
    xp, yp = next(iter(plain.train_dataloader()))
    assert torch.equal(ya, yp) and xa.shape == xp.shape == (64, *dm.input_shape)
    changed = (xa - xp).abs().flatten(1).amax(1) > 1e-6
    assert changed.float().mean() > 0.7  # 1/(2p+1)^2/2 of crops+flips are the identity
    assert torch.equal(plain.split_tensors("train")[0][:5], dm.split_tensors("train")[0][:5])  # never augmented


def test_download_fetches_files_into_root(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tv_utils

    calls = []

    def fake_download_url(url, root, filename=None, md5=None):
        calls.append(url)
        if "ossci" in url:
            raise OSError("mirror down")
        Path(root).mkdir(parents=True, exist_ok=True)
        write_mnist(tmp_path / "staging")
        (Path(root) / filename).write_bytes((tmp_path / "staging" / filename).read_bytes())

    monkeypatch.setattr(tv_utils, "download_url", fake_download_url)
    dm = MNISTDataModule(root=str(tmp_path / "d"), download=True)
    dm.prepare_data()
    assert len(calls) == 8 and all(name in " ".join(calls) for name in MNIST_FILES)  # second mirror after the first
    assert sorted(p.name for p in (tmp_path / "d" / "mnist").iterdir()) == sorted(MNIST_FILES)
    dm.prepare_data()  # present now: nothing fetched
    assert len(calls) == 8
    dm.setup()
    assert dm.split_tensors("train")[0].shape == (200, 1, 28, 28)

    def fake_archive(url, download_root, md5=None):
        calls.append(url)
        write_cifar10(Path(download_root))

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", fake_archive)
    CIFAR10DataModule(root=str(tmp_path / "d"), download=True).prepare_data()
    assert calls[-1].endswith("cifar-10-python.tar.gz") and (tmp_path / "d/cifar-10-batches-py/test_batch").is_file()


def test_dataloader_covers_train_once_with_workers(fake_data_root):
    dm = _setup(MNISTDataModule, fake_data_root, batch_size=32, num_workers=1, normalize=False, val_split=0.1)
    loader = dm.train_dataloader()
    assert loader.persistent_workers
    for _ in range(2):
        seen = torch.cat([sample_ids(x) for x, _ in loader])
        assert torch.equal(seen.sort().values, sample_ids(dm.split_tensors("train")[0]))


class _Recorder(L.LightningModule):
    def __init__(self, input_dim: int) -> None:
        super().__init__()
        self.net = nn.Linear(input_dim, 10)
        self.batches: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.batches.append(x[:, 0, 0, :2].detach().clone())
        return nn.functional.cross_entropy(self.net(x.flatten(1)), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_device_resident_under_trainer(fake_data_root):
    dm = MNISTDataModule(root=str(fake_data_root), batch_size=64, normalize=False, device_resident=True, val_split=8)
    model = _Recorder(784)
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, dm)
    per_epoch = len(model.batches) // 2
    epochs = [torch.cat(model.batches[i * per_epoch:(i + 1) * per_epoch]) for i in range(2)]
    ids = [(e[:, 0] * 255).round().long() + 256 * (e[:, 1] * 255).round().long() for e in epochs]
    expected = sample_ids(dm.split_tensors("train")[0])
    for epoch_ids in ids:
        assert torch.equal(epoch_ids.sort().values, expected)  # every sample exactly once per epoch
    assert not torch.equal(ids[0], ids[1])  # reshuffled between epochs


def test_resident_batches_skip_the_transfer_walk(fake_data_root, monkeypatch):
    """An (x, y) batch already on the device comes back as the same tensors without Lightning's transfer; other
    batches (a dict, a batch of another device) still go through it."""
    dm = MNISTDataModule(root=str(fake_data_root), device_resident=True)
    calls = []
    monkeypatch.setattr(L.LightningDataModule, "transfer_batch_to_device",
                        lambda self, batch, device, idx: calls.append(batch) or batch)
    x, y = torch.zeros(2, 1, 28, 28), torch.zeros(2, dtype=torch.long)
    for batch in ((x, y), [x, y]):
        out = dm.transfer_batch_to_device(batch, torch.device("cpu"), 0)
        assert out is batch and out[0] is x and not calls
    other = {"x": x}
    assert dm.transfer_batch_to_device(other, torch.device("cpu"), 0) is other and calls == [other]
    dm.transfer_batch_to_device((x, y), torch.device("meta"), 0)
    assert len(calls) == 2


def test_device_resident_fit_with_validation(fake_data_root):
    """An EndpointModule trains and validates (incl. Lightning's sanity check) on device-resident batches."""
    from lmc_lightning.modules import EndpointModule

    dm = MNISTDataModule(root=str(fake_data_root), batch_size=16, device_resident=True, val_split=16)
    model = EndpointModule(net="mlp", net_kwargs={"depth": 1, "width": 8}, input_shape=dm.input_shape)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=2, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, dm)
    assert {"train/loss_epoch", "val/loss", "val/acc"} <= set(trainer.callback_metrics)
