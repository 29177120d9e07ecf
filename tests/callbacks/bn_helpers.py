"""A tiny BatchNorm LightningModule for callback tests (importable by DDP worker processes)."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmc_lightning.callbacks import BatchNormReset


def tiny_bn_net(seed: int = 0) -> nn.Sequential:
    """Conv(1->4, stride 2) -> BatchNorm -> ReLU -> Linear(10), seeded."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Conv2d(1, 4, 3, stride=2), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                             nn.Linear(4 * 13 * 13, 10))


def bn_input_moments(net: nn.Sequential, x: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and unbiased variance of the BatchNorm's input over ``x``, computed directly."""
    with torch.no_grad():
        h = net[0](x).double()
    return h.mean(dim=(0, 2, 3)), h.var(dim=(0, 2, 3), unbiased=True)


class TinyBNModule(pl.LightningModule):
    """Trains ``tiny_bn_net`` with plain SGD; with ``dump_dir`` each rank saves its BN buffers at the end of fit."""

    def __init__(self, lr: float = 0.0, seed: int = 0, dump_dir: str | None = None) -> None:
        super().__init__()
        self.net = tiny_bn_net(seed)
        self.lr = lr
        self.dump_dir = dump_dir

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val/loss", F.cross_entropy(self.net(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def on_train_end(self) -> None:
        if self.dump_dir is not None:
            bn = self.net[1]
            state = {"mean": bn.running_mean.detach().cpu().clone(), "var": bn.running_var.detach().cpu().clone()}
            torch.save(state, Path(self.dump_dir) / f"rank{self.global_rank}.pt")


class RecordingBatchNormReset(BatchNormReset):
    """BatchNormReset that also saves which samples this rank forwarded (``shard{rank}.pt`` in ``dump_dir``)."""

    def __init__(self, dump_dir: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.dump_dir = dump_dir

    def _shard(self, trainer: pl.Trainer) -> Tensor:
        shard = super()._shard(trainer)
        torch.save(shard.clone(), Path(self.dump_dir) / f"shard{trainer.global_rank}.pt")
        return shard
