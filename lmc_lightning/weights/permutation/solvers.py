"""Linear assignment solvers for permutation matching: scipy, ``lap`` (LAPJV) and a torch auction solver.

All three maximise ``sum_i cost[i, col[i]]`` over permutations. ``scipy`` and ``lap`` are exact; ``auction`` is
Bertsekas' auction with epsilon scaling, run in torch on the cost's device (useful on a GPU), optimal to within
``n * eps`` of the objective. ``auto`` picks ``lap`` when it is installed (the ``fast`` extra) and ``scipy``
otherwise; ``benchmarks/align.py`` holds the measurements behind that choice.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

SOLVERS = ("auto", "scipy", "lap", "auction")


def has_lap() -> bool:
    """Whether the ``lap`` package (``pip install lap`` or ``lapx``) is importable."""
    return importlib.util.find_spec("lap") is not None


def resolve_solver(solver: str) -> str:
    """The concrete solver for ``solver`` (``auto`` -> ``lap`` if installed, else ``scipy``).

    Raises:
        ValueError: Unknown solver name, or ``lap`` asked for but not installed.
    """
    if solver not in SOLVERS:
        raise ValueError(f"Unknown assignment solver '{solver}'; choose one of {SOLVERS}.")
    if solver == "auto":
        return "lap" if has_lap() else "scipy"
    if solver == "lap" and not has_lap():
        raise ValueError("solver='lap' needs the lap package: pip install 'lmc-lightning[fast]' (or pip install lap); "
                         "or use solver='scipy'.")
    return solver


def _scipy(cost: Tensor) -> Tensor:
    _, col = linear_sum_assignment(cost.detach().to("cpu", torch.float64).numpy(), maximize=True)
    return torch.from_numpy(col.astype(np.int64))


def _lap(cost: Tensor) -> Tensor:
    import lap

    c = cost.detach().to("cpu", torch.float64).numpy()
    _, col, _ = lap.lapjv(c.max() - c, extend_cost=False)
    return torch.from_numpy(np.asarray(col, dtype=np.int64))


def auction(cost: Tensor, eps_final: float | None = None, scale: float = 8.0, max_iter: int = 100_000,
            price: Tensor | None = None, eps_start: float | None = None) -> Tensor:
    """Forward auction with epsilon scaling (Jacobi bidding: every unassigned row bids at once), in torch.

    Args:
        cost: ``[n, n]`` benefit matrix (maximised).
        eps_final: Final bid increment; the result is within ``n * eps_final`` of the optimum (default:
            ``1e-7 * (max - min) / n``, on float64).
        scale: Factor by which epsilon shrinks per phase.
        max_iter: Bidding iterations allowed over all phases.
        price: Starting column prices (a warm start, e.g. from a similar earlier problem); updated in place when
            given on the cost's device as float64.
        eps_start: First bid increment (default: a quarter of the cost range).

    Returns:
        Column index per row (CPU, int64).

    Raises:
        RuntimeError: ``max_iter`` bidding iterations did not assign every row.
    """
    c = cost.detach().double()
    n = c.shape[0]
    if c.shape != (n, n):
        raise ValueError(f"auction needs a square cost matrix, got shape {tuple(c.shape)}.")
    span = (c.max() - c.min()).item() or 1.0
    eps_final = eps_final if eps_final is not None else 1e-7 * span / n
    eps = max(eps_start if eps_start is not None else span / 4, eps_final)
    price = price if price is not None else torch.zeros(n, dtype=c.dtype, device=c.device)
    iters = 0
    while True:
        owner = torch.full((n,), -1, dtype=torch.long, device=c.device)  # column -> row
        assigned = torch.full((n,), -1, dtype=torch.long, device=c.device)  # row -> column
        while True:
            free = (assigned < 0).nonzero().squeeze(1)
            if free.numel() == 0:
                break
            iters += 1
            if iters > max_iter:
                raise RuntimeError(f"auction did not converge in {max_iter} iterations; use solver='scipy'.")
            value = c[free] - price
            top = value.topk(2, dim=1) if n > 1 else (value, torch.zeros_like(value, dtype=torch.long))
            best, second = top[0][:, 0], top[0][:, 1] if n > 1 else top[0][:, 0] - eps
            col = top[1][:, 0]
            bid = price[col] + (best - second) + eps
            # highest bid per column wins
            win_bid = torch.full((n,), -torch.inf, dtype=c.dtype, device=c.device).scatter_reduce(
                0, col, bid, reduce="amax")
            winner_mask = bid == win_bid[col]
            # one winner per column (ties: the lowest row)
            winner = torch.full((n,), n, dtype=torch.long, device=c.device).scatter_reduce(
                0, col[winner_mask], free[winner_mask], reduce="amin")
            won = (winner < n).nonzero().squeeze(1)
            prev = owner[won]
            assigned[prev[prev >= 0]] = -1
            owner[won] = winner[won]
            assigned[winner[won]] = won
            price[won] = win_bid[won]
        if eps <= eps_final:
            break
        eps = max(eps / scale, eps_final)
    auction.iterations = iters  # type: ignore[attr-defined]  # read by benchmarks
    return assigned.cpu()


def solve_assignment(cost: Tensor, solver: str = "auto") -> Tensor:
    """Column index that maximises ``sum_i cost[i, col[i]]`` (a permutation), on the CPU as int64.

    Args:
        cost: ``[n, n]`` matrix.
        solver: One of ``SOLVERS`` (see the module docstring).
    """
    solver = resolve_solver(solver)
    if solver == "lap":
        return _lap(cost)
    if solver == "auction":
        return auction(cost)
    return _scipy(cost)
