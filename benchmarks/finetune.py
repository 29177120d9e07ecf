"""Speed of a CBFT epoch against an FT epoch of FineTuneModule, same net, data and batch size; target <= 3.5x.

CBFT takes two optimiser steps per batch: a barrier step (one forward/backward of the interpolated net on a cue
batch) and an invariance step (forwards of the clean and the cue batch, one backward): about three passes to FT's one
(a faithful CPU implementation of the seed measured 2.9-3.5x). Both modules run through Lightning ``fit`` on the same
:class:`~lmc_lightning.data.cue.CueDataModule` (Fashion-MNIST with the box cue, device-resident batches), without
validation; an epoch is the clean loader (``n_clean / batch_size`` steps); the median over ``--epochs`` timed epochs
(after one warm-up epoch) is reported, FT and CBFT interleaved so noise hits both alike. CBFT runs with
``warmup_epochs=0`` so every timed step has the invariance term. ``--profile`` adds where CBFT's time goes (the
barrier step, the invariance step, data and Lightning overhead), from timers around the module's methods.

    OMP_NUM_THREADS=1 python benchmarks/finetune.py --quick            # CPU, tiny
    python benchmarks/finetune.py --device cuda --profile              # GPU
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from lmc_lightning.checkpoint import save_net
from lmc_lightning.data import CueDataModule
from lmc_lightning.modules.finetune import FineTuneModule
from lmc_lightning.nets import get_net


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class EpochTimer(Callback):
    """Wall seconds of every training epoch (device synchronised at both ends)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start = 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        _sync(module.device)
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        _sync(module.device)
        self.seconds.append(time.perf_counter() - self._start)


class ProfiledFineTune(FineTuneModule):
    """FineTuneModule with synchronised timers around the barrier loss, the clean/invariance loss and the steps."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.timings: dict[str, float] = defaultdict(float)
        self._phase = "barrier"

    def _timed(self, name: str, fn, *args, **kwargs):
        _sync(self.device)
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        _sync(self.device)
        self.timings[name] += time.perf_counter() - start
        return out

    def barrier_loss(self, *args, **kwargs):
        self._phase = "barrier"
        return self._timed("barrier forward", super().barrier_loss, *args, **kwargs)

    def clean_loss(self, *args, **kwargs):
        self._phase = "invariance" if self.method == "cbft" else "ft"
        return self._timed(f"{self._phase} forward", super().clean_loss, *args, **kwargs)

    def _step(self, opt, loss) -> None:
        self._timed(f"{self._phase} backward + step", super()._step, opt, loss)

    def training_step(self, batch, batch_idx):
        if self.method in ("ft", "lpft"):  # FT's forward happens inline; time the whole step
            self._phase = "ft"
            return self._timed("ft step", super().training_step, batch, batch_idx)
        return self._timed("training_step", super().training_step, batch, batch_idx)


def run(method: str, init: Path, args: argparse.Namespace, device: torch.device) -> tuple[list[float], dict]:
    data = CueDataModule(base="FashionMNISTDataModule",
                         base_args={"root": args.root, "batch_size": args.batch_size, "device_resident": True,
                                    "train_subset": args.train_subset})
    model = ProfiledFineTune(method=method, init=str(init), n_clean=args.n_clean, n_cue=args.n_clean * 4,
                             warmup_epochs=0)
    timer = EpochTimer()
    trainer = pl.Trainer(max_epochs=args.epochs + 1, accelerator=device.type, devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, callbacks=[timer], default_root_dir=args.tmp)
    trainer.fit(model, datamodule=data)
    return timer.seconds[1:], dict(model.timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--net", default="vgg13_mmc")
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--n-clean", type=int, default=2560, help="clean samples: an epoch is n_clean / batch")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per method (after one warm-up)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved FT/CBFT rounds")
    parser.add_argument("--train-subset", type=int, default=None)
    parser.add_argument("--root", default="data")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--quick", action="store_true", help="tiny sizes for a CPU smoke run")
    args = parser.parse_args()
    if args.quick:
        args.width, args.batch_size, args.n_clean, args.epochs, args.rounds = 0.0625, 64, 256, 2, 1
        args.train_subset = 2048
    device = torch.device(args.device)
    torch.manual_seed(0)
    spec = {"name": args.net, "num_classes": 10, "in_channels": 1, "input_size": 28, "width": args.width}
    with tempfile.TemporaryDirectory() as tmp:
        args.tmp = tmp
        kwargs = {k: v for k, v in spec.items() if k != "name"}
        init = save_net(Path(tmp) / "cue.ckpt", get_net(args.net, **kwargs).state_dict(), spec)
        epochs = {"ft": [], "cbft": []}
        timings = {"ft": defaultdict(float), "cbft": defaultdict(float)}
        for _ in range(args.rounds):
            for method in ("ft", "cbft"):
                secs, t = run(method, init, args, device)
                epochs[method] += secs
                for k, v in t.items():
                    timings[method][k] += v
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    steps = -(-args.n_clean // args.batch_size)
    print(f"# FineTuneModule epoch: CBFT vs FT on {name}; {args.net} width {args.width}, batch {args.batch_size}, "
          f"{steps} steps per epoch, median of {len(epochs['ft'])} epochs")
    ft, cbft = statistics.median(epochs["ft"]), statistics.median(epochs["cbft"])
    print(f"FT epoch   {ft * 1000:9.1f} ms  ({ft / steps * 1000:.1f} ms/step)")
    print(f"CBFT epoch {cbft * 1000:9.1f} ms  ({cbft / steps * 1000:.1f} ms/step)")
    print(f"ratio CBFT / FT: {cbft / ft:.2f}x (target <= 3.5x)")
    if args.profile:
        for method in ("ft", "cbft"):
            t = timings[method]
            step = t.pop("training_step", None) or t.pop("ft step")
            print(f"\n## where {method.upper()}'s training_step time goes (all epochs, warm-up included; "
                  f"{step:.3f} s in training_step)")
            for key, value in sorted(t.items(), key=lambda kv: -kv[1]):
                print(f"  {key:30s} {value:8.3f} s  {100 * value / step:5.1f}%")
            if t:
                rest = step - sum(t.values())
                print(f"  {'other (inline forward, t, logs)':30s} {rest:8.3f} s  {100 * rest / step:5.1f}%")

if __name__ == "__main__":
    main()
