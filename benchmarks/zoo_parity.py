"""Zoo members against separate runs on real Fashion-MNIST: test accuracy and weight differences.

Trains ``EndpointModule(num_models=K, seed=s)`` once and, for each member ``k``, a separate
``EndpointModule(seed=s + k)`` with data seed ``d + k`` (same initialisation and data order), then prints each
member's test accuracy beside its separate run's and the largest weight difference. ``--rerun`` trains each separate
run a second time in ``channels_last`` (same seeds and arithmetic, other convolution kernels): how far float32
rounding alone moves a run, the scale against which the zoo's differences are read.

    python benchmarks/zoo_parity.py --models 4 --epochs 2 --subset 20000            # CPU
    python benchmarks/zoo_parity.py --device cuda --models 4 --net resnet20 --rerun  # GPU
"""

from __future__ import annotations

import argparse
import time

import lightning.pytorch as pl
from torch import Tensor

from lmc_lightning.data import FashionMNISTDataModule
from lmc_lightning.modules import EndpointModule, OptimConfig

NETS = {"mlp": {"depth": 3, "width": 512}, "resnet20": {"width": 1}, "vgg11_bn": {"width": 1}}


def fit(model: EndpointModule, args: argparse.Namespace, data_seed: int) -> tuple[list[float], float]:
    """Train, then return (test accuracy of every member, seconds)."""
    data = FashionMNISTDataModule(root=args.root, batch_size=128, train_subset=args.subset, seed=data_seed,
                                  device_resident=True)
    trainer = pl.Trainer(max_epochs=args.epochs, accelerator="gpu" if args.device == "cuda" else "cpu", devices=1,
                         precision=args.precision, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=args.out)
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    seconds = time.perf_counter() - start
    metrics = trainer.test(model, datamodule=data, verbose=False)[0]
    if model.num_models == 1:
        return [metrics["test/acc"]], seconds
    return [metrics[f"test/acc_{k:02d}"] for k in range(model.num_models)], seconds


def max_diff(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    """Largest absolute difference between two state dicts' entries (float64)."""
    return max((a[n].double() - b[n].double().to(a[n].device)).abs().max().item() for n in b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--net", default="mlp", choices=sorted(NETS))
    parser.add_argument("--models", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--subset", type=int, default=None, help="training images (None: all 60k)")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--root", default="data")
    parser.add_argument("--out", default="runs/zoo_parity")
    parser.add_argument("--rerun", action="store_true",
                        help="train each separate run again in channels_last: the rounding-only difference")
    args = parser.parse_args()
    optim = OptimConfig(lr=0.05)
    zoo = EndpointModule(net=args.net, net_kwargs=NETS[args.net], optim=optim, seed=args.seed,
                         num_models=args.models)
    zoo_acc, zoo_sec = fit(zoo, args, data_seed=args.seed)
    print(f"{args.net}, {args.models} members, {args.epochs} epochs, {args.precision}, {args.device}; "
          f"zoo fit {zoo_sec:.1f} s")
    head = "| member | zoo test acc | separate run test acc | difference (pt) | max weight difference |"
    rule = "| --- | --- | --- | --- | --- |"
    if args.rerun:
        head += " rerun (channels_last) acc | rerun - separate (pt) | rerun max weight difference |"
        rule += " --- | --- | --- |"
    print(head + "\n" + rule)
    total = 0.0
    for k in range(args.models):
        single = EndpointModule(net=args.net, net_kwargs=NETS[args.net], optim=optim, seed=args.seed + k)
        acc, sec = fit(single, args, data_seed=args.seed + k)
        total += sec
        ref = single.net.state_dict()
        row = (f"| {k} | {zoo_acc[k]:.4f} | {acc[0]:.4f} | {100 * (zoo_acc[k] - acc[0]):+.2f} | "
               f"{max_diff(zoo.member(k).state_dict(), ref):.2e} |")
        if args.rerun:
            again = EndpointModule(net=args.net, net_kwargs=NETS[args.net], optim=optim, seed=args.seed + k,
                                   channels_last=True)
            acc2, _ = fit(again, args, data_seed=args.seed + k)
            row += f" {acc2[0]:.4f} | {100 * (acc2[0] - acc[0]):+.2f} | {max_diff(again.net.state_dict(), ref):.2e} |"
        print(row, flush=True)
    print(f"separate runs: {total:.1f} s in all; zoo: {zoo_sec:.1f} s ({total / zoo_sec:.2f}x)")


if __name__ == "__main__":
    main()
