"""Endpoint training speed: ``EndpointModule`` under Lightning against a hand-written loop, same run, same data.

Every variant trains on the same device-resident Fashion-MNIST batches (``device_resident=True``; random images of
the same shape with ``--synthetic``), batch 128, SGD with momentum and weight decay, and is timed on its second
epoch (the first one warms up). Rounds are interleaved and the best of ``--repeats`` is kept.

* ``hand``: ``for x, y in loader: loss = F.cross_entropy(net(x), y); opt.zero_grad(); loss.backward(); opt.step()``
  (under ``torch.autocast`` for bf16), over the same :class:`~lmc_lightning.data.loaders.DeviceLoader` batches.
* ``module``: ``EndpointModule`` in ``Trainer.fit`` (no logger or progress bar, as the hand loop has none).
* ``chunks``: the same with the datamodule's ``steps_per_batch = --steps-per-batch`` (``S`` batches per Lightning
  batch, one optimiser step each: the same training bit for bit, Lightning's per-batch work once per ``S`` steps).
* ``module, CLI defaults``: the same with a CSV logger and the progress bar (refreshed every
  ``PROGRESS_REFRESH_RATE`` batches), as ``lmc fit`` runs it.
* ``automatic opt.``: the module under Lightning's automatic optimisation (its closure and per-step hooks).
* ``Lightning update``: the module with its update sent through ``manual_backward`` and Lightning's optimiser
  wrapper (``EndpointModule.direct_update = False``), the default until issue 18's second round.
* ``before``: the module as it was (torchmetrics accuracy and ``self.log`` on every step), for the record.

Prints a ratio table (module / hand; target <= 1.2), a breakdown of the module's host time per step (cProfile) and
the share of the step the GPU is busy (torch.profiler), and, with ``--zoo``, zoo throughput against sequential runs.
Times are per optimiser step. ``--budget`` bounds the run: fp32 rows first, then the zoo table, then the bf16 rows;
what does not fit is printed as skipped.

    python benchmarks/train_step.py --device cuda                     # GPU: all nets, fp32, bf16, channels_last
    python benchmarks/train_step.py --device cuda --no-profile --variants cli --zoo 4 16 64 --budget 180  # item 1+3
    python benchmarks/train_step.py --device cpu --quick              # CPU smoke run
"""

from __future__ import annotations

import argparse
import cProfile
import inspect
import pstats
import tempfile
import time
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, TQDMProgressBar
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy

from lmc_lightning.cli import PROGRESS_REFRESH_RATE
from lmc_lightning.data import FashionMNISTDataModule
from lmc_lightning.data.base import BaseDataModule
from lmc_lightning.data.loaders import DeviceLoader, ShardedSampler
from lmc_lightning.modules import EndpointModule, OptimConfig
from lmc_lightning.weights.stacked import StackedNets

NETS: dict[str, tuple[str, dict[str, Any]]] = {
    "mlp": ("mlp", {"depth": 3, "width": 512}),
    "resnet20": ("resnet20", {"width": 1}),
    "resnet20x4": ("resnet20", {"width": 4}),
    "vgg11_bn": ("vgg11_bn", {"width": 1}),
}
LABELS = {"mlp": "MLP 3x512", "resnet20": "ResNet-20 x1", "resnet20x4": "ResNet-20 x4", "vgg11_bn": "VGG-11-BN"}
OPTIM = OptimConfig(lr=0.01, momentum=0.9, weight_decay=5e-4, scheduler="cosine")


class RandomImages(BaseDataModule):
    """Random 1x28x28 images and labels (``--synthetic``): Fashion-MNIST's shape without the files."""

    num_classes = 10
    input_shape = (1, 28, 28)
    mean = (0.5,)
    std = (0.25,)

    def _load(self) -> dict[str, tuple[Tensor, Tensor]]:
        g = torch.Generator().manual_seed(0)
        make = lambda n: (torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=g),  # noqa: E731
                          torch.randint(0, 10, (n,), generator=g))
        return {"train": make(60_000), "test": make(1000)}


class EpochTimer(Callback):
    """Wall time of each training epoch (synchronised)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _sync(pl_module.device)
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _sync(pl_module.device)
        self.times.append(time.perf_counter() - self._start)


class LastEpochProfile(Callback):
    """Run a profiler (``cProfile`` or ``torch.profiler``) over the last training epoch."""

    def __init__(self, kind: str) -> None:
        self.kind, self.result, self.wall = kind, None, 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch != trainer.max_epochs - 1:
            return
        _sync(pl_module.device)
        self.prof = _start_profile(self.kind)
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch != trainer.max_epochs - 1:
            return
        _sync(pl_module.device)
        self.wall = time.perf_counter() - self._start
        self.result = _stop_profile(self.kind, self.prof)


class AutomaticStep(EndpointModule):
    """EndpointModule under Lightning's automatic optimisation (closure, per-step optimiser hooks)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.automatic_optimization = True


class LightningUpdate(EndpointModule):
    """EndpointModule with every update through ``manual_backward`` and Lightning's optimiser wrapper."""

    direct_update = False


class Before(EndpointModule):
    """EndpointModule's training step before this benchmark: MulticlassAccuracy and ``self.log`` every step,
    automatic optimisation."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.automatic_optimization = True
        self.acc_before = MulticlassAccuracy(self.num_classes, average="micro")

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self.classification_step(self.net, *batch, self.acc_before, "train")

    def on_train_epoch_end(self) -> None:
        pass


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _start_profile(kind: str) -> Any:
    if kind == "cprofile":
        prof = cProfile.Profile()
        prof.enable()
        return prof
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    prof = torch.profiler.profile(activities=activities)
    prof.__enter__()
    return prof


def _stop_profile(kind: str, prof: Any) -> Any:
    if kind == "cprofile":
        prof.disable()
        return pstats.Stats(prof)
    prof.__exit__(None, None, None)
    return prof


_DATA: dict[tuple, BaseDataModule] = {}


def make_data(args: argparse.Namespace, steps_per_batch: int = 1) -> BaseDataModule:
    """One datamodule per setting (the files are read once; the device copy is remade per fit)."""
    key = (args.synthetic, args.root, args.batch_size, args.subset)
    if key not in _DATA:
        cls = RandomImages if args.synthetic else FashionMNISTDataModule
        _DATA[key] = cls(root=args.root, batch_size=args.batch_size, train_subset=args.subset, device_resident=True)
    data = _DATA[key]
    data.steps_per_batch = steps_per_batch
    return data


def hand_loader(data: BaseDataModule, device: torch.device, seed: int = 0) -> DeviceLoader:
    """The same device-resident batches as the datamodule gives the Trainer."""
    data.setup("fit")
    x, y = data._get("train")
    sampler = ShardedSampler(len(x), shuffle=True, seed=seed, drop_uneven=True)
    return DeviceLoader(x.to(device), y.to(device), data.batch_size, sampler,
                        data._transform(augment=False).to(device), seed=seed)


def hand_seconds(key: str, args: argparse.Namespace, device: torch.device, precision: str, channels_last: bool,
                 fused: bool = False) -> float:
    """Seconds per step of the second epoch of a hand-written loop."""
    name, kwargs = NETS[key]
    module = EndpointModule(net=name, net_kwargs=kwargs, seed=0, channels_last=channels_last)
    net = module.net.to(device).train()
    extra = {"fused": True} if fused else {}
    opt = torch.optim.SGD(net.parameters(), lr=OPTIM.lr, momentum=OPTIM.momentum, weight_decay=OPTIM.weight_decay,
                          **extra)
    loader = hand_loader(make_data(args), device)
    bf16 = precision == "bf16-mixed"
    conv = module.channels_last
    times = []
    for _ in range(2):
        _sync(device)
        start = time.perf_counter()
        for x, y in loader:
            if conv:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        _sync(device)
        times.append((time.perf_counter() - start) / len(loader))
    return times[-1]


def fit_seconds(build: Callable[[], pl.LightningModule], args: argparse.Namespace, device: torch.device,
                precision: str, cli_defaults: bool = False, profile: str | None = None,
                epochs: int = 2, steps_per_batch: int = 1) -> tuple[float, Any]:
    """Seconds per optimiser step of the last ``fit`` epoch, and the profile of that epoch if asked for."""
    pl.seed_everything(0, verbose=False)
    data = make_data(args, steps_per_batch)
    timer = EpochTimer()
    callbacks: list[Callback] = [timer]
    prof = LastEpochProfile(profile) if profile else None
    if prof:
        callbacks.append(prof)
    if cli_defaults:  # the progress bar as `lmc fit` sets it up
        callbacks.append(TQDMProgressBar(refresh_rate=PROGRESS_REFRESH_RATE))
    model = build()
    tmp = tempfile.mkdtemp()
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, precision=precision,
        logger=pl.loggers.CSVLogger(tmp) if cli_defaults else False, enable_progress_bar=cli_defaults,
        enable_checkpointing=False, enable_model_summary=False, callbacks=callbacks, limit_val_batches=0,
        default_root_dir=tmp,
    )
    trainer.fit(model, datamodule=data)
    return timer.times[-1] / (trainer.global_step // epochs), prof


def endpoint(key: str, channels_last: bool = False, cls: type = EndpointModule, **extra: Any
             ) -> Callable[[], pl.LightningModule]:
    name, kwargs = NETS[key]
    return lambda: cls(net=name, net_kwargs=kwargs, optim=OPTIM, seed=0, channels_last=channels_last, **extra)


# Ratio table --------------------------------------------------------------------------------------------------------

def settings(args: argparse.Namespace, key: str) -> list[tuple[str, str, bool]]:
    """(label, precision, channels_last) combinations measured for a net."""
    out = [("fp32", "32-true", False)]
    if "bf16" in args.precisions:
        out.append(("bf16-mixed", "bf16-mixed", False))
        if key != "mlp" and args.channels_last:
            out.append(("bf16-mixed + channels_last", "bf16-mixed", True))
    return out


def measure(variant: str, key: str, args: argparse.Namespace, device: torch.device, precision: str,
            channels_last: bool) -> float:
    """Seconds per step of one variant of the ratio table."""
    if variant == "hand":
        return hand_seconds(key, args, device, precision, channels_last)
    cls = {"module": EndpointModule, "chunks": EndpointModule, "cli": EndpointModule, "auto": AutomaticStep,
           "before": Before, "lightning": LightningUpdate}[variant]
    chunk = args.steps_per_batch if variant == "chunks" else 1
    return fit_seconds(endpoint(key, channels_last, cls), args, device, precision, cli_defaults=variant == "cli",
                       steps_per_batch=chunk)[0]


def ratio_table(args: argparse.Namespace, device: torch.device, rows: str = "fp32") -> None:
    """The fp32 rows (``rows="fp32"``) or the bf16-mixed / channels_last rows (``rows="other"``) of the table."""
    extra = {"cli": "module, CLI defaults", "lightning": "Lightning update", "auto": "automatic opt.",
             "before": "before"}
    extra = {k: v for k, v in extra.items() if k in args.variants}
    chunk = args.steps_per_batch
    if rows == "fp32":
        print("\n## Per optimiser step: EndpointModule (Lightning fit) vs a hand-written loop, same device-resident "
              f"data; 'chunks': datamodule steps_per_batch={chunk}")
    print("| net | setting | hand ms | module ms | module / hand | chunks ms | chunks / hand | "
          + " | ".join(f"{label} / hand" for label in extra.values()) + " |")
    print("| --- | --- | --- | --- | --- | --- | --- |" + " --- |" * len(extra))
    for key in args.nets:
        for label, precision, cl in settings(args, key):
            if (label == "fp32") != (rows == "fp32"):
                continue
            if time.perf_counter() > args.deadline:
                print(f"| {LABELS[key]} | {label} | (skipped: time budget) |")
                continue
            best: dict[str, float] = {}
            variants = ["hand", "module", "chunks"] + (list(extra) if label == "fp32" else [])
            for _ in range(args.repeats):
                for name in variants:
                    best[name] = min(best.get(name, float("inf")), measure(name, key, args, device, precision, cl))
            hand = best["hand"]
            ratio = [f"{best[k] / hand:.2f}x" if k in best else "-" for k in extra]
            print(f"| {LABELS[key]} | {label} | {hand * 1e3:.2f} | {best['module'] * 1e3:.2f} | "
                  f"{best['module'] / hand:.2f}x | {best['chunks'] * 1e3:.2f} | {best['chunks'] / hand:.2f}x | "
                  + " | ".join(ratio) + " |", flush=True)


# Profile breakdown --------------------------------------------------------------------------------------------------

BUCKETS = {  # (file fragment, function) whose cumulative time forms a bucket; nested ones are subtracted below
    "data (next batch)": [("loops/fetchers.py", "__next__")],
    "forward + loss": [("modules/endpoint.py", "_step"), ("train_step.py", "training_step")],
    "metric update + self.log": [("metrics/totals.py", "accumulate"), ("core/module.py", "log"),
                                 ("torchmetrics/metric.py", "forward")],
    "backward": [("torch/_tensor.py", "backward")],
    "zero_grad": [("torch/optim/optimizer.py", "zero_grad")],
    "optimizer.step (+ closure)": [("torch/optim/optimizer.py", "wrapper")],
    "lr scheduler": [("torch/optim/lr_scheduler.py", "step")],
}


def _cum(stats: pstats.Stats, file_part: str, func: str) -> float:
    return sum(v[3] for (f, _, fn), v in stats.stats.items() if file_part in f and fn == func)


def profile_breakdown(args: argparse.Namespace, device: torch.device) -> None:
    """Host time per step of the module (cProfile), and GPU busy share of module and hand loop (torch.profiler)."""
    key = args.profile_net
    print(f"\n## Where the module's step time goes ({LABELS[key]}, fp32, one epoch under cProfile; host ms/step)")
    rows = []
    for label, cls in (("now", EndpointModule), ("before", Before)):
        _, prof = fit_seconds(endpoint(key, cls=cls), args, device, "32-true", profile="cprofile")
        stats, steps = prof.result, args.subset // args.batch_size
        parts = {name: sum(_cum(stats, f, fn) for f, fn in spec) for name, spec in BUCKETS.items()}
        # Nested: training_step holds the metric update and self.log; optimizer.step runs the closure (the
        # training step, backward and zero_grad).
        parts["forward + loss"] -= parts["metric update + self.log"]
        parts["optimizer.step (+ closure)"] -= _cum(stats, "optimization/automatic.py", "closure")
        parts = {"optimizer.step" if k.startswith("optimizer") else k: v for k, v in parts.items()}
        parts["Lightning loop, hooks, rest"] = prof.wall - sum(parts.values())
        rows.append((label, prof.wall / steps, {k: v / steps for k, v in parts.items()}))
    names = list(rows[0][2])
    print("| part | " + " | ".join(f"{label} ms" for label, _, _ in rows) + " |")
    print("| --- |" + " --- |" * len(rows))
    for name in names:
        print(f"| {name} | " + " | ".join(f"{r[2][name] * 1e3:.3f}" for r in rows) + " |")
    print("| total (profiled, wall) | " + " | ".join(f"{r[1] * 1e3:.3f}" for r in rows) + " |")
    if device.type != "cuda":
        return
    print("\nGPU busy share of the step (kernel time / wall time over one epoch, torch.profiler):")
    for label, cls in (("module", EndpointModule), ("before", Before)):
        _, prof = fit_seconds(endpoint(key, cls=cls), args, device, "32-true", profile="torch")
        kernel_us = sum(e.self_device_time_total for e in prof.result.key_averages())
        syncs = sum(e.count for e in prof.result.key_averages() if "Synchronize" in e.key)
        print(f"  {label}: {kernel_us / 1e6 / prof.wall:.0%} busy; {syncs / (args.subset // args.batch_size):.1f} "
              "CUDA synchronisations per step")


# Zoo throughput -----------------------------------------------------------------------------------------------------

def zoo_table(args: argparse.Namespace, device: torch.device) -> None:
    """Throughput of a zoo of K models in one run against K sequential ``num_models=1`` runs (best of
    ``--repeats`` fits each), in each zoo setting (fp32; with ``--zoo-bf16`` bf16-mixed; with
    ``--zoo-channels-last`` channels_last for conv nets; sequential runs in the same setting); for the nets in
    ``--zoo-chunk-nets`` also both with ``steps_per_batch`` chunks; with ``--zoo-vmap`` also the zoo through
    ``vmap`` (MLP: ``StackedNets.fast_chain = False``; conv nets: ``StackedNets.wide = False``), as before."""
    args = argparse.Namespace(**{**vars(args), "subset": args.zoo_subset or args.subset})
    if "num_models" not in inspect.signature(EndpointModule).parameters:
        print("\n(zoo: EndpointModule has no num_models here; skipped)")
        return
    chunk = args.steps_per_batch
    print("\n## Zoo: K models in one Lightning run vs K sequential runs (ms per optimiser step of all K models; "
          f"sequential = K x the single run's step, measured in the same run); chunks: steps_per_batch={chunk} for "
          "both")
    print("| net | setting | K | zoo path | zoo ms/step | K sequential ms | speed-up | zoo chunks ms "
          "| K sequential chunks ms | speed-up (chunks) | zoo through vmap ms | speed-up (vmap) | peak GPU MiB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    zoo_settings = [("fp32", "32-true", False)]
    if args.zoo_bf16:
        zoo_settings.append(("bf16-mixed", "bf16-mixed", False))
    if args.zoo_channels_last:
        zoo_settings += [(f"{label} + channels_last", precision, True) for label, precision, _ in zoo_settings]

    def best(build: Callable[[], pl.LightningModule], precision: str, steps: int = 1) -> float:
        return min(fit_seconds(build, args, device, precision, steps_per_batch=steps)[0]
                   for _ in range(args.repeats))

    for key in args.zoo_nets:
        sizes = args.zoo if key == "mlp" or args.zoo_conv is None else args.zoo_conv
        chunked = key in args.zoo_chunk_nets
        switch = "fast_chain" if key == "mlp" else "wide"  # the StackedNets setting that bypasses vmap
        for label, precision, cl in zoo_settings:
            if cl and key == "mlp":
                continue
            if time.perf_counter() > args.deadline:
                print(f"| {LABELS[key]} | {label} | (skipped: time budget) |")
                continue
            single = best(endpoint(key, cl), precision)
            single_chunks = best(endpoint(key, cl), precision, chunk) if chunked else None
            for k in sizes:
                if time.perf_counter() > args.deadline:
                    print(f"| {LABELS[key]} | {label} | {k}: skipped (time budget) |")
                    break
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(device)
                try:
                    paths: list[str] = []

                    def build(k: int = k, cl: bool = cl, key: str = key, paths: list = paths) -> pl.LightningModule:
                        module = endpoint(key, cl, num_models=k)()
                        paths.append(module.net)
                        return module

                    sec = best(build, precision)
                    path = paths[-1].path if k > 1 else "single"
                    mem = f"{torch.cuda.max_memory_allocated(device) / 2**20:.0f}" if device.type == "cuda" else "-"
                    chunks = ["-"] * 3
                    if chunked:
                        fast = best(endpoint(key, cl, num_models=k), precision, chunk)
                        chunks = [f"{fast * 1e3:.2f}", f"{k * single_chunks * 1e3:.2f}",
                                  f"{k * single_chunks / fast:.2f}x"]
                    vmap = ["-"] * 2
                    if args.zoo_vmap and k > 1:
                        setattr(StackedNets, switch, False)
                        try:
                            slow = best(endpoint(key, cl, num_models=k), precision)
                            vmap = [f"{slow * 1e3:.2f}", f"{k * single / slow:.2f}x"]
                        except RuntimeError as err:  # e.g. vmap's BatchNorm under bf16 autocast on CUDA
                            vmap = [f"fails: {str(err).splitlines()[0][:60]}", "-"]
                        finally:
                            setattr(StackedNets, switch, True)
                except torch.OutOfMemoryError:
                    print(f"| {LABELS[key]} | {label} | {k} | out of memory |")
                    break
                print(f"| {LABELS[key]} | {label} | {k} | {path} | {sec * 1e3:.2f} | {k * single * 1e3:.2f} | "
                      f"{k * single / sec:.2f}x | " + " | ".join(chunks + vmap) + f" | {mem} |", flush=True)


def accuracy_table(args: argparse.Namespace, device: torch.device) -> None:
    """Test accuracy after ``--accuracy-epochs`` full Fashion-MNIST epochs: fp32 vs bf16-mixed + channels_last."""
    print(f"\n## Results under the fast settings: test accuracy after {args.accuracy_epochs} epochs on all 60k "
          "training images (seeds 0, 1)")
    print("| net | seed | fp32 | bf16-mixed + channels_last | difference (pt) | fp32 s | fast s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for key in args.accuracy_nets:
        for seed in (0, 1):
            accs, secs = [], []
            for precision, cl in (("32-true", False), ("bf16-mixed", True)):
                pl.seed_everything(seed, verbose=False)
                data = FashionMNISTDataModule(root=args.root, batch_size=args.batch_size, seed=seed,
                                              train_subset=args.subset if args.quick else None, device_resident=True)
                name, kwargs = NETS[key]
                model = EndpointModule(net=name, net_kwargs=kwargs, optim=OptimConfig(lr=0.05), seed=seed,
                                       channels_last=cl)
                trainer = pl.Trainer(max_epochs=args.accuracy_epochs, accelerator="gpu" if device.type == "cuda"
                                     else "cpu", devices=1, precision=precision, logger=False,
                                     enable_checkpointing=False, enable_progress_bar=False,
                                     enable_model_summary=False, default_root_dir=tempfile.mkdtemp())
                start = time.perf_counter()
                trainer.fit(model, datamodule=data)
                secs.append(time.perf_counter() - start)
                accs.append(trainer.test(model, datamodule=data, verbose=False)[0]["test/acc"])
            print(f"| {LABELS[key]} | {seed} | {accs[0]:.4f} | {accs[1]:.4f} | {100 * (accs[1] - accs[0]):+.2f} | "
                  f"{secs[0]:.1f} | {secs[1]:.1f} |", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="small sizes (CPU smoke run)")
    parser.add_argument("--nets", nargs="+", default=list(NETS), choices=list(NETS))
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                        help="also time bf16-mixed + channels_last for conv nets")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--subset", type=int, default=128 * 100, help="training images per epoch")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved rounds; the best is kept")
    parser.add_argument("--root", default="data", help="Fashion-MNIST folder (the system copy is found too)")
    parser.add_argument("--synthetic", action="store_true", help="random images of Fashion-MNIST's shape")
    parser.add_argument("--profile-net", default="mlp", choices=list(NETS))
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--zoo", type=int, nargs="*", default=[], help="zoo sizes K to time, e.g. 1 4 16 64")
    parser.add_argument("--zoo-subset", type=int, default=None, help="training images per zoo epoch (None: --subset)")
    parser.add_argument("--zoo-nets", nargs="+", default=["mlp", "resnet20"], choices=list(NETS))
    parser.add_argument("--zoo-conv", type=int, nargs="*", default=None,
                        help="zoo sizes K for the conv nets (default: --zoo)")
    parser.add_argument("--zoo-chunk-nets", nargs="*", default=["mlp"], choices=list(NETS),
                        help="zoo nets also timed with steps_per_batch chunks (zoo and sequential)")
    parser.add_argument("--zoo-bf16", action="store_true", help="also time zoos under bf16-mixed")
    parser.add_argument("--steps-per-batch", type=int, default=16,
                        help="the datamodule's steps_per_batch of the 'chunks' columns")
    parser.add_argument("--zoo-channels-last", action="store_true",
                        help="also time conv zoos (and their single runs) with channels_last")
    parser.add_argument("--zoo-vmap", action="store_true",
                        help="also time zoos through vmap (MLP: StackedNets.fast_chain = False, as before issue 18's "
                             "second round; conv nets: StackedNets.wide = False, as before its third)")
    parser.add_argument("--variants", nargs="*", default=["cli", "lightning", "auto", "before"],
                        choices=["cli", "lightning", "auto", "before"],
                        help="module variants of the fp32 ratio table besides hand and module")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--accuracy-epochs", type=int, default=0,
                        help="also train full epochs fp32 vs bf16-mixed + channels_last and compare test accuracy")
    parser.add_argument("--accuracy-nets", nargs="+", default=["resnet20"], choices=list(NETS))
    parser.add_argument("--skip-ratio", action="store_true", help="leave out the ratio table")
    parser.add_argument("--budget", type=float, default=float("inf"),
                        help="seconds after which the zoo section skips its remaining rows")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cpu":
        args.precisions = [p for p in args.precisions if p == "fp32"]
    if args.quick:
        args.subset, args.repeats = args.batch_size * 20, 1
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device: {name}; torch {torch.__version__}, lightning {pl.__version__}; batch {args.batch_size}, "
          f"{args.subset // args.batch_size} steps per epoch, second epoch timed, best of {args.repeats}; "
          f"data: {'random' if args.synthetic else 'Fashion-MNIST'}, device-resident")
    start = time.perf_counter()
    args.deadline = start + args.budget
    if not args.skip_ratio:
        ratio_table(args, device, "fp32")
    if not args.no_profile:
        profile_breakdown(args, device)
    if args.zoo:
        zoo_table(args, device)
    if not args.skip_ratio and "bf16" in args.precisions:
        print("\n## The same table under bf16-mixed (and channels_last for the conv nets)")
        ratio_table(args, device, "other")
    if args.accuracy_epochs:
        accuracy_table(args, device)
    print(f"\ntotal benchmark time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
