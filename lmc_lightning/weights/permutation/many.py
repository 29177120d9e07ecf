"""N-way alignment: bring N models into one basin before merging them (seed 004's multiple matching).

Orders, as in seed 004's ``mulitple_matching`` notebook:

- ``reference``: every model is aligned to model 0;
- ``sequential``: model ``i`` is aligned to the aligned model ``i - 1``;
- ``iterative`` (MergeMany, Ainsworth et al.): every model, in a seeded random order per round, is re-aligned to the
  average of the others (all starting unpermuted) until a round changes no permutation. Each step maximises the
  part of ``sum_{i<j} <P_i W_i, P_j W_j>`` that depends on ``P_i``, so the objective never decreases and the loop
  reaches a fixed point.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lmc_lightning.weights.data import Data, materialize
from lmc_lightning.weights.paths import check_compatible
from lmc_lightning.weights.permutation.align import METHODS, align_weights
from lmc_lightning.weights.permutation.apply import Permutation, apply_permutation, identity
from lmc_lightning.weights.permutation.check import check_equivalence, probe_input
from lmc_lightning.weights.permutation.spec import PermutationSpec
from lmc_lightning.weights.permutation.trace import derive_spec
from lmc_lightning.weights.permutation.weight_matching import weight_matching

ORDERS = ("reference", "sequential", "iterative")


@dataclass
class ManyAlignment:
    """Outcome of :func:`align_many_weights`.

    Attributes:
        weights: The aligned weight dicts, one per model (each computes the same function as its original).
        perms: The permutation applied to each original (identity for model 0 unless ``order="iterative"``).
        rounds: Rounds over all models (1 for ``reference`` and ``sequential``).
        converged: For ``iterative``, whether a round changed no permutation before ``max_rounds``; else True.
    """

    weights: list[dict[str, Tensor]]
    perms: list[Permutation]
    rounds: int = 1
    converged: bool = True


def _mean(thetas: Sequence[Mapping[str, Tensor]], keys: set[str]) -> dict[str, Tensor]:
    first = thetas[0]
    return {k: (torch.stack([t[k].float() for t in thetas]).mean(0).to(first[k].dtype)
                if k in keys and first[k].is_floating_point() else first[k]) for k in first}


def align_many_weights(net: nn.Module, thetas: Sequence[Mapping[str, Tensor]], method: str = "weight",
                       order: str = "reference", data: Data | None = None, spec: PermutationSpec | None = None,
                       seed: int = 0, max_iter: int = 100, max_rounds: int = 50, check: bool = True,
                       probe: Tensor | None = None, solver: str = "auto", device: str | torch.device | None = None,
                       progress: Callable[[int], Any] | None = None, **method_kwargs: Any) -> ManyAlignment:
    """Align N weight dicts of one architecture into a common basin.

    Args:
        net: Any instance of the architecture (for the spec, the data-driven methods and the check).
        thetas: Two or more full state dicts.
        method: ``"weight"``, ``"activation"`` or ``"ste"`` (see
            :func:`~lmc_lightning.weights.permutation.align_weights`); ``iterative`` needs ``"weight"``.
        order: ``"reference"``, ``"sequential"`` or ``"iterative"`` (see the module docstring).
        data: Inputs for the data-driven methods (and the default probe of the check).
        spec: Permutation spec (default: ``derive_spec(net)``).
        seed: Seed of weight matching's group order and of the iterative model order.
        max_iter: Round limit of each weight matching.
        max_rounds: Round limit of ``iterative``.
        check: Check after alignment that every aligned dict computes its original's function (float64, on a probe
            batch); raises :class:`~lmc_lightning.weights.permutation.check.EquivalenceError` if not.
        probe: Inputs of that check (default: the first few of ``data``, else random inputs of a guessed shape).
        solver: Assignment solver of weight matching.
        device: Device for the matching.
        progress: Called with 1 after every step of the pairwise matchings (see
            :func:`~lmc_lightning.weights.permutation.align_weights`).
        **method_kwargs: Further arguments of the method (``batch_size``; STE's ``epochs``, ``lr``, ...).

    Returns:
        A :class:`ManyAlignment`.
    """
    if order not in ORDERS:
        raise ValueError(f"Unknown order '{order}'; choose one of {ORDERS}.")
    if method not in METHODS:
        raise ValueError(f"Unknown alignment method '{method}'; choose one of {METHODS}.")
    if order == "iterative" and method != "weight":
        raise ValueError("order='iterative' re-aligns each model to the average of the others' weights, which only "
                         f"weight matching defines; use method='weight' or order='reference'/'sequential' for "
                         f"'{method}'.")
    if len(thetas) < 2:
        raise ValueError(f"align_many needs at least 2 models, got {len(thetas)}.")
    check_compatible(*thetas, names=[f"model {i}" for i in range(len(thetas))])
    spec = spec if spec is not None else derive_spec(net)
    thetas = [dict(t) for t in thetas]
    if data is not None and not isinstance(data, Tensor):  # read once, not once per pair
        x, y = materialize(data, "train", what="data", labels=method == "ste")
        data = (x, y) if y is not None else x
    pair = dict(method=method, data=data, spec=spec, seed=seed, max_iter=max_iter, device=device, check=False,
                solver=solver, progress=progress, **method_kwargs)
    perms: list[Permutation] = [identity(spec, thetas[0])]
    aligned: list[dict[str, Tensor]] = [thetas[0]]
    rounds, converged = 1, True
    if order in ("reference", "sequential"):
        for theta in thetas[1:]:
            target = thetas[0] if order == "reference" else aligned[-1]
            theta_aligned, perm = align_weights(net, target, theta, **pair)
            aligned.append(theta_aligned)
            perms.append(perm)
    else:
        perms = [identity(spec, t) for t in thetas]
        aligned = list(thetas)
        keys = spec.keys - spec.buffers
        gen = torch.Generator().manual_seed(seed)
        rounds, converged = 0, False
        while rounds < max_rounds:
            rounds += 1
            changed = False
            for i in torch.randperm(len(thetas), generator=gen).tolist():
                target = _mean([aligned[j] for j in range(len(thetas)) if j != i], keys)
                result = weight_matching(spec, target, thetas[i], max_iter=max_iter, seed=seed, init=perms[i],
                                         device=device, solver=solver, progress=progress)
                if any(not torch.equal(result.perm[g], perms[i][g]) for g in perms[i]):
                    changed = True
                    perms[i] = result.perm
                    aligned[i] = apply_permutation(thetas[i], spec, perms[i])
            if not changed:
                converged = True
                break
    if check:
        x = probe if probe is not None else probe_input(net, data)
        for theta, perm in zip(thetas, perms, strict=True):
            if any(not torch.equal(p, torch.arange(len(p))) for p in perm.values()):
                check_equivalence(net, theta, spec, perm, x)
    return ManyAlignment(aligned, perms, rounds, converged)


def align_many(nets: Sequence[nn.Module], method: str = "weight", order: str = "reference", data: Data | None = None,
               spec: PermutationSpec | None = None, seed: int = 0, **kwargs: Any) -> tuple[list[nn.Module],
                                                                                         list[Permutation]]:
    """Align N networks of one architecture into a common basin; see :func:`align_many_weights` for the arguments.

    Returns:
        ``(aligned_nets, perms)``: copies of the nets (each computing its original's function) and the permutation
        applied to each.

    Example:
        >>> aligned, perms = align_many([net_a, net_b, net_c], order="iterative")
        >>> aligned, perms = align_many(nets, method="activation", order="sequential", data=x)
    """
    result = align_many_weights(nets[0], [n.state_dict() for n in nets], method=method, order=order, data=data,
                                spec=spec, seed=seed, **kwargs)
    out = []
    for net, theta in zip(nets, result.weights, strict=True):
        copied = copy.deepcopy(net)
        copied.load_state_dict(theta)
        out.append(copied)
    return out, result.perms
