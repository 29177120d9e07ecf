"""Assignments for groups whose units form heads (attention heads, groups of a grouped conv), tied across groups.

A tie's groups share one permutation of heads; within a head each group's units are permuted on their own (or kept
in order). The objective is a sum over heads, so for a candidate head pairing ``(h, h')`` the best within-head
assignments are independent: ``C[h, h'] = sum_g best_within_g(h, h')``, one assignment over heads picks the pairing,
and the within-head assignments of the chosen pairs complete the permutations. This is the exact optimum of the
tied problem given the cost matrices.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lmc_lightning.weights.permutation.solvers import solve_assignment
from lmc_lightning.weights.permutation.spec import Heads


def solve_tied(costs: dict[str, Tensor], heads: dict[str, Heads], solver: str = "scipy") -> dict[str, Tensor]:
    """Best tied permutations for ``costs`` (group -> ``[n, n]`` benefit matrix, maximised).

    Args:
        costs: Cost matrix of every group of one tie.
        heads: The groups' :class:`~lmc_lightning.weights.permutation.spec.Heads`.
        solver: Assignment solver for the head-level and within-head problems.

    Returns:
        Group -> permutation (CPU, int64).
    """
    n_heads = {heads[g].n_heads for g in costs}
    if len(n_heads) != 1:
        raise ValueError(f"Tied groups {sorted(costs)} disagree on the number of heads: {sorted(n_heads)}.")
    h = n_heads.pop()
    head_cost = torch.zeros(h, h, dtype=torch.float64)
    best: dict[tuple[str, int, int], Tensor] = {}
    for group, cost in costs.items():
        c = cost.detach().to("cpu", torch.float64)
        d = c.shape[0] // h
        blocks = c.reshape(h, d, h, d).permute(0, 2, 1, 3)  # [head_a, head_b, d, d]
        for i in range(h):
            for j in range(h):
                if heads[group].within:
                    col = solve_assignment(blocks[i, j], solver)
                    best[(group, i, j)] = col
                    head_cost[i, j] += blocks[i, j][torch.arange(d), col].sum()
                else:
                    head_cost[i, j] += blocks[i, j].diagonal().sum()
    order = solve_assignment(head_cost, solver)
    out = {}
    for group, cost in costs.items():
        d = cost.shape[0] // h
        parts = [int(order[i]) * d + (best[(group, i, int(order[i]))] if heads[group].within else torch.arange(d))
                 for i in range(h)]
        out[group] = torch.cat(parts)
    return out
