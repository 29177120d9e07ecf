"""Stitching and similarity speed, each against a baseline measured in the same run.

1. Stitch-training step vs an endpoint training step of net B (target: stitch <= 1.3x). Both are bare steps on
   device-resident synthetic batches (forward, loss, backward, SGD step; the stitch step adds the stitcher's penalty
   and projection), batch 32 as in the seed, nets in train mode (BN batch statistics). Points: every ReLU of nets
   with at most 5 (mcnn), else the first (B runs almost the whole net), a middle one and the last. Birkhoff runs
   with its default projection (one captured CUDA graph on the GPU) and, as ``birkhoff-eager``, kernel by kernel.
2. The layer x layer G_ReLU-CKA matrix of two ResNet-20s (``resnet20_a``, 19 points) with
   :func:`lmc_lightning.metrics.similarity_matrix` (one kernel per layer, blocked on the device) vs a straightforward
   per-pair loop calling :func:`lmc_lightning.metrics.functional.grelu_cka` (two kernels per pair). Target: >= 10x.
   Inputs: the Fashion-MNIST test images (``--samples`` of them; random images when the files are absent), through
   two randomly initialised nets (speed does not depend on training). The per-pair loop stops after
   ``--naive-budget`` seconds and is extrapolated to all pairs (stated in the output).

    python benchmarks/stitch.py --quick            # CPU, small sizes
    python benchmarks/stitch.py --device cuda      # GPU: mcnn + resnet20_a steps, CKA on 10k images
    python benchmarks/stitch.py --parts projection steps --json out.json   # item 8's step figures only
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from lmc_lightning.metrics.functional import grelu_cka
from lmc_lightning.metrics.similarity_functional import similarity_matrix
from lmc_lightning.nets import get_net
from lmc_lightning.stitching import Birkhoff, make_layer, point_shapes, sinkhorn, stitch, stitch_points
from lmc_lightning.weights.permutation.batches import capture_module

FMNIST = Path("/usr/share/datasets/fashion-mnist")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def per_step(fn: Callable[[], None], steps: int, repeats: int, device: torch.device) -> float:
    """Best-of-``repeats`` seconds per call over ``steps`` calls (after ``steps`` warm-up calls)."""
    for _ in range(steps):
        fn()
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        _sync(device)
        best = min(best, (time.perf_counter() - start) / steps)
    return best


def bench_steps(name: str, shape: tuple[int, int, int], args: argparse.Namespace, device: torch.device) -> None:
    torch.manual_seed(0)
    net_a = get_net(name, in_channels=shape[0], input_size=shape[1], width=args.width).to(device)
    net_b = get_net(name, in_channels=shape[0], input_size=shape[1], width=args.width).to(device)
    x = torch.randn(args.batch_size, *shape, device=device)
    y = torch.randint(0, 10, (args.batch_size,), device=device)
    endpoint = copy.deepcopy(net_b).train()
    opt_e = torch.optim.SGD(endpoint.parameters(), lr=1e-3)

    def endpoint_step() -> None:
        opt_e.zero_grad(set_to_none=True)
        F.cross_entropy(endpoint(x), y).backward()
        opt_e.step()

    t_end = per_step(endpoint_step, args.steps, args.repeats, device)
    points = stitch_points(net_a)
    shapes = point_shapes(net_a, shape)
    chosen = points if len(points) <= 5 else [points[0], points[len(points) // 2], points[-1]]
    print(f"{name} width {args.width}, batch {args.batch_size}, {device}: endpoint step {1e3 * t_end:.3f} ms")
    rows = args.results.setdefault("steps", [])
    rows.append({"net": name, "point": None, "layer": "endpoint", "ms": 1e3 * t_end, "ratio": 1.0})
    for point in chosen:
        for kind in args.layers:
            a, b = copy.deepcopy(net_a), copy.deepcopy(net_b)
            for p in [*a.parameters(), *b.parameters()]:
                p.requires_grad_(False)
            layer = make_layer(kind.split("-")[0], shapes[point][0], rank=1,
                               cuda_graph=kind == "birkhoff").to(device)
            project = (lambda layer=layer: plain_projection(layer)) if kind == "birkhoff-plain" else layer.project
            model = stitch(a, b, point, layer).train()
            opt = torch.optim.SGD(layer.parameters(), lr=1e-3, weight_decay=1e-4)

            def stitch_step(model=model, layer=layer, opt=opt, project=project) -> None:
                opt.zero_grad(set_to_none=True)
                (F.cross_entropy(model(x), y) + layer.penalty()).backward()
                opt.step()
                project()

            t = per_step(stitch_step, args.steps, args.repeats, device)
            rows.append({"net": name, "point": point, "layer": kind, "ms": 1e3 * t, "ratio": t / t_end})
            print(f"  point {point:>16} {kind:>14}: stitch step {1e3 * t:.3f} ms = {t / t_end:.2f}x endpoint "
                  f"(target <= 1.3x)", flush=True)


@torch.no_grad()
def plain_projection(layer: Birkhoff) -> None:
    """The projection as first written (eager, on a copy): ``W <- sinkhorn(relu(W))``, ``s <- relu(s)``."""
    layer.weight.copy_(sinkhorn(layer.weight.clamp_min(0), layer.iters))
    layer.weight_scalars.clamp_(min=0)


def bench_projection(args: argparse.Namespace, device: torch.device) -> None:
    """The Birkhoff projection alone (16 rounds): plain (on a copy) vs in place vs the default (CUDA graph on GPU)."""
    print(f"Birkhoff projection alone, {device}")
    rows = args.results.setdefault("projection", [])
    for channels in (64, 128, 256, 512):
        torch.manual_seed(0)
        timings = {}
        for kind in ("plain", "eager", "default"):
            layer = Birkhoff(channels, cuda_graph=kind == "default").to(device)
            fn = (lambda layer=layer: plain_projection(layer)) if kind == "plain" else layer.project
            timings[kind] = per_step(fn, args.steps, args.repeats, device)
        # same result: both forms from one perturbed W, over several steps (on CUDA: capture, then replays)
        plain, fast = Birkhoff(channels).to(device), Birkhoff(channels).to(device)
        fast.load_state_dict(plain.state_dict())
        diff = 0.0
        for _ in range(4):
            with torch.no_grad():
                noise = 0.05 * torch.randn(channels, channels, device=device)
                plain.weight.add_(noise)
                fast.weight.add_(noise)
            plain_projection(plain)
            fast.project()
            diff = max(diff, float((plain.weight - fast.weight).detach().abs().max()))
        rows.append({"channels": channels, **{f"{k}_us": 1e6 * v for k, v in timings.items()}, "max_abs_diff": diff})
        print(f"  C = {channels:>3}: plain {1e6 * timings['plain']:.1f} us, in place {1e6 * timings['eager']:.1f} us, "
              f"default {1e6 * timings['default']:.1f} us ({timings['plain'] / timings['default']:.1f}x faster than "
              f"plain); max |W_default - W_plain| = {diff:.1e} (test bound 1e-6)", flush=True)


def _images(n: int, device: torch.device) -> tuple[torch.Tensor, str]:
    path = FMNIST / "t10k-images-idx3-ubyte.gz"
    if path.exists():
        from lmc_lightning.data.idx import read_idx

        x = torch.from_numpy(read_idx(path)[:n]).float().div(255).sub(0.2860).div(0.3530).unsqueeze(1)
        if len(x) == n:
            return x.to(device), f"{n} Fashion-MNIST test images"
    return torch.randn(n, 1, 28, 28, device=device), f"{n} random 28x28 images"


@torch.no_grad()
def bench_cka(args: argparse.Namespace, device: torch.device) -> None:
    x, what = _images(args.samples, device)
    feats = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        net = get_net("resnet20_a", in_channels=1, input_size=28).to(device).eval()
        gm = capture_module(net, stitch_points(net))
        outs = [gm(chunk) for chunk in x.split(1000)]
        feats.append([torch.cat(parts) for parts in zip(*outs, strict=True)])
    layers = len(feats[0])
    print(f"G_ReLU-CKA {layers}x{layers} matrix, resnet20_a, {what}, {device}")
    similarity_matrix(feats[0][:1], feats[1][:1], "grelu_cka")  # warm-up
    grelu_cka(feats[0][0], feats[1][0])
    _sync(device)
    start = time.perf_counter()
    ours = similarity_matrix(feats[0], feats[1], "grelu_cka")
    _sync(device)
    t_ours = time.perf_counter() - start
    pairs = [(i, j) for i in range(layers) for j in range(layers)]
    done, start = 0, time.perf_counter()
    for i, j in pairs:
        value = grelu_cka(feats[0][i], feats[1][j])
        _sync(device)
        assert abs(float(value) - float(ours[i, j])) < 1e-4, (i, j, float(value), float(ours[i, j]))
        done += 1
        if time.perf_counter() - start > args.naive_budget:
            break
    t_pairs = (time.perf_counter() - start) * len(pairs) / done
    note = "" if done == len(pairs) else f" (extrapolated from {done} of {len(pairs)} pairs)"
    print(f"  ours (kernel once per layer): {t_ours:.2f} s; per-pair loop: {t_pairs:.2f} s{note}; "
          f"speed-up {t_pairs / t_ours:.1f}x (target >= 10x); values agree to 1e-4 on the pairs run")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="small sizes for a CPU smoke run")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--width", type=float, default=None)
    p.add_argument("--samples", type=int, default=None)
    p.add_argument("--naive-budget", type=float, default=60.0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--parts", nargs="+", default=["steps", "cka"], choices=["steps", "cka", "projection"])
    p.add_argument("--nets", nargs="+", default=["mcnn", "resnet20_a"])
    p.add_argument("--layers", nargs="+", default=["affine", "lowrank", "birkhoff", "birkhoff-eager"],
                   choices=["affine", "lowrank", "birkhoff", "birkhoff-eager", "birkhoff-plain"],
                   help="birkhoff: the default projection (one CUDA graph on the GPU); birkhoff-eager: in-place, "
                        "kernel by kernel; birkhoff-plain: the first, out-of-place form")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    args.results = {"device": str(torch.cuda.get_device_name(device) if device.type == "cuda" else device),
                    "batch_size": args.batch_size, "steps": []}
    args.steps = args.steps or (10 if args.quick else 50)
    args.width = args.width or (0.25 if args.quick else 1.0)
    args.samples = args.samples or (300 if args.quick else 10_000)
    if "projection" in args.parts:
        bench_projection(args, device)
    if "steps" in args.parts:
        for name in args.nets:
            bench_steps(name, (3, 32, 32), args, device)
    if "cka" in args.parts:
        bench_cka(args, device)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(args.results, indent=1))


if __name__ == "__main__":
    main()
