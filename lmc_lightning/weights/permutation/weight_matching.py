"""Weight matching (Ainsworth et al., Git Re-Basin): coordinate descent over permutation groups.

Each step fixes all groups but one and solves a linear assignment that maximises ``sum <W_A, P(W_B)>`` over every
weight the group touches; cost matrices are computed in torch on the weights' device, the assignment by the chosen
solver (:mod:`~lmc_lightning.weights.permutation.solvers`).

Two exact savings over the textbook loop: a group whose cost matrix cannot have changed since it was last solved
(no group sharing a weight with it has changed its permutation since) is not solved again (``lazy``), and with
``stream=True`` only the tensors of the group being solved are on the device, so neither weight dict need be
resident there.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lmc_lightning.weights.permutation.apply import Permutation, axis_index, by_axis, check_permutation, identity
from lmc_lightning.weights.permutation.heads import solve_tied
from lmc_lightning.weights.permutation.solvers import (
    auction,
    auction_accuracy,
    dual_prices,
    optimality_gap,
    resolve_solver,
)
from lmc_lightning.weights.permutation.solvers import solve_assignment as _solve
from lmc_lightning.weights.permutation.spec import AxisLike, PermutationSpec


@dataclass
class MatchResult:
    """Outcome of weight matching.

    Attributes:
        perm: Group name -> index tensor (CPU, int64); apply it to B.
        rounds: Full rounds over all groups that ran (the last one made no improvement unless ``max_iter`` stopped).
        objective: Final ``sum <W_A, P(W_B)>`` over all matched weights.
        converged: True when a round made no improvement before ``max_iter``.
        solves: Steps taken (``lazy`` skips those whose cost matrix is unchanged).
        cold: Steps solved from scratch by ``solver`` (``warm``: each group's first).
        certified: Steps skipped because the dual prices of the group's last solve proved it optimal (``warm``).
        bids: Bidding rounds of the warm-started auctions.
    """

    perm: Permutation
    rounds: int
    objective: float
    converged: bool
    solves: int = 0
    cold: int = 0
    certified: int = 0
    bids: int = 0


def solve_assignment(cost: Tensor, solver: str = "scipy", minimise: bool = False) -> Tensor:
    """Column index that maximises (``minimise``: minimises) ``sum_i cost[i, col[i]]`` (a permutation), CPU int64."""
    return _solve(cost, solver, minimise)


def default_workers(device: torch.device) -> int:
    """Threads of ``weight_matching(workers=None)``: up to 8 when cost matrices are built on a GPU, else 1."""
    return min(8, os.cpu_count() or 1) if device.type == "cuda" else 1


def _unfold(tensor: Tensor, ax: AxisLike, n: int) -> Tensor:
    """``tensor`` with the group's axis (segment) first, as ``[n, rest]`` (each unit's block folded into its row)."""
    if ax.offset or ax.length is not None:
        tensor = tensor.narrow(ax.axis, ax.offset, n * ax.block)
    return tensor.movedim(ax.axis, 0).reshape(n, -1)


class _Matcher:
    """State of one weight-matching run.

    Resident (``stream=False``): A's unfolded weights per group and B's weights are kept on the device. Streaming:
    both dicts stay where they are and each cost matrix moves only the tensors of its group to the device.
    """

    def __init__(self, spec: PermutationSpec, theta_a: Mapping[str, Tensor], theta_b: Mapping[str, Tensor],
                 device: torch.device, stream: bool = False, pin: bool = True) -> None:
        self.sizes = spec.sizes(theta_a)
        spec.sizes(theta_b)
        by_key = spec.by_key()
        keys = [k for k in by_key if k not in spec.buffers and theta_a[k].is_floating_point()]
        self.device, self.stream = device, stream
        self.axes: dict[str, dict[int, list]] = {k: {} for k in keys}  # key -> axis -> (group, axis) entries
        for (key, axis), entries in by_axis(spec).items():
            if key in self.axes:
                self.axes[key][axis] = entries
        self.entries: dict[str, list[AxisLike]] = {g: [] for g in spec.groups}
        for k in keys:
            for group, ax in by_key[k]:
                self.entries[group].append(ax)
        self.neighbours = {g: {other for ax in axes for other, _ in by_key[ax.key]} - {g}
                           for g, axes in self.entries.items()}
        dtype = torch.promote_types(theta_a[keys[0]].dtype, torch.float32) if keys else torch.float32
        self.dtype = dtype
        home = None if stream else device
        self.b = {k: theta_b[k].detach().to(home or theta_b[k].device) for k in keys}
        self.a = {k: theta_a[k].detach().to(home or theta_a[k].device, dtype) for k in keys}
        if stream and pin and device.type == "cuda":  # page-locked host copies: faster, asynchronous transfers
            self.a, self.b = ({k: v if v.is_cuda or v.is_pinned() else v.pin_memory() for k, v in d.items()}
                              for d in (self.a, self.b))
        self.a_rows = {} if stream else {g: self.rows(self.a, g, None) for g, axes in self.entries.items() if axes}

    def rows(self, theta: Mapping[str, Tensor], group: str, perm: Mapping[str, Tensor] | None) -> Tensor:
        """Weights touching ``group`` (other axes permuted by ``perm`` unless None) on the device, ``[n, rest]``."""
        rows = []
        for ax in self.entries[group]:
            t = theta[ax.key].to(self.device, non_blocking=True)
            if perm is not None:
                for axis, entries in self.axes[ax.key].items():
                    if axis != ax.axis:
                        t = t.index_select(axis, axis_index(entries, perm, t.shape[axis], t.device))
            rows.append(_unfold(t.to(self.dtype), ax, self.sizes[group]))
        return torch.cat(rows, 1)

    def cost(self, group: str, perm: Mapping[str, Tensor]) -> Tensor:
        """``[n, n]`` matrix of inner products between A's unit ``i`` and B's unit ``j`` of ``group``."""
        a_rows = self.a_rows[group] if group in self.a_rows else self.rows(self.a, group, None)
        return a_rows @ self.rows(self.b, group, perm).T

    def objective(self, perm: Mapping[str, Tensor]) -> float:
        """``sum <W_A, P(W_B)>`` over all matched weights."""
        total = 0.0
        for key, b in self.b.items():
            b = b.to(self.device)
            for axis, entries in self.axes[key].items():
                b = b.index_select(axis, axis_index(entries, perm, b.shape[axis], b.device))
            total += float((self.a[key].to(self.device) * b.to(self.dtype)).sum())
        return total


class _Steps:
    """The steps of coordinate descent, one per unit (a group, or a tie of head-structured groups), run in order or
    concurrently where independent."""

    def __init__(self, matcher: _Matcher, spec: PermutationSpec, perm: dict[str, Tensor], solver: str, lazy: bool,
                 device: torch.device, warm: bool = False) -> None:
        self.matcher, self.spec, self.perm, self.solver, self.lazy = matcher, spec, perm, solver, lazy
        self.device, self.warm = device, warm
        self.prices: dict[str, Tensor] = {}  # group -> dual prices of its last solve (warm)
        self.cold = self.certified = self.bids = 0
        self.stale = set(matcher.entries)  # groups whose cost may differ from the one they were last solved on
        self.solves = 0
        self.lock = threading.Lock()
        self.buffers: dict[str, Tensor] = {}  # group -> page-locked host copy of its cost matrix (see host)

    def host(self, cost: Tensor, group: str) -> Tensor:
        """``group``'s ``cost`` on the CPU; from a GPU through a page-locked buffer kept per group and reused by the
        group's next step (valid until then: a group's steps never overlap, see :meth:`run_round`)."""
        if not cost.is_cuda:
            return cost.cpu()
        buffer = self.buffers.get(group)
        if buffer is None or buffer.shape != cost.shape or buffer.dtype != cost.dtype:
            buffer = self.buffers[group] = torch.empty(cost.shape, dtype=cost.dtype, pin_memory=True)
        buffer.copy_(cost, non_blocking=True)
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(cost.device))
        done.synchronize()
        return buffer

    def neighbours(self, unit: tuple[str, ...]) -> set[str]:
        return set().union(*(self.matcher.neighbours[g] for g in unit)) - set(unit)

    def step(self, unit: tuple[str, ...]) -> bool:
        """Re-solve ``unit`` given the others; True if the objective improved."""
        with self.lock:
            if self.lazy and not self.stale & set(unit):
                return False
            self.stale -= set(unit)
            self.solves += 1
        if self.warm and len(unit) == 1 and unit[0] not in self.spec.heads:
            return self.warm_step(unit[0])
        costs = {}
        single = len(unit) == 1 and unit[0] not in self.spec.heads
        # lap minimises: a single group's cost is negated on the device (exact), so the host gets no second copy
        sign = -1.0 if single and self.solver == "lap" else 1.0
        for group in unit:
            cost = self.matcher.cost(group, self.perm)
            # the solvers take the matmul's own dtype (scipy converts to float64 itself, lapjvh keeps float32)
            costs[group] = cost if self.solver == "auction" else self.host(cost.neg_() if sign < 0 else cost, group)
        if single:
            cols = {unit[0]: solve_assignment(costs[unit[0]], self.solver, minimise=sign < 0)}
        else:
            cols = solve_tied(costs, self.spec.heads, "scipy" if self.solver == "auction" else self.solver)
        old = new = 0.0
        changed = False
        for group, cost in costs.items():
            rows = torch.arange(cost.shape[0])
            old += sign * cost[rows, self.perm[group].to(cost.device)].sum(dtype=torch.float64).item()
            new += sign * cost[rows, cols[group].to(cost.device)].sum(dtype=torch.float64).item()
            changed |= not torch.equal(cols[group], self.perm[group].cpu())
        return self.update(unit, cols, changed, new > old + 1e-12 * abs(old))

    def warm_step(self, group: str) -> bool:
        """One group's step from the dual prices of its last solve: skipped when they prove the current permutation
        optimal; else solved again, warm-started from them (the auction from its prices, scipy/lap on the cost minus
        the prices, where most rows find their column at once); a group's first step is a cold solve."""
        cost = self.matcher.cost(group, self.perm).to(torch.float64)
        n = cost.shape[0]
        current = self.perm[group].to(cost.device)
        rows = torch.arange(n, device=cost.device)
        old = float(cost[rows, current].sum())
        price = self.prices.get(group)
        auctioned = price is not None and self.solver == "auction"
        span = float(cost.max() - cost.min())
        # ties below the solver's accuracy (auction: its integer grid; exact solvers: float64 sums) do not count
        tol = auction_accuracy(n) * span if auctioned else 1e-10 * (span + abs(old))
        if price is not None and float(optimality_gap(cost, current, price)) <= tol:
            with self.lock:
                self.certified += 1
            return False
        if auctioned:
            solved = auction(cost, price, current)
        else:
            shifted = cost if price is None else cost - price
            col = solve_assignment(shifted.cpu(), "scipy" if self.solver == "auction" else self.solver)
            solved = dual_prices(cost, col, price)
        with self.lock:
            self.bids += solved.iterations if auctioned else 0
            self.cold += price is None
            self.prices[group] = solved.price
        if float(cost[rows, solved.col].sum()) <= old + tol:
            return self.update((group,), {group: current}, False, False)
        return self.update((group,), {group: solved.col}, True, True)

    def update(self, unit: tuple[str, ...], cols: dict[str, Tensor], changed: bool, improved: bool) -> bool:
        """Store ``unit``'s new permutations; mark its neighbours stale if one changed; pass ``improved`` on."""
        with self.lock:
            if changed:
                self.stale |= self.neighbours(unit)
            for group in unit:
                self.perm[group] = cols[group].to(self.device)
        return improved

    def run_round(self, order: list[tuple[str, ...]], pool: ThreadPoolExecutor | None) -> bool:
        """Visit ``order`` (every unit once); with a pool, a step starts once the earlier steps of its neighbours
        are done. The round returns when all its steps have."""
        if pool is None:
            return any([self.step(unit) for unit in order])
        deps = []
        for k, unit in enumerate(order):
            near = self.neighbours(unit)
            deps.append({j for j in range(k) if near & set(order[j])})
        done: set[int] = set()
        running: dict[Future, int] = {}
        improved, started = False, set()
        while len(done) < len(order):
            for k in range(len(order)):
                if k not in started and deps[k] <= done:
                    started.add(k)
                    running[pool.submit(self.step, order[k])] = k
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                improved |= future.result()
                done.add(running.pop(future))
        return improved


def weight_matching(spec: PermutationSpec, theta_a: Mapping[str, Tensor], theta_b: Mapping[str, Tensor],
                    max_iter: int = 100, seed: int = 0, init: Mapping[str, Tensor] | None = None,
                    device: str | torch.device | None = None, solver: str = "auto", lazy: bool = True,
                    stream: bool = False, pin: bool = True, workers: int | None = None, warm: bool = False,
                    progress: Callable[[int], Any] | None = None) -> MatchResult:
    """Find the permutation of B's units that best matches A's weights.

    Coordinate descent: each round visits the groups in a random order (seeded) and replaces one group's
    permutation by the optimal linear assignment given the others; it stops after a round with no improvement of
    the objective, or after ``max_iter`` rounds. Running statistics listed in ``spec.buffers`` are permuted but
    not matched.

    Args:
        spec: Permutation spec of the architecture.
        theta_a: Reference weights.
        theta_b: Weights to permute.
        max_iter: Maximum number of rounds.
        seed: Seed of the group order.
        init: Starting permutation (default identity).
        device: Where to compute the cost matrices (default: the device of A's weights).
        solver: Linear assignment solver, one of
            :data:`~lmc_lightning.weights.permutation.solvers.SOLVERS` (``auto``: ``lap``, i.e. lapx's ``lapjvh`` on
            the cost matrices in their own dtype, if the ``fast`` extra is installed, else scipy; both exact, and
            lapjvh 4-5x faster on weight-matching costs). ``solver="scipy", lazy=False, workers=1`` is the loop as it
            was before issue 15 (every group every round, scipy in float64).
        lazy: Skip a group whose cost matrix is unchanged since its last solve (same result, fewer solves).
        stream: Keep both weight dicts where they are and move one group's tensors at a time to ``device``.
        pin: With ``stream`` and a CUDA ``device``, first copy the host tensors to page-locked memory (one more
            host copy of both dicts, for faster, asynchronous transfers: on an H200 streamed weight matching took
            0.225 s instead of 0.503 s for ResNet-20 x16 and 8.4 s instead of 19.5 s for VGG-16 x4,
            ``benchmarks/align.py``). Tensors already pinned or on the GPU are used as they are.
        workers: Threads that solve, at the same time, steps of a round that share no weight (a step waits for the
            earlier steps of the groups it shares a weight with), so the result is the same as with one worker.
            Default: up to 8 when the cost matrices are computed on a GPU, else 1 (on the CPU the matmuls already
            use every core).
        warm: Keep each group's dual prices (exact duals of its last solve, by Bellman-Ford sweeps on the device,
            or the auction's prices): a step whose current permutation they prove optimal (gap <= 1e-10 of the cost
            range plus the objective; for the auction, its accuracy) is skipped; any other step is solved again
            warm-started (``solver`` on the cost minus the prices, or for ``solver="auction"`` the auction from its
            prices; a group's first step is a cold solve by scipy/lap). A new permutation is taken only when it is
            better by more than that tolerance, so the result equals the exact loop's up to ties at that level.
            Default: off. Measured on one H200 (ResNet-20 x16) the sweeps cost more than the re-solves they save
            (0.36x the exact loop's speed, against 1.52x for ``lazy`` with threads); on the CPU they cost about as
            much as a solve.
        progress: Called with 1 after every round (e.g. a progress bar's ``update``).

    Returns:
        A :class:`MatchResult`; ``apply_permutation(theta_b, spec, result.perm)`` gives the aligned weights.
    """
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}.")
    first = next(iter(theta_a.values()))
    device = torch.device(device) if device is not None else first.device
    if workers is None:
        workers = default_workers(device)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}.")
    solver = resolve_solver(solver)
    matcher = _Matcher(spec, theta_a, theta_b, device, stream=stream, pin=pin)
    perm = identity(spec, theta_a)
    if init is not None:
        check_permutation(spec, init, theta_a)
        perm = {g: torch.as_tensor(p).long().cpu() for g, p in init.items() if g in perm}
    perm = {g: p.to(device) for g, p in perm.items()}
    units = [tuple(g for g in unit if matcher.entries[g]) for unit in spec.units()]
    units = [u for u in units if u]
    gen = torch.Generator().manual_seed(seed)
    state = _Steps(matcher, spec, perm, solver, lazy, device, warm)
    rounds, converged = 0, False
    with ThreadPoolExecutor(workers) if workers > 1 else contextlib.nullcontext() as pool:
        while rounds < max_iter:
            rounds += 1
            order = [units[i] for i in torch.randperm(len(units), generator=gen).tolist()]
            improved = state.run_round(order, pool)
            if progress is not None:
                progress(1)
            if not improved:
                converged = True
                break
    return MatchResult({g: p.cpu() for g, p in perm.items()}, rounds, matcher.objective(perm), converged,
                       state.solves, state.cold, state.certified, state.bids)
