"""Activation matching: pair units of A and B by the correlation of their activations on data.

Statistics are kept as sums (``sum x``, ``sum y``, ``sum x y^T``, ``sum x^2``, ``sum y^2``, count) so that batches,
and ranks under DDP (summed with ``torch.distributed.all_reduce``), combine exactly. A unit of a conv map is one
channel; every spatial position is one sample. A group with several activation points (a residual stream) is
matched on the sum of the correlation matrices of its points.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lmc_lightning.weights.permutation.apply import Permutation
from lmc_lightning.weights.permutation.batches import Data, capture_module, eval_mode, iter_batches, run_with
from lmc_lightning.weights.permutation.heads import solve_tied
from lmc_lightning.weights.permutation.spec import PermutationSpec
from lmc_lightning.weights.permutation.trace import LeafTracer
from lmc_lightning.weights.permutation.weight_matching import solve_assignment


def as_samples(features: Tensor, n: int) -> Tensor:
    """``[N, n * block, *spatial]`` activations -> ``[samples, n]`` (block entries and positions become samples)."""
    if features.ndim < 2 or features.shape[1] % n:
        raise ValueError(f"Activations of shape {tuple(features.shape)} do not hold {n} units on axis 1.")
    return features.reshape(features.shape[0], n, -1).movedim(1, -1).reshape(-1, n)


class CorrelationStats:
    """Running sums for the cross-correlation of two sets of ``n`` features (float64).

    Args:
        n: Number of units on each side.
        device: Where the sums live.
    """

    def __init__(self, n: int, device: torch.device | str = "cpu") -> None:
        z = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=device)
        self.sums = {"x": z(n), "y": z(n), "xy": z(n, n), "xx": z(n), "yy": z(n), "count": z(())}

    def update(self, x: Tensor, y: Tensor) -> None:
        """Add samples ``x``, ``y`` of shape ``[samples, n]``."""
        x, y = x.detach().double(), y.detach().double()
        s = self.sums
        s["x"] += x.sum(0)
        s["y"] += y.sum(0)
        s["xy"] += x.T @ y
        s["xx"] += x.square().sum(0)
        s["yy"] += y.square().sum(0)
        s["count"] += x.shape[0]

    def all_reduce(self) -> None:
        """Sum the statistics over ranks when ``torch.distributed`` is initialised."""
        if dist.is_available() and dist.is_initialized():
            for value in self.sums.values():
                dist.all_reduce(value, op=dist.ReduceOp.SUM)

    def correlation(self, eps: float = 1e-12) -> Tensor:
        """``[n, n]`` Pearson correlation between unit ``i`` of x and unit ``j`` of y (0 for constant units)."""
        s = self.sums
        count = s["count"].clamp_min(1)
        mx, my = s["x"] / count, s["y"] / count
        cov = s["xy"] / count - mx[:, None] * my[None, :]
        sx = (s["xx"] / count - mx.square()).clamp_min(0).sqrt()
        sy = (s["yy"] / count - my.square()).clamp_min(0).sqrt()
        return cov / (sx[:, None] * sy[None, :] + eps)


def feature_slice(output: Tensor, point: str) -> Tensor:
    """The features of activation point ``point`` in its captured ``output``, moved to dim 1: ``name@axis`` has
    them on ``axis`` (default 1), ``name@axis[start:stop]`` on entries ``start ... stop - 1`` of it (one chunk of a
    fused projection such as timm's ``qkv``)."""
    if "@" not in point:
        return output
    spec = point.split("@", 1)[1]
    axis, _, cut = spec.partition("[")
    output = output.movedim(int(axis), 1)
    if cut:
        start, stop = (int(v) for v in cut.rstrip("]").split(":"))
        output = output.narrow(1, start, stop - start)
    return output


def activation_stats(net: nn.Module, spec: PermutationSpec, theta_a: Mapping[str, Tensor],
                     theta_b: Mapping[str, Tensor], data: Data, batch_size: int = 256,
                     device: str | torch.device | None = None,
                     progress: Callable[[int], Any] | None = None) -> dict[str, list[CorrelationStats]]:
    """Correlation statistics of every activation point of every group (in eval mode).

    ``progress`` (e.g. a progress bar's ``update``) is called with 1 after every batch.

    Returns:
        Group name -> one :class:`CorrelationStats` per activation point, already all-reduced over ranks.
    """
    missing = [g for g in spec.groups if not spec.activations.get(g)]
    if missing:
        raise ValueError(f"Activation matching needs activation points for groups {missing}; set "
                         "spec.activations[group] = [module or node names] or use a spec from derive_spec(net).")
    sizes = spec.sizes(theta_a)
    points = sorted({p for g in spec.groups for p in spec.activations[g]})
    gm = capture_module(net, points, LeafTracer())
    device = torch.device(device) if device is not None else next(iter(theta_a.values())).device
    stats = {p: None for p in points}
    unit = {p: sizes[g] for g in spec.groups for p in spec.activations[g]}
    with eval_mode(gm), torch.no_grad():
        for x, _ in iter_batches(data, batch_size):
            x = x.to(device)
            for p, fa, fb in zip(points, run_with(gm, theta_a, x), run_with(gm, theta_b, x), strict=True):
                n = unit[p]
                if stats[p] is None:
                    stats[p] = CorrelationStats(n, device)
                fa, fb = (feature_slice(f, p) for f in (fa, fb))
                stats[p].update(as_samples(fa, n), as_samples(fb, n))
            if progress is not None:
                progress(1)
    if any(s is None for s in stats.values()):
        raise ValueError("data yielded no batches.")
    for s in stats.values():
        s.all_reduce()
    return {g: [stats[p] for p in spec.activations[g]] for g in spec.groups}


def activation_matching(net: nn.Module, spec: PermutationSpec, theta_a: Mapping[str, Tensor],
                        theta_b: Mapping[str, Tensor], data: Data, batch_size: int = 256,
                        device: str | torch.device | None = None,
                        progress: Callable[[int], Any] | None = None) -> Permutation:
    """Permutation of B's units maximising the summed activation correlation with A's units, one group at a time.

    Args:
        net: Any instance of the architecture (its own weights are not used).
        spec: Permutation spec with ``activations`` for every group.
        theta_a: Reference weights.
        theta_b: Weights to permute.
        data: Inputs (see :func:`~lmc_lightning.weights.permutation.batches.iter_batches`).
        batch_size: Batch size when ``data`` is given as tensors.
        device: Device to run on (default: that of A's weights).
        progress: Called with 1 after every batch (e.g. a progress bar's ``update``).

    Returns:
        Group name -> index tensor (CPU, int64).
    """
    stats = activation_stats(net, spec, theta_a, theta_b, data, batch_size, device, progress)
    corr = {g: sum(s.correlation() for s in group_stats) for g, group_stats in stats.items()}
    perm: Permutation = {}
    for unit in spec.units():
        if len(unit) == 1 and unit[0] not in spec.heads:
            perm[unit[0]] = solve_assignment(corr[unit[0]])
        else:
            perm.update(solve_tied({g: corr[g] for g in unit}, spec.heads))
    return perm
