"""Endpoint training epoch: host DataLoader (baseline) vs device-resident batches, same run, same model.

    python benchmarks/train_loader.py --device cuda --root data      # GPU
    python benchmarks/train_loader.py --device cpu --subset 10000    # CPU

Prints seconds per epoch (second epoch, after warm-up) and the speed-up of device_resident=True over the baseline.
"""

from __future__ import annotations

import argparse
import time

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from lmc_lightning.data import FashionMNISTDataModule
from lmc_lightning.modules import EndpointModule, OptimConfig


class EpochTimer(Callback):
    """Wall time of each training epoch."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if pl_module.device.type == "cuda":
            import torch

            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self._start)


def epoch_seconds(resident: bool, args: argparse.Namespace, net: str, net_kwargs: dict) -> float:
    pl.seed_everything(0)
    data = FashionMNISTDataModule(root=args.root, batch_size=args.batch_size, train_subset=args.subset,
                                  device_resident=resident)
    model = EndpointModule(net=net, net_kwargs=net_kwargs, optim=OptimConfig(lr=0.05), seed=0)
    timer = EpochTimer()
    trainer = pl.Trainer(max_epochs=2, accelerator="gpu" if args.device == "cuda" else "cpu", devices=1,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[timer], limit_val_batches=0)
    trainer.fit(model, datamodule=data)
    return timer.times[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--root", default="data")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--subset", type=int, default=None)
    parser.add_argument("--nets", nargs="+", default=["mlp", "resnet20"], choices=["mlp", "resnet20"])
    args = parser.parse_args()
    print("| net | batch | DataLoader s/epoch | device-resident s/epoch | speed-up |")
    print("| --- | --- | --- | --- | --- |")
    settings = {"mlp": {"depth": 3, "width": 512}, "resnet20": {"width": 1}}
    for net in args.nets:
        kw = settings[net]
        base = epoch_seconds(False, args, net, kw)
        fast = epoch_seconds(True, args, net, kw)
        print(f"| {net} | {args.batch_size} | {base:.2f} | {fast:.2f} | {base / fast:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
