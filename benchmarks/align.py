"""Benchmark weight matching against a straightforward reference measured in the same run.

Ours: ``lmc_lightning.weights.permutation.weight_matching`` (cost matrices in torch on ``--device``, A's rows
unfolded once per group, one matmul per step). Reference: a plain per-layer Python loop that builds every cost
matrix in numpy from scratch (move axis, reshape, permute the other axes, accumulate ``A @ B.T``), then calls scipy
per step, with no batching. Both visit the groups in the same seeded order, so they take the same path; the table
reports the time (and ours' share in scipy, ``lsa_s``), the rounds, the speed-up per round and how many groups
ended with identical permutations.

    python benchmarks/align.py --quick                 # tiny nets on CPU (seconds)
    python benchmarks/align.py --device cuda           # mlp (width 2048), vgg16 and resnet20 at width 4
"""

from __future__ import annotations

import argparse
import importlib
import time

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from lmc_lightning.nets import get_net
from lmc_lightning.weights.permutation import PermutationSpec, derive_spec, weight_matching

wm = importlib.import_module("lmc_lightning.weights.permutation.weight_matching")  # the module, not the function

FULL = {"mlp": {"width": 2048, "depth": 3}, "vgg16": {"width": 4.0}, "resnet20": {"width": 4.0}}
QUICK = {"mlp": {"width": 64, "depth": 3}, "vgg16": {"width": 0.125}, "resnet20": {"width": 0.5}}


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
    """Wraps ours' ``solve_assignment`` to measure the share of time spent in scipy (the floor of any speed-up)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.inner = wm.solve_assignment

    def __call__(self, cost: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        out = self.inner(cost)
        self.seconds += time.perf_counter() - t0
        return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(name: str, kwargs: dict, device: torch.device, max_iter: int, ref_max_iter: int) -> dict:
    """Time ours and (unless ``ref_max_iter`` is 0) the reference on two randomly initialised nets."""
    torch.manual_seed(0)
    net_a = get_net(name, **kwargs)
    torch.manual_seed(1)
    net_b = get_net(name, **kwargs)
    theta_a = {k: v.to(device) for k, v in net_a.state_dict().items()}
    theta_b = {k: v.to(device) for k, v in net_b.state_dict().items()}
    t0 = time.perf_counter()
    spec = derive_spec(net_a)
    trace_s = time.perf_counter() - t0
    weight_matching(spec, theta_a, theta_b, max_iter=1)  # warm-up (CUDA context, kernels)
    sync(device)
    timer = wm.solve_assignment = AssignmentTimer()
    try:
        t0 = time.perf_counter()
        ours = weight_matching(spec, theta_a, theta_b, max_iter=max_iter)
        sync(device)
        ours_s = time.perf_counter() - t0
    finally:
        wm.solve_assignment = timer.inner
    row = {"net": name, "params": sum(p.numel() for p in net_a.parameters()), "groups": len(spec.groups),
           "trace_s": trace_s, "ours_s": ours_s, "lsa_s": timer.seconds, "rounds": ours.rounds}
    if ref_max_iter:
        t0 = time.perf_counter()
        ref_perm, ref_rounds = reference_weight_matching(spec, theta_a, theta_b, max_iter=ref_max_iter)
        row.update(ref_s=time.perf_counter() - t0, ref_rounds=ref_rounds,
                   agree=sum(np.array_equal(ours.perm[g].numpy(), ref_perm[g]) for g in spec.groups))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the reference always runs on the CPU)")
    parser.add_argument("--quick", action="store_true", help="tiny widths, for a CPU smoke run")
    parser.add_argument("--nets", nargs="+", default=list(FULL), choices=list(FULL))
    parser.add_argument("--max-iter", type=int, default=100)
    parser.add_argument("--ref-max-iter", type=int, default=None,
                        help="round limit of the reference (default --max-iter; 0 skips it); speed-up is per round")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sizes = QUICK if args.quick else FULL
    ref_max_iter = args.max_iter if args.ref_max_iter is None else args.ref_max_iter
    print(f"device={device} torch={torch.__version__} threads={torch.get_num_threads()}"
          + (f" gpu={torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""))
    print(f"{'net':9s} {'width':>6s} {'params':>11s} {'groups':>6s} {'trace_s':>7s} {'ours_s':>8s} {'lsa_s':>8s} "
          f"{'rounds':>6s} {'ref_s':>8s} {'ref_rnd':>7s} {'speedup':>8s} {'agree':>6s}")
    for name in args.nets:
        r = bench(name, sizes[name], device, args.max_iter, ref_max_iter)
        ref = f"{'-':>8s} {'-':>7s} {'-':>8s} {'-':>6s}"
        if "ref_s" in r:
            speedup = (r["ref_s"] / r["ref_rounds"]) / (r["ours_s"] / r["rounds"])
            ref = f"{r['ref_s']:8.3f} {r['ref_rounds']:7d} {speedup:7.2f}x {r['agree']:3d}/{r['groups']:<2d}"
        print(f"{r['net']:9s} {sizes[name]['width']:6g} {r['params']:11,d} {r['groups']:6d} {r['trace_s']:7.3f} "
              f"{r['ours_s']:8.3f} {r['lsa_s']:8.3f} {r['rounds']:6d} {ref}", flush=True)


if __name__ == "__main__":
    main()
