"""Benchmark weight matching: today's loop against the textbook reference and against the faster variants.

Ours: ``lmc_lightning.weights.permutation.weight_matching``. ``today`` runs it as it ran before the solver choice
(``lazy=False, solver="scipy"``, both weight dicts resident on the device): every round solves every group with scipy.
The variants, measured in the same run on the same pair of nets, are exact savings (``lazy``: a group whose cost
matrix is unchanged since its last solve is not solved again, so the path is the same) and other solvers (``lap``
when installed: lapx's ``lapjvh`` on float32 costs, ``auction``: our torch auction solver on the device), resident or
streamed (``stream``: one group's tensors on the device at a time); ``default`` is ``weight_matching``'s defaults
(lazy, ``solver="auto"``, threads on a GPU). For each: seconds, rounds, solves, peak device memory (CUDA), groups whose
permutation equals today's, and the loss barrier at the midpoint of A and aligned B (with ``--train-steps``, both
nets are first trained on real Fashion-MNIST so that the barrier means something). The textbook numpy reference
(``--ref-max-iter``, a per-layer loop with scipy) is the older baseline of the README table.

    python benchmarks/align.py --quick                               # tiny nets on CPU (seconds)
    python benchmarks/align.py --device cuda --nets resnet20x16 vgg16 --train-steps 100 --max-iter 40  # issue 15
"""

from __future__ import annotations

import argparse
import importlib
import json
import time
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from lmc_lightning.nets import get_net
from lmc_lightning.weights.permutation import PermutationSpec, apply_permutation, derive_spec, weight_matching
from lmc_lightning.weights.permutation.solvers import has_lap, resolve_solver

wm = importlib.import_module("lmc_lightning.weights.permutation.weight_matching")  # the module, not the function

FULL = {"mlp": ("mlp", {"width": 2048, "depth": 3}), "vgg16": ("vgg16", {"width": 4.0, "init": "kaiming_normal"}),
        "vgg16bn": ("vgg16_bn", {"width": 4.0}),
        "resnet20": ("resnet20", {"width": 4.0}), "resnet20x16": ("resnet20", {"width": 16.0})}
QUICK = {"mlp": ("mlp", {"width": 64, "depth": 3}), "vgg16": ("vgg16", {"width": 0.25, "init": "kaiming_normal"}),
         "vgg16bn": ("vgg16_bn", {"width": 0.25}),
         "resnet20": ("resnet20", {"width": 0.5}), "resnet20x16": ("resnet20", {"width": 2.0})}

def reference_weight_matching(spec: PermutationSpec, theta_a: dict, theta_b: dict, max_iter: int = 100,
                              seed: int = 0) -> tuple[dict[str, np.ndarray], int]:
    """Textbook weight matching in numpy: every step rebuilds the cost matrix layer by layer."""
    a = {k: v.detach().cpu().numpy() for k, v in theta_a.items()}
    b = {k: v.detach().cpu().numpy() for k, v in theta_b.items()}
    sizes = spec.sizes(theta_a)
    by_key = spec.by_key()
    perm = {g: np.arange(n) for g, n in sizes.items()}
    groups = list(spec.groups)
    gen = torch.Generator().manual_seed(seed)
    rounds = 0
    for rounds in range(1, max_iter + 1):  # noqa: B007 - the count is returned
        improved = False
        for i in torch.randperm(len(groups), generator=gen).tolist():
            group, n = groups[i], sizes[groups[i]]
            cost = np.zeros((n, n))
            for ax in spec.groups[group]:
                if ax.key in spec.buffers or not np.issubdtype(a[ax.key].dtype, np.floating):
                    continue
                wb = b[ax.key]
                for other_group, other in by_key[ax.key]:
                    if other.axis != ax.axis:
                        index = (perm[other_group][:, None] * other.block + np.arange(other.block)).reshape(-1)
                        wb = np.take(wb, index, axis=other.axis)
                wa = np.moveaxis(a[ax.key], ax.axis, 0).reshape(n, -1)
                wb = np.moveaxis(wb, ax.axis, 0).reshape(n, -1)
                cost += wa @ wb.T
            _, col = linear_sum_assignment(cost, maximize=True)
            rows = np.arange(n)
            if cost[rows, col].sum() > cost[rows, perm[group]].sum() + 1e-12 * abs(cost[rows, perm[group]].sum()):
                improved = True
            perm[group] = col
        if not improved:
            break
    return perm, rounds


class AssignmentTimer:
    """Wraps ``solve_assignment`` to measure the time spent in the assignment solver."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.inner = wm.solve_assignment

    def __call__(self, cost: torch.Tensor, solver: str = "scipy", minimise: bool = False) -> torch.Tensor:
        t0 = time.perf_counter()
        out = self.inner(cost, solver, minimise)
        self.seconds += time.perf_counter() - t0
        return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fmnist(device: torch.device, n_train: int = 20_000) -> dict[str, torch.Tensor]:
    """Real Fashion-MNIST padded to 32x32 (first ``n_train`` training images, 2k test images) on ``device``."""
    from lmc_lightning.data import FashionMNISTDataModule
    from lmc_lightning.data.idx import read_idx
    from lmc_lightning.data.mnist import _idx_file

    folder = FashionMNISTDataModule(root="data").find_folder()  # the datamodule's search: data/..., Debian's copy
    if folder is None:
        raise SystemExit("Fashion-MNIST not found under data/ or /usr/share/datasets/fashion-mnist: "
                         "apt-get install dataset-fashion-mnist, or put the four IDX files in data/fashion-mnist.")

    def load(prefix: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.from_numpy(read_idx(_idx_file(folder, f"{prefix}-images-idx3-ubyte"))[:n]).float().div(255)
        y = torch.from_numpy(read_idx(_idx_file(folder, f"{prefix}-labels-idx1-ubyte"))[:n]).long()
        x = F.pad((x - 0.2860) / 0.3530, (2, 2, 2, 2)).unsqueeze(1)
        return x.to(device), y.to(device)

    (xt, yt), (xv, yv) = load("train", n_train), load("t10k", 2000)
    return {"x_train": xt, "y_train": yt, "x_test": xv, "y_test": yv}


def train(net: torch.nn.Module, data: dict, steps: int, seed: int, width: float = 1.0) -> None:
    """``steps`` of SGD (nets with BatchNorm, lr 0.05) or Adam (without: lr 3e-4, divided by the width multiplier)
    on batches of 256, linear warm-up over 30 steps and linear decay. Plain VGG-16 did not train in 150 SGD steps
    from PyTorch's default init; with Kaiming init and Adam, VGG-16 x1/4 reached test loss 1.21 in 60 steps (CPU)."""
    gen = torch.Generator().manual_seed(seed)
    if any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules()):
        lr = 0.05
        opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, nesterov=True)
    else:
        lr = 3e-4 / max(1.0, width)
        opt = torch.optim.Adam(net.parameters(), lr=lr)
    net.train()
    for step in range(steps):
        idx = torch.randint(len(data["x_train"]), (256,), generator=gen).to(data["x_train"].device)
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 30) * (1 - step / steps)
        opt.zero_grad(set_to_none=True)
        with torch.autocast(data["x_train"].device.type, torch.bfloat16, enabled=data["x_train"].is_cuda):
            loss = F.cross_entropy(net(data["x_train"][idx]), data["y_train"][idx])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
        opt.step()
    net.eval()


@torch.no_grad()
def loss_of(net: torch.nn.Module, theta: dict, data: dict) -> float:
    """Test loss of ``theta`` after a BN reset on 2048 training images (no-op for nets without BN)."""
    net.load_state_dict(theta)
    bns = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if bns:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
        net.train()
        net(data["x_train"][:2048])
    net.eval()
    return float(F.cross_entropy(net(data["x_test"]), data["y_test"]))


def barrier(net: torch.nn.Module, a: dict, b: dict, spec: PermutationSpec, perm: dict, data: dict,
            ends: tuple[float, float]) -> float:
    b_aligned = apply_permutation(b, spec, {g: p.to(next(iter(b.values())).device) for g, p in perm.items()})
    mid = {k: (a[k] + b_aligned[k]) / 2 if a[k].is_floating_point() else a[k] for k in a}
    return loss_of(net, mid, data) - sum(ends) / 2


VARIANTS = {  # name -> weight_matching arguments
    "today": {"lazy": False, "solver": "scipy", "workers": 1, "warm": False},
    "default": {},  # weight_matching's defaults: lazy, solver="auto" (lap if installed), threads on a GPU
    "default+stream": {"stream": True},  # pinned host copies on CUDA
    "default+stream-unpinned": {"stream": True, "pin": False},
    "lazy": {"lazy": True, "solver": "scipy", "workers": 1, "warm": False},
    "lazy+threads": {"lazy": True, "solver": "scipy", "workers": 8, "warm": False},
    "lazy+lap": {"lazy": True, "solver": "lap", "workers": 1, "warm": False},
    "lazy+lap+threads": {"lazy": True, "solver": "lap", "workers": 8, "warm": False},
    "lazy+auction": {"lazy": True, "solver": "auction", "workers": 1, "warm": False},
    "stream+threads": {"lazy": True, "solver": "scipy", "workers": 8, "stream": True, "warm": False},
    "stream": {"lazy": True, "solver": "scipy", "workers": 1, "stream": True, "warm": False},
    "warm": {"lazy": True, "solver": "scipy", "workers": 1, "warm": True},
    "warm+threads": {"lazy": True, "solver": "scipy", "workers": 8, "warm": True},
    "warm+auction+threads": {"lazy": True, "solver": "auction", "workers": 8, "warm": True},
    "warm+stream+threads": {"lazy": True, "solver": "scipy", "workers": 8, "stream": True, "warm": True},
}


def bench(label: str, device: torch.device, max_iter: int, ref_max_iter: int, variants: list[str],
          data: dict | None, steps: int, quick: bool, repeat: int = 1, repeat_under: float = 0.0) -> Iterator[dict]:
    """Time every variant (and, unless ``ref_max_iter`` is 0, the textbook reference) on one pair of nets.

    Each variant's time is the best of up to ``repeat`` runs; a run that took ``repeat_under`` seconds or more is
    not repeated (shared machines are noisy; long runs are less so, and would not fit the time budget)."""
    name, kwargs = (QUICK if quick else FULL)[label]
    nets = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        net = get_net(name, num_classes=10, in_channels=1 if data else 3, input_size=32, **kwargs).to(device)
        if data is not None and steps:
            train(net, data, steps, seed, kwargs["width"] if name != "mlp" else 1.0)  # mlp: width in units
        nets.append(net)
    theta_a = {k: v.detach().clone() for k, v in nets[0].state_dict().items()}
    theta_b = {k: v.detach().clone() for k, v in nets[1].state_dict().items()}
    ends = (loss_of(nets[0], theta_a, data), loss_of(nets[0], theta_b, data)) if data is not None else None
    if ends is not None:
        print(f"# {label}: endpoint test losses {ends[0]:.4f} {ends[1]:.4f} after {steps} steps", flush=True)
    spec = derive_spec(nets[0])
    weight_matching(spec, theta_a, theta_b, max_iter=1)  # warm-up (CUDA context, kernels)
    today, first = None, None
    barriers: dict[tuple, float] = {}
    for variant in variants:
        args = dict(VARIANTS[variant])
        a, b = theta_a, theta_b
        if args.get("stream"):
            a = {k: v.cpu() for k, v in a.items()}
            b = {k: v.cpu() for k, v in b.items()}
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        runs = []  # (seconds, seconds in the solver); best of up to `repeat` runs, repeated while under `repeat_under`
        while len(runs) < repeat and (not runs or runs[-1][0] < repeat_under):
            timer = wm.solve_assignment = AssignmentTimer()
            try:
                sync(device)
                t0 = time.perf_counter()
                result = weight_matching(spec, a, b, max_iter=max_iter, device=device, **args)
                sync(device)
                runs.append((time.perf_counter() - t0, timer.seconds))
            finally:
                wm.solve_assignment = timer.inner
        seconds, lsa = min(runs)
        row = {"net": label, "variant": variant, "params": sum(p.numel() for p in nets[0].parameters()),
               "groups": len(spec.groups), "s": seconds, "lsa_s": lsa, "runs": len(runs), "rounds": result.rounds,
               "solves": result.solves, "converged": result.converged, "cold": result.cold,
               "certified": result.certified, "bids": result.bids,
               "objective": result.objective}
        if device.type == "cuda":
            row["peak_mib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        today = today or result
        row["agree"] = sum(torch.equal(result.perm[g], today.perm[g]) for g in spec.groups)
        if ends is not None:  # equal permutations give equal barriers: each distinct one is evaluated once
            for key, perm in (("barrier", result.perm), ("naive", {g: torch.arange(len(p)) for g, p in
                                                                   result.perm.items()})):
                ident = tuple((g, perm[g].numpy().tobytes()) for g in sorted(perm))
                if ident not in barriers:
                    barriers[ident] = barrier(nets[0], theta_a, theta_b, spec, perm, data, ends)
                row[key] = barriers[ident]
        first = first or row
        yield row
    if ref_max_iter:
        t0 = time.perf_counter()
        ref_perm, ref_rounds = reference_weight_matching(spec, theta_a, theta_b, max_iter=ref_max_iter)
        yield {"net": label, "variant": "textbook", "s": time.perf_counter() - t0, "rounds": ref_rounds,
               "groups": len(spec.groups), "params": first["params"],
               "agree": sum(np.array_equal(today.perm[g].numpy(), ref_perm[g]) for g in spec.groups)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the reference always runs on the CPU)")
    parser.add_argument("--quick", action="store_true", help="tiny widths, for a CPU smoke run")
    parser.add_argument("--nets", nargs="+", default=["vgg16", "resnet20x16"], choices=list(FULL))
    parser.add_argument("--variants", nargs="+", default=None, choices=list(VARIANTS),
                        help="default: today, lazy, lazy+threads, lazy+lap (if installed), default, default+stream")
    parser.add_argument("--max-iter", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3, help="best of up to this many runs per variant")
    parser.add_argument("--repeat-under", type=float, default=5.0,
                        help="repeat a variant only while its runs take less than this many seconds")
    parser.add_argument("--ref-max-iter", type=int, default=0,
                        help="round limit of the textbook numpy reference (0, the default, skips it)")
    parser.add_argument("--train-steps", type=int, default=0,
                        help="SGD steps on real Fashion-MNIST per net before matching (0: random nets, no barrier)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", default=None, help="also append every row to this JSON-lines file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    variants = args.variants or (["today", "lazy", "lazy+threads"] + (["lazy+lap"] if has_lap() else [])
                                 + ["default", "default+stream"])
    data = fmnist(device) if args.train_steps else None
    print(f"device={device} torch={torch.__version__} threads={torch.get_num_threads()} lap={has_lap()} "
          f"default solver={resolve_solver('auto')} workers={wm.default_workers(device)}"
          + (f" gpu={torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""), flush=True)
    print(f"{'net':12s} {'variant':23s} {'params':>11s} {'groups':>6s} {'s':>8s} {'lsa_s':>7s} {'rounds':>6s} "
          f"{'solves':>6s} {'conv':>4s} {'runs':>4s} {'speedup':>7s} {'agree':>6s} {'peak_MiB':>8s} {'barrier':>8s} "
          f"{'naive':>7s} {'cold':>4s} {'cert':>4s} {'bids':>6s} objective")
    for label in args.nets:
        t_data = time.perf_counter()
        base = None
        for r in bench(label, device, args.max_iter, args.ref_max_iter, variants, data, args.train_steps,
                       args.quick, args.repeat, args.repeat_under):
            base = base or r["s"]
            fmt = lambda key, spec, r=r: format(r[key], spec) if key in r else "-"
            print(f"{r['net']:12s} {r['variant']:23s} {r['params']:11,d} {r['groups']:6d} {r['s']:8.3f} "
                  f"{fmt('lsa_s', '7.3f'):>7s} {r['rounds']:6d} {fmt('solves', 'd'):>6s} "
                  f"{str(r.get('converged', '-'))[0]:>4s} {fmt('runs', 'd'):>4s} {base / r['s']:6.2f}x "
                  f"{r['agree']:3d}/{r['groups']:<2d} {fmt('peak_mib', '8.1f'):>8s} {fmt('barrier', '8.4f'):>8s} "
                  f"{fmt('naive', '7.3f'):>7s} {fmt('cold', 'd'):>4s} {fmt('certified', 'd'):>4s} "
                  f"{fmt('bids', 'd'):>6s} {fmt('objective', '.9g')}", flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps({**r, "speedup": base / r["s"], "device": str(device),
                                        "train_steps": args.train_steps}) + "\n")
        print(f"# {label}: {time.perf_counter() - t_data:.1f} s in all (training, matching, barriers)", flush=True)


if __name__ == "__main__":
    main()
