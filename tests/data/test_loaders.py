"""Batch transforms, the sharded sampler and the device-resident loader (on the CPU device)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from fake_datasets import sample_ids

from lmc_lightning.data import BatchTransform, DeviceLoader, MNISTDataModule, ShardedSampler, random_crop, random_hflip


def test_random_crop_is_a_window_of_the_padded_image():
    x = torch.randint(1, 256, (64, 3, 8, 8), dtype=torch.uint8)
    out = random_crop(x, 2, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == torch.uint8
    padded = F.pad(x, (2, 2, 2, 2))
    offsets = []
    for i in range(len(x)):
        hits = [(r, c) for r in range(5) for c in range(5) if torch.equal(padded[i, :, r:r + 8, c:c + 8], out[i])]
        assert len(hits) == 1  # exactly one offset explains the crop (pixels are nonzero, padding is zero)
        offsets.append(hits[0])
    assert len(set(offsets)) > 10  # offsets drawn independently per image


def test_random_hflip_flips_about_half():
    x = torch.rand(400, 1, 4, 4)
    out = random_hflip(x, torch.Generator().manual_seed(0))
    same = (out == x).flatten(1).all(1)
    flipped = (out == x.flip(-1)).flatten(1).all(1)
    assert bool((same ^ flipped).all()) and 150 < int(flipped.sum()) < 250


def test_batch_transform_normalises_with_given_stats():
    x = torch.full((2, 3, 4, 4), 51, dtype=torch.uint8)  # 0.2
    out, _ = BatchTransform((0.1, 0.2, 0.3), (0.5, 0.25, 0.1))((x, torch.zeros(2)))
    assert torch.allclose(out[:, :, 0, 0], torch.tensor([0.2, 0.0, -1.0]).expand(2, 3), atol=1e-6)
    raw, _ = BatchTransform((0.1,) * 3, (0.5,) * 3, normalize=False)((x, torch.zeros(2)))
    assert torch.allclose(raw, torch.full_like(raw, 0.2))


@pytest.mark.parametrize(("n", "world", "drop"), [(103, 4, True), (103, 4, False), (10, 3, False), (2, 4, False)])
def test_sharded_sampler_disjoint_equal_shares(n, world, drop):
    shards = [ShardedSampler(n, shuffle=True, seed=5, rank=r, world_size=world, drop_uneven=drop).draw()
              for r in range(world)]
    sizes = {len(s) for s in shards}
    assert sizes == {n // world if drop else -(-n // world)}  # same number of samples (so batches) per rank
    union = torch.cat(shards)
    if drop:
        assert len(union.unique()) == len(union) == n - n % world  # disjoint; only the remainder dropped
    else:
        assert set(union.tolist()) == set(range(n)) and len(union) == len(shards) * len(shards[0])  # padded


def test_sharded_sampler_epochs_and_set_epoch():
    sampler = ShardedSampler(50, shuffle=True, seed=0)
    first, second = sampler.draw(), sampler.draw()
    assert not torch.equal(first, second) and torch.equal(first.sort().values, torch.arange(50))
    sampler.set_epoch(0)
    assert torch.equal(sampler.draw(), first)
    assert torch.equal(torch.tensor(list(ShardedSampler(7))), torch.arange(7))  # no shuffle: in order


def test_device_loader_yields_each_sample_once_per_epoch(fake_data_root):
    dm = MNISTDataModule(root=str(fake_data_root), batch_size=48, normalize=False, device_resident=True, val_split=0.1)
    dm.setup()
    loader = dm.train_dataloader()
    assert isinstance(loader, DeviceLoader) and len(loader) == 4  # 180 samples
    expected = sample_ids(dm.split_tensors("train")[0])
    orders = []
    for _ in range(2):
        batches = list(loader)
        assert [len(y) for _, y in batches] == [48, 48, 48, 36]
        ids = torch.cat([sample_ids(x) for x, _ in batches])
        labels = torch.cat([y for _, y in batches])
        assert torch.equal(ids.sort().values, expected)
        assert torch.equal(labels, ids % 10)  # images stay with their labels
        orders.append(ids)
    assert not torch.equal(orders[0], orders[1])
    again = MNISTDataModule(root=str(fake_data_root), batch_size=48, normalize=False, device_resident=True,
                            val_split=0.1)
    again.setup()
    assert torch.equal(torch.cat([sample_ids(x) for x, _ in again.train_dataloader()]), orders[0])  # seeded
    val = torch.cat([sample_ids(x) for x, _ in dm.val_dataloader()])
    assert torch.equal(val, sample_ids(dm.split_tensors("val")[0]))  # eval: in order, unshuffled


def test_device_loader_augments_and_normalises_like_split_tensors(fake_data_root):
    dm = MNISTDataModule(root=str(fake_data_root), batch_size=200, device_resident=True, augment=True)
    dm.setup()
    x, y = next(iter(dm.train_dataloader()))
    reference, ref_y = dm.split_tensors("train")
    assert x.shape == reference.shape
    background = float(reference.min())
    assert abs(float(x.min()) - background) < 1e-6  # zero padding maps to the normalised zero pixel
    plain = MNISTDataModule(root=str(fake_data_root), batch_size=200, device_resident=True)
    plain.setup()
    xp, yp = next(iter(plain.train_dataloader()))
    assert torch.equal(yp, ref_y[sample_ids(xp * 0.3081 + 0.1307)])
    assert torch.allclose(xp, reference[sample_ids(xp * 0.3081 + 0.1307)], atol=1e-5)
    assert (x - xp).abs().flatten(1).amax(1).gt(1e-6).float().mean() > 0.9  # same order, pixels moved
