"""Benchmark: evaluating a linear path at many points, three ways, same points, same numbers.

(a) the seed codebases' way: fp32, ``load_state_dict`` into a module per point, BN reset (train-mode pass with
    ``momentum=None``) and evaluation through DataLoaders from host memory (TensorDataset, no workers, so no
    augmentation or decoding cost is counted against it), ``.item()`` per batch;
(b) a plain fp32 loop on device-resident data (weights loaded per point, BN reset and evaluation on device tensors);
(c) ours: :func:`lmc_lightning.weights.evaluate.evaluate_path` with its defaults (plus, with ``--strategies``, forced
    ``loop`` and ``vmap`` rows and, for BN nets, the loop without BN fusion at batch 1000, ``ours-unfused``).

(b) and (c) are handed the test and statistics data already on the device (device-resident, as a datamodule with
``device_resident=True`` holds it), so the comparison measures path evaluation, not one host-to-device copy (about
20 ms for the 10k fp32 test images on an H100 host, a third of the MLP's time); ``--host-data`` hands them host
tensors instead, copied inside the timed call.

Every method evaluates the same points with BN reset on the same statistics batches (nets with BN), and the table
reports the largest loss difference to (a), so speed is never bought with wrong numbers. Expected differences: bf16
rounding, and with BN reset a small one even in fp32: PyTorch's ``momentum=None`` running variance is the average of
the per-batch variances, ours the exact variance over all statistics samples (they differ by the spread of the batch
means, shrinking with the batch size). Achieved TFLOP/s counts the
forward FLOPs (``torch.utils.flop_counter.FlopCounterMode``) of every evaluated and every statistics image.

    python benchmarks/path_eval.py --device cuda          # GPU, full sizes (21 points, BN reset 20 x 500, 10k test)
    python benchmarks/path_eval.py --quick                # tiny CPU run
    python benchmarks/path_eval.py --cpu-fmnist           # the MLP on real Fashion-MNIST, on CPU
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.flop_counter import FlopCounterMode

from lmc_lightning.nets import get_net
from lmc_lightning.weights.evaluate import evaluate_path
from lmc_lightning.weights.paths import Linear
from lmc_lightning.weights.renorm import batchnorms

NETS: dict[str, tuple[str, dict]] = {
    "mlp": ("mlp", {"depth": 3, "width": 512}),
    "resnet20x1": ("resnet20", {"width": 1}),
    "resnet20x4": ("resnet20", {"width": 4}),
    "vgg16_bn": ("vgg16_bn", {"width": 1}),
}
QUICK_NETS: dict[str, tuple[str, dict]] = {
    "mlp": ("mlp", {"depth": 2, "width": 64}),
    "resnet20x0.25": ("resnet20", {"width": 0.25}),
    "vgg11_bn/8": ("vgg11_bn", {"width": 0.125}),
}


@dataclass
class Setup:
    device: torch.device
    points: int
    num_test: int
    bn_batches: int
    bn_batch_size: int
    shape: tuple[int, int, int]
    batch_size: int = 1000


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_module_bn(model: nn.Module, batches) -> None:
    """The seeds' BN reset: zero the statistics, momentum=None, a train-mode pass, back to eval."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        for x in batches:
            model(x)
    model.eval()


def seed_way(path: Linear, net: nn.Module, test, train_x: Tensor, ts, s: Setup, bn: bool) -> np.ndarray:
    """(a) fp32, load_state_dict per point, DataLoaders from host memory, .item() per batch."""
    model = copy.deepcopy(net).to(s.device)
    test_loader = DataLoader(TensorDataset(*test), batch_size=s.batch_size, shuffle=False)
    train_loader = DataLoader(TensorDataset(train_x), batch_size=s.bn_batch_size, shuffle=False)
    losses = []
    for t in ts:
        model.load_state_dict(path(t))
        if bn:
            reset_module_bn(model, (x.to(s.device) for (x,) in train_loader))
        total, correct = 0.0, 0
        with torch.no_grad():
            for x, y in test_loader:
                x, y = x.to(s.device), y.to(s.device)
                out = model(x)
                total += F.cross_entropy(out, y, reduction="sum").item()
                correct += (out.argmax(1) == y).sum().item()
        losses.append(total / len(test[1]))
    return np.array(losses)


def plain_loop(path: Linear, net: nn.Module, test, train_x: Tensor, ts, s: Setup, bn: bool) -> np.ndarray:
    """(b) fp32 loop on device-resident data, one host sync at the end."""
    model = copy.deepcopy(net).to(s.device)
    path = copy.deepcopy(path).to(s.device)
    x_test, y_test = test[0].to(s.device), test[1].to(s.device)
    stats = list(train_x.to(s.device).split(s.bn_batch_size))
    losses = torch.zeros(len(ts), dtype=torch.float64, device=s.device)
    for i, t in enumerate(ts):
        with torch.no_grad():
            model.load_state_dict(path(t))
        if bn:
            reset_module_bn(model, stats)
        with torch.no_grad():
            for x, y in zip(x_test.split(s.batch_size), y_test.split(s.batch_size), strict=True):
                losses[i] += F.cross_entropy(model(x), y, reduction="sum")
    return (losses / len(y_test)).cpu().numpy()


def ours(strategy: str = "auto", **options) -> Callable[..., np.ndarray]:
    def run(path: Linear, net: nn.Module, test, train_x: Tensor, ts, s: Setup, bn: bool) -> np.ndarray:
        res = evaluate_path(path, net, test, coords=ts, bn="reset" if bn else None, train_data=train_x,
                            bn_batches=s.bn_batches, bn_batch_size=s.bn_batch_size, device=s.device,
                            strategy=strategy, **options)
        run.meta = res.meta
        return res.loss

    run.meta = {}
    return run


def timed(fn: Callable[..., np.ndarray], *args, device: torch.device, repeats: int) -> tuple[float, np.ndarray]:
    best, out = float("inf"), None
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        out = fn(*args)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best, out


def forward_flops(net: nn.Module, shape: tuple[int, int, int]) -> float:
    """Forward FLOPs of one image (FlopCounterMode counts 2 per multiply-add)."""
    probe = copy.deepcopy(net).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        probe(torch.zeros(2, *shape))
    return counter.get_total_flops() / 2


def endpoints(name: str, kwargs: dict, shape: tuple[int, int, int], train_x: Tensor) -> tuple[nn.Module, nn.Module]:
    """Two random nets with BN statistics from a train-mode pass (so the endpoints are sensible)."""
    nets = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        net = get_net(name, num_classes=10, in_channels=shape[0], input_size=shape[1], **kwargs)
        if batchnorms(net):
            reset_module_bn(net, train_x[:512].split(256))
        nets.append(net.eval())
    return nets[0], nets[1]


def fashion_mnist(root: str, n_train: int, n_test: int) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """Statistics inputs and the test split of real Fashion-MNIST (normalised, as the datamodule serves them)."""
    from lmc_lightning.data import FashionMNISTDataModule

    dm = FashionMNISTDataModule(root=root)
    dm.setup("fit")
    dm.setup("test")
    x_test, y_test = dm.split_tensors("test")
    return dm.split_tensors("train")[0][:n_train], (x_test[:n_test], y_test[:n_test])


def bench_net(label: str, name: str, kwargs: dict, s: Setup, args) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    n_train = s.bn_batches * s.bn_batch_size
    if args.cpu_fmnist:
        train_x, test = fashion_mnist(args.root, n_train, s.num_test)
    else:
        train_x = torch.randn(n_train, *s.shape, generator=g)
        test = (torch.randn(s.num_test, *s.shape, generator=g), torch.randint(0, 10, (s.num_test,), generator=g))
    a, b = endpoints(name, kwargs, s.shape, train_x)
    bn = bool(batchnorms(a))
    resident = (test[0].to(s.device), test[1].to(s.device)), train_x.to(s.device)
    data = {"(a) seed": (test, train_x)}
    path = Linear(a.state_dict(), b.state_dict())
    ts = np.linspace(0, 1, s.points).tolist()
    flops = forward_flops(a, s.shape) * s.points * (s.num_test + (n_train if bn else 0))
    params = sum(p.numel() for p in a.parameters())
    methods = {"(a) seed": seed_way, "(b) plain": plain_loop, "(c) ours": ours()}
    if args.strategies:
        methods |= {"(c) ours-loop": ours("loop"), "(c) ours-vmap": ours("vmap")}
        if bn:
            methods["(c) ours-unfused"] = ours("loop", fuse_norms=False, batch_size=s.batch_size)
    rows, ref = [], None
    for method, fn in methods.items():
        test_m, train_m = data.get(method, (test, train_x) if args.host_data else resident)
        fn(path, a, test_m, train_m, ts, s, bn)  # warm-up on the timed shapes: cuDNN autotuning, allocator, lazy init
        seconds, losses = timed(fn, path, a, test_m, train_m, ts, s, bn, device=s.device, repeats=args.repeats)
        ref = losses if ref is None else ref
        meta = getattr(fn, "meta", {})
        fused_note = (" fused-BN" if meta.get("fused_norms") else "") + f" batch {meta.get('batch_size', s.batch_size)}"
        rows.append({"net": label, "params": params, "method": method, "seconds": seconds, "bn": bn,
                     "tflops": flops / seconds / 1e12, "diff": float(np.abs(losses - ref).max()),
                     "barrier": float(losses.max() - (losses[0] + losses[-1]) / 2),
                     "detail": f"{meta.get('strategy', '')} {meta.get('precision', 'fp32')}{fused_note}".strip()})
    return rows


def print_table(rows: list[dict], peak: float) -> None:
    head = (f"{'net':<14} {'params':>9} {'method':<15} {'seconds':>8} {'(a)/this':>8} {'(b)/this':>8} "
            f"{'TFLOP/s':>8} {'%peak':>6} {'max|dloss| vs (a)':>18}  {'settings'}")
    print(head)
    print("-" * len(head))
    for r in rows:
        base = {x["method"]: x["seconds"] for x in rows if x["net"] == r["net"]}
        print(f"{r['net']:<14} {r['params']:>9} {r['method']:<15} {r['seconds']:>8.3f} "
              f"{base['(a) seed'] / r['seconds']:>8.2f} {base['(b) plain'] / r['seconds']:>8.2f} "
              f"{r['tflops']:>8.2f} {100 * r['tflops'] / peak:>6.1f} {r['diff']:>18.2e}  "
              f"{r['detail']}{' +BN reset' if r['bn'] else ''}")


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="tiny sizes on CPU")
    p.add_argument("--cpu-fmnist", action="store_true", help="the MLP on real Fashion-MNIST (see --root), on CPU")
    p.add_argument("--root", default="data", help="data root for --cpu-fmnist (the system copy is also searched)")
    p.add_argument("--nets", default=None, help=f"comma-separated subset of {sorted(NETS)}")
    p.add_argument("--points", type=int, default=21)
    p.add_argument("--num-test", type=int, default=10_000)
    p.add_argument("--bn-batches", type=int, default=20)
    p.add_argument("--bn-batch-size", type=int, default=500)
    p.add_argument("--repeats", type=int, default=1, help="time each method this many times, keep the best")
    p.add_argument("--strategies", action="store_true", help="also time ours with strategy loop and vmap")
    p.add_argument("--host-data", action="store_true", help="hand (b) and (c) host tensors (copied in the timed call)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak (H100 SXM: 989)")
    args = p.parse_args(argv)

    table = NETS
    shape = (3, 32, 32)
    if args.quick:
        args.device, table, shape = "cpu", QUICK_NETS, (3, 16, 16)
        args.points, args.num_test, args.bn_batches, args.bn_batch_size = 3, 200, 2, 50
    elif args.cpu_fmnist:
        args.device, table, shape = "cpu", {"mlp": NETS["mlp"]}, (1, 28, 28)
    if args.nets:
        unknown = set(args.nets.split(",")) - set(table)
        if unknown:
            p.error(f"unknown nets {sorted(unknown)}; choose from {sorted(table)}")
        table = {k: table[k] for k in args.nets.split(",")}
    s = Setup(torch.device(args.device), args.points, args.num_test, args.bn_batches, args.bn_batch_size, shape,
              batch_size=min(1000, args.num_test))
    device_name = torch.cuda.get_device_name(s.device) if s.device.type == "cuda" else "cpu"
    print(f"device {device_name}, torch {torch.__version__}, {s.points} points, {s.num_test} test images, "
          f"BN reset on {s.bn_batches} x {s.bn_batch_size}, input {shape}, (b)/(c) data "
          f"{'on the host' if args.host_data else 'device-resident'}")
    rows = []
    for label, (name, kwargs) in table.items():
        rows += bench_net(label, name, kwargs, s, args)
    print_table(rows, args.peak_tflops)
    return rows


if __name__ == "__main__":
    main()
