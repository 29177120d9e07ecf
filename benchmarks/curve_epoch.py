"""Speed of a curve-training epoch against an ordinary training epoch of the same net and batch size.

Two measurements, both with one ``theta(t)`` per batch; target: curve <= 1.5x endpoint.

* ``--lightning`` (what the target is about): one Lightning ``fit`` epoch of ``CurveModule`` against one of
  ``EndpointModule``, same net, batch size and Fashion-MNIST data (the second epoch is timed, after warm-up).
* default (stricter, the bare step): SGD on ``net.parameters()`` (one forward/backward per batch, as EndpointModule
  trains) against SGD on the free control points of a Bezier / PolyChain curve (``--num-bends``) through
  :func:`lmc_lightning.weights.fit.path_loss`, on synthetic device-resident batches, so only the step is timed and
  Lightning's per-step overhead, which both modules pay, is left out.

    python benchmarks/curve_epoch.py --quick                          # CPU, tiny sizes
    python benchmarks/curve_epoch.py --device cuda                    # GPU, mlp + resnet20 + vgg11_bn
    python benchmarks/curve_epoch.py --device cuda --lightning --root data
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lmc_lightning.nets import get_net
from lmc_lightning.weights.curves import Bezier, PolyChain
from lmc_lightning.weights.fit import freeze_buffer_points, parameter_keys, path_loss, sample_uniform

SHAPES = {"mlp": (1, 28), "resnet20": (3, 32), "vgg11_bn": (3, 32)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[int], None], steps: int, device: torch.device) -> float:
    """Seconds per step over ``steps`` consecutive steps."""
    _sync(device)
    start = time.perf_counter()
    for i in range(steps):
        step(i)
    _sync(device)
    return (time.perf_counter() - start) / steps


def time_interleaved(steps_fns: list[Callable[[int], None]], args: argparse.Namespace, device: torch.device
                     ) -> list[float]:
    """Best-of-``repeats`` seconds per step of each step function, rounds interleaved so noise hits all alike."""
    for fn in steps_fns:
        for i in range(args.warmup):
            fn(i)
    best = [float("inf")] * len(steps_fns)
    for _ in range(args.repeats):
        for k, fn in enumerate(steps_fns):
            best[k] = min(best[k], time_steps(fn, args.steps, device))
    return best


def make_net(name: str, width: int, device: torch.device) -> tuple[nn.Module, int, int]:
    channels, size = SHAPES[name]
    kwargs = {"depth": 3, "width": width} if name == "mlp" else {"width": width}
    net = get_net(name, num_classes=10, in_channels=channels, input_size=size, **kwargs).to(device)
    return net, channels, size


def bench_net(name: str, args: argparse.Namespace, device: torch.device) -> list[tuple[str, str, float]]:
    """Seconds per step of the baseline and of each curve variant for one net."""
    torch.manual_seed(0)
    net, channels, size = make_net(name, args.width if name != "mlp" else args.mlp_width, device)
    x = torch.randn(args.batches, args.batch_size, channels, size, size, device=device)
    y = torch.randint(0, 10, (args.batches, args.batch_size), device=device)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    net.train()

    def endpoint_step(i: int) -> None:
        loss = F.cross_entropy(net(x[i % args.batches]), y[i % args.batches])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    labels, fns = ["endpoint (baseline)"], [endpoint_step]

    other = make_net(name, args.width if name != "mlp" else args.mlp_width, device)[0].state_dict()
    keys = parameter_keys(net)
    gen = torch.Generator().manual_seed(0)
    for label, path_cls, samples in (
        (f"bezier b={args.num_bends}, 1 t/batch", Bezier, 1),
        (f"polychain b={args.num_bends}, 1 t/batch", PolyChain, 1),
    ):
        path = path_cls([net.state_dict(), other], args.num_bends).to(device)
        popt = torch.optim.SGD(freeze_buffer_points(path, net), lr=0.01, momentum=0.9)

        def curve_step(i: int, path=path, popt=popt, samples=samples) -> None:
            loss = path_loss(path, net, x[i % args.batches], y[i % args.batches], sample_uniform(samples, 1, gen),
                             param_keys=keys)
            popt.zero_grad(set_to_none=True)
            loss.backward()
            popt.step()

        labels.append(label)
        fns.append(curve_step)
    return [(name, label, sec) for label, sec in zip(labels, time_interleaved(fns, args, device), strict=True)]


def lightning_epochs(name: str, args: argparse.Namespace, device: torch.device, tmp: str
                     ) -> list[tuple[str, str, float]]:
    """Seconds of the second ``fit`` epoch of EndpointModule and of CurveModule (Bezier, PolyChain) for one net."""
    import lightning.pytorch as pl
    from train_loader import EpochTimer

    from lmc_lightning.checkpoint import save_net
    from lmc_lightning.data import FashionMNISTDataModule
    from lmc_lightning.modules import CurveModule, EndpointModule, OptimConfig

    net_kwargs = {"depth": 3, "width": args.mlp_width} if name == "mlp" else {"width": args.width}
    channels = 1
    endpoints = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        net = get_net(name, num_classes=10, in_channels=channels, input_size=28, **net_kwargs)
        spec = {"name": name, "num_classes": 10, "in_channels": channels, "input_size": 28, **net_kwargs}
        endpoints.append(str(save_net(f"{tmp}/{name}_{seed}.ckpt", net.state_dict(), spec)))
    models = {
        "endpoint (baseline)": lambda: EndpointModule(net=name, net_kwargs=net_kwargs, optim=OptimConfig(lr=0.01),
                                                      seed=0),
        f"bezier b={args.num_bends}": lambda: CurveModule(endpoints=endpoints, num_bends=args.num_bends,
                                                          optim=OptimConfig(lr=0.01)),
        f"polychain b={args.num_bends}": lambda: CurveModule(endpoints=endpoints, curve="polychain",
                                                             num_bends=args.num_bends, optim=OptimConfig(lr=0.01)),
    }
    rows = []
    for label, build in models.items():
        pl.seed_everything(0)
        data = FashionMNISTDataModule(root=args.root, batch_size=args.batch_size, train_subset=args.subset)
        timer = EpochTimer()
        trainer = pl.Trainer(max_epochs=2, accelerator="gpu" if device.type == "cuda" else "cpu", devices=1,
                             logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, callbacks=[timer], limit_val_batches=0)
        trainer.fit(build(), datamodule=data)
        steps = trainer.num_training_batches
        rows.append((name, f"{label} (Lightning)", timer.times[-1] / steps))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CPU smoke run)")
    parser.add_argument("--nets", nargs="+", default=None, choices=sorted(SHAPES))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=50, help="timed steps (an 'epoch')")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timing rounds; the best is reported")
    parser.add_argument("--num-bends", type=int, default=1)
    parser.add_argument("--width", type=int, default=4, help="width multiplier of conv nets")
    parser.add_argument("--mlp-width", type=int, default=512)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--lightning", action="store_true", help="time Lightning fit epochs on Fashion-MNIST")
    parser.add_argument("--root", default="data", help="Fashion-MNIST folder (--lightning)")
    parser.add_argument("--subset", type=int, default=None, help="training images per epoch (--lightning)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.nets = args.nets or ["mlp", "resnet20"]
        args.steps, args.warmup, args.width, args.mlp_width, args.batch_size = 5, 2, 1, 256, 32
    args.nets = args.nets or ["mlp", "resnet20", "vgg11_bn"]
    args.batches = min(args.steps, 8)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device: {name}; batch size {args.batch_size}; best of {args.repeats} x {args.steps} steps; "
          f"torch {torch.__version__}")
    print(f"{'net':<10} {'training':<28} {'ms/step':>9} {'x baseline':>11}")
    tmp = tempfile.mkdtemp() if args.lightning else ""
    for net_name in args.nets:
        rows = lightning_epochs(net_name, args, device, tmp) if args.lightning else bench_net(net_name, args, device)
        base = rows[0][2]
        for net, label, sec in rows:
            print(f"{net:<10} {label:<28} {sec * 1e3:>9.2f} {sec / base:>11.2f}")


if __name__ == "__main__":
    main()
