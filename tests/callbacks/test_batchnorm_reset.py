"""BatchNormReset: exact statistics on a seeded training subset, the same under 2-process CPU DDP."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from bn_helpers import RecordingBatchNormReset, TinyBNModule, bn_input_moments, tiny_bn_net

from lmc_lightning.callbacks import BatchNormReset
from lmc_lightning.data import FashionMNISTDataModule
from lmc_lightning.weights.evaluate import seeded_subset

NUM_BATCHES, BATCH_SIZE = 4, 32
DDP = "ddp_spawn" if torch.cuda.is_initialized() else "ddp_fork"  # fork is fast but impossible after CUDA init


def _expected(root: Path, val_split: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased variance of the BN input over the subset a single process would use."""
    dm = FashionMNISTDataModule(root=str(root), val_split=val_split)
    dm.setup("fit")
    x, _ = seeded_subset(dm.split_tensors("train"), NUM_BATCHES * BATCH_SIZE, seed=0)
    return bn_input_moments(tiny_bn_net(0), x)


def _trainer(tmp_path: Path, callback: BatchNormReset, **kwargs) -> pl.Trainer:
    kwargs.setdefault("accelerator", "cpu")
    return pl.Trainer(max_epochs=1, limit_train_batches=2, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                      callbacks=[callback], **kwargs)


def test_single_process_reset_gives_exact_statistics(fake_fmnist_root: Path, tmp_path: Path) -> None:
    mean, var = _expected(fake_fmnist_root, val_split=32)
    model = TinyBNModule(lr=0.0)  # weights stay at their seeded init, so the expected moments apply
    callback = BatchNormReset(on="validation_start", num_batches=NUM_BATCHES, batch_size=BATCH_SIZE)
    data = FashionMNISTDataModule(root=str(fake_fmnist_root), batch_size=32, val_split=32)
    _trainer(tmp_path, callback, limit_val_batches=1, num_sanity_val_steps=0).fit(model, datamodule=data)
    bn = model.net[1]
    torch.testing.assert_close(bn.running_mean.double(), mean, atol=1e-5, rtol=0)
    torch.testing.assert_close(bn.running_var.double(), var, atol=1e-5, rtol=1e-5)
    assert callback.num_resets == 1 and callback.state_dict() == {"num_resets": 1, "last_step": 2}
    restored = BatchNormReset(on="validation_start")
    restored.load_state_dict(callback.state_dict())
    assert restored.num_resets == 1 and restored.last_step == 2


@pytest.mark.cpu_ddp
def test_ddp_two_processes_equal_single_process(fake_fmnist_root: Path, tmp_path: Path) -> None:
    """Each rank forwards half of the subset; the all-reduced statistics equal the whole subset's on both ranks."""
    mean, var = _expected(fake_fmnist_root)
    model = TinyBNModule(lr=0.0, dump_dir=str(tmp_path))
    callback = RecordingBatchNormReset(str(tmp_path), on="train_epoch_end", num_batches=NUM_BATCHES,
                                       batch_size=BATCH_SIZE)
    data = FashionMNISTDataModule(root=str(fake_fmnist_root), batch_size=32)
    trainer = _trainer(tmp_path, callback, strategy=DDP, devices=2)
    trainer.fit(model, datamodule=data)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        torch.testing.assert_close(got["mean"].double(), mean, atol=1e-5, rtol=0)
        torch.testing.assert_close(got["var"].double(), var, atol=1e-5, rtol=1e-5)
        # This rank forwarded half of the subset, whose statistics alone are clearly different.
        shard = torch.load(tmp_path / f"shard{rank}.pt", weights_only=True)
        assert len(shard) == NUM_BATCHES * BATCH_SIZE // 2
        half_mean, _ = bn_input_moments(tiny_bn_net(0), shard)
        assert (half_mean - mean).abs().max() > 1e-3


def test_bad_arguments_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="on must be"):
        BatchNormReset(on="epoch")
    with pytest.raises(ValueError, match="num_batches"):
        BatchNormReset(num_batches=0)
    with pytest.raises(ValueError, match="nets is empty"):
        BatchNormReset(nets=[])
