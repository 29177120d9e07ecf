"""One entry point for model re-basin: align B to A by weight, activation or STE matching."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lmc_lightning.weights.data import Data, materialize
from lmc_lightning.weights.paths import check_compatible, check_finite
from lmc_lightning.weights.permutation.activation_matching import activation_matching
from lmc_lightning.weights.permutation.apply import Permutation, apply_permutation
from lmc_lightning.weights.permutation.check import check_equivalence, probe_input
from lmc_lightning.weights.permutation.spec import PermutationSpec
from lmc_lightning.weights.permutation.ste import ste_matching
from lmc_lightning.weights.permutation.trace import derive_spec
from lmc_lightning.weights.permutation.weight_matching import weight_matching

METHODS = ("weight", "activation", "ste")


def align_weights(net: nn.Module, theta_a: Mapping[str, Tensor], theta_b: Mapping[str, Tensor],
                  method: str = "weight", data: Data | None = None, spec: PermutationSpec | None = None,
                  seed: int = 0, max_iter: int = 100, batch_size: int = 256,
                  device: str | torch.device | None = None, check: bool = True, probe: Tensor | None = None,
                  solver: str = "auto", progress: Callable[[int], Any] | None = None,
                  **ste_kwargs: Any) -> tuple[dict[str, Tensor], Permutation]:
    """Permute weight dict ``theta_b`` into the basin of ``theta_a``.

    Args:
        net: Any instance of the architecture (used to derive the spec and, for data-driven methods, to run it).
        theta_a: Reference weights (full state dict).
        theta_b: Weights to permute; the result computes the same function as ``theta_b``.
        method: ``"weight"`` (weight matching, no data), ``"activation"`` (activation correlations on ``data``) or
            ``"ste"`` (straight-through estimator on labelled ``data``).
        data: Inputs for the data-driven methods, in any form :func:`~lmc_lightning.weights.data.materialize`
            accepts (a tensor, ``(x, y)``, a DataLoader or other iterable of batches, a Dataset, a datamodule: its
            training split); read once and moved to ``device`` once (STE matching needs labels).
        spec: Permutation spec (default: ``derive_spec(net)``).
        seed: Seed of weight matching's group order.
        max_iter: Round limit of weight matching.
        batch_size: Batch size when ``data`` is given as tensors.
        device: Device for the computation (default: that of ``theta_a``).
        check: Check that the permuted weights compute the same function as ``theta_b`` on a probe batch (float64;
            see :func:`~lmc_lightning.weights.permutation.check.check_equivalence`); raises
            :class:`~lmc_lightning.weights.permutation.check.EquivalenceError` naming the group and layer if not.
        probe: Inputs for the check (default: the first few of ``data``, else random inputs of a guessed shape).
        solver: Linear assignment solver of weight matching (see
            :func:`~lmc_lightning.weights.permutation.solvers.solve_assignment`).
        progress: Called with 1 after every round of weight matching, every batch of activation matching and every
            step of STE matching (e.g. the ``update`` of a bar from :func:`lmc_lightning.progress.progress_bar`).
        **ste_kwargs: Further arguments of :func:`ste_matching` (``epochs``, ``lr``, ``loss_fn``, ...).

    Returns:
        ``(theta_b_aligned, perm)``: the permuted weights (on ``theta_b``'s device) and group name -> index tensor.
    """
    if method not in METHODS:
        raise ValueError(f"Unknown alignment method '{method}'; choose one of {METHODS}.")
    if ste_kwargs and method != "ste":
        raise TypeError(f"Unexpected argument(s) {sorted(ste_kwargs)} for method '{method}'.")
    check_compatible(theta_a, theta_b, names=["theta_a", "theta_b"])
    check_finite(theta_a, "theta_a")
    check_finite(theta_b, "theta_b")
    spec = spec if spec is not None else derive_spec(net)
    if method != "weight":
        if data is None:
            raise ValueError(f"{method} matching needs data: pass data=x, (x, y), a DataLoader, a Dataset or a "
                             "datamodule.")
        where = device if device is not None else next(iter(theta_a.values())).device
        x, y = materialize(data, "train", what="data", labels=method == "ste", device=where)
        data = (x, y) if y is not None else x
    if method == "weight":
        perm = weight_matching(spec, theta_a, theta_b, max_iter=max_iter, seed=seed, device=device,
                               solver=solver, progress=progress).perm
    elif method == "activation":
        perm = activation_matching(net, spec, theta_a, theta_b, data, batch_size=batch_size, device=device,
                                   progress=progress)
    else:
        perm = ste_matching(net, spec, theta_a, theta_b, data, batch_size=batch_size, seed=seed, max_iter=max_iter,
                            device=device, progress=progress, **ste_kwargs)
    if check:
        check_equivalence(net, theta_b, spec, perm, probe if probe is not None else probe_input(net, data))
    return apply_permutation(theta_b, spec, perm), perm


def align(net_a: nn.Module, net_b: nn.Module, method: str = "weight", data: Data | None = None,
          spec: PermutationSpec | None = None, seed: int = 0, **kwargs: Any) -> tuple[nn.Module, Permutation]:
    """Return a copy of ``net_b`` permuted into ``net_a``'s basin, and the permutation.

    The copy computes the same function as ``net_b``. See :func:`align_weights` for the arguments.

    Example:
        >>> aligned_b, perm = align(net_a, net_b)                          # weight matching
        >>> aligned_b, perm = align(net_a, net_b, "activation", data=x)   # activation matching
    """
    theta_a, theta_b = net_a.state_dict(), net_b.state_dict()
    theta, perm = align_weights(net_a, theta_a, theta_b, method=method, data=data, spec=spec, seed=seed, **kwargs)
    aligned = copy.deepcopy(net_b)
    aligned.load_state_dict(theta)
    return aligned, perm
