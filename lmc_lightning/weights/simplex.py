"""The simplex spanned by N endpoints, N-way averages, and barriers relative to the endpoints' plane.

A point of the simplex has barycentric coordinates ``lambda_0 ... lambda_{N-1}`` (non-negative, summing to 1); its
weights are ``sum_i lambda_i theta_i``. The path's coordinates are ``(lambda_1, ..., lambda_{N-1})`` (``lambda_0`` is
what is left), so for N = 2 the simplex is the line ``(1 - t) theta_0 + t theta_1``. The barrier of a value over
the simplex is its largest excess over the plane through the endpoints' values, ``max_lambda f(lambda) - sum_i
lambda_i f(theta_i)`` (for N = 2, the usual barrier over the line).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from lmc_lightning.weights import renorm
from lmc_lightning.weights.paths import Path, WeightDict


def barycentric(coords: Tensor | np.ndarray) -> Tensor:
    """``[P, N]`` barycentric weights of ``[P, N - 1]`` simplex coordinates (``lambda_0 = 1 - sum``)."""
    c = torch.as_tensor(coords, dtype=torch.float64)
    c = c.reshape(len(c), -1)
    return torch.cat([1 - c.sum(1, keepdim=True), c], dim=1)


def simplex_grid(num_endpoints: int, num_points: int) -> Tensor:
    """The lattice of the simplex with ``num_points`` points per edge: ``[P, N - 1]`` coordinates, corners included.

    Every point has barycentric weights in ``{0, 1/k, ..., 1}`` with ``k = num_points - 1``; for N = 2 this is
    ``linspace(0, 1, num_points)``; for N = 3 it has ``num_points * (num_points + 1) / 2`` points.
    """
    if num_endpoints < 2:
        raise ValueError(f"A simplex needs at least 2 endpoints, got {num_endpoints}.")
    if num_points < 2:
        raise ValueError(f"num_points must be >= 2 (the corners at least), got {num_points}.")
    k = num_points - 1
    rows = [c for c in itertools.product(range(k + 1), repeat=num_endpoints - 1) if sum(c) <= k]
    return torch.tensor(rows, dtype=torch.float64) / k


def corner_index(coords: np.ndarray | Tensor, atol: float = 1e-9) -> list[int]:
    """Index of each corner (endpoint ``0 ... N-1``) in ``coords``.

    Raises:
        ValueError: A corner is missing from the evaluated points.
    """
    lam = barycentric(coords).numpy()
    out = []
    for i in range(lam.shape[1]):
        hits = np.flatnonzero(np.abs(lam[:, i] - 1) < atol)
        if not len(hits):
            raise ValueError(f"The evaluated points do not include corner {i} (endpoint {i}); the barrier over the "
                             "simplex is relative to the endpoints' values, so evaluate the corners too.")
        out.append(int(hits[0]))
    return out


def plane(values: np.ndarray, coords: np.ndarray | Tensor) -> np.ndarray:
    """``sum_i lambda_i values[corner_i]`` at every point: the plane through the endpoints' values."""
    values = np.asarray(values, dtype=np.float64)
    ends = values[corner_index(coords)]
    return barycentric(coords).numpy() @ ends


def simplex_barrier(values: np.ndarray, coords: np.ndarray | Tensor, higher_is_better: bool = False,
                    reference: str = "plane") -> float:
    """Largest excess of ``values`` over the endpoints' plane (``reference="plane"``) or over their mean
    (``"mean"``, Git Re-Basin's convention), over the evaluated points of the simplex.

    Args:
        values: ``[P]`` values (loss, or accuracy with ``higher_is_better``).
        coords: ``[P, N - 1]`` simplex coordinates including the corners.
        higher_is_better: Measure drops below the reference instead of rises above it.
        reference: ``"plane"`` or ``"mean"``.
    """
    values = np.asarray(values, dtype=np.float64)
    if reference == "plane":
        ref = plane(values, coords)
    elif reference == "mean":
        ref = np.full_like(values, values[corner_index(coords)].mean())
    else:
        raise ValueError(f"reference must be 'plane' or 'mean', got {reference!r}.")
    excess = ref - values if higher_is_better else values - ref
    return float(excess.max())


class Simplex(Path):
    """The simplex spanned by N endpoints: ``theta(lambda) = sum_i lambda_i theta_i``.

    Coordinates are ``(lambda_1, ..., lambda_{N-1})`` (``lambda_0 = 1 - sum``), so ``path(*coords)`` takes N - 1
    numbers and ``Simplex([a, b])`` is the line from ``a`` to ``b``. Evaluated by
    :func:`~lmc_lightning.weights.evaluate.evaluate_path` on :meth:`grid` (``num_points`` per edge), with barriers
    relative to the endpoints' plane (:func:`simplex_barrier`).

    Args:
        thetas: Two or more endpoint weight dicts (full state dicts of one architecture).
    """

    kind = "simplex"

    def __init__(self, thetas: Sequence[Mapping[str, Tensor]]) -> None:
        if len(thetas) < 2:
            raise ValueError(f"A simplex needs at least 2 endpoints, got {len(thetas)}.")
        super().__init__(list(thetas))
        self.dim = len(thetas) - 1

    def coefficients(self, coords: Tensor) -> Tensor:
        return barycentric(coords).to(coords.device)

    def grid(self, num_points: int) -> Tensor:
        """The simplex lattice with ``num_points`` points per edge (see :func:`simplex_grid`)."""
        return simplex_grid(self.num_fixed, num_points)

    def at(self, weights: Sequence[float]) -> WeightDict:
        """Weights at barycentric ``weights`` (N numbers, non-negative, summing to 1)."""
        return self.from_coefficients(check_weights(weights, self.num_fixed))


def check_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    """Barycentric weights for ``n`` endpoints (uniform when None), checked: non-negative, summing to 1."""
    if weights is None:
        return [1.0 / n] * n
    w = [float(v) for v in weights]
    if len(w) != n:
        raise ValueError(f"Got {len(w)} merge weights for {n} endpoints; give one per endpoint.")
    if min(w) < 0 or abs(sum(w) - 1) > 1e-6:
        raise ValueError(f"Merge weights must be non-negative and sum to 1, got {w}.")
    return w


def average(thetas: Sequence[Mapping[str, Tensor]], weights: Sequence[float] | None = None) -> WeightDict:
    """The weighted average ``sum_i w_i theta_i`` of N weight dicts (uniform by default); non-floating tensors come
    from the first dict."""
    w = check_weights(weights, len(thetas))
    return Simplex(thetas).from_coefficients(w)


def renormalize_average(net: nn.Module, thetas: Sequence[Mapping[str, Tensor]], merged: Mapping[str, Tensor],
                        batches: Tensor | Sequence[Tensor], mode: str = "reset",
                        weights: Sequence[float] | None = None) -> WeightDict:
    """Correct the statistics of an N-way average ``merged`` of ``thetas`` on training ``batches``.

    ``"reset"`` recomputes the BatchNorm running statistics (:func:`~lmc_lightning.weights.renorm.reset_bn`). The
    re-normalisation modes (``"repair"``, ``"rescale"``, ``"reshift"``, ``"rescale_centered"``) correct every site
    (the ``post_norm`` rule) toward the weighted endpoint statistics ``sum_i w_i mu_i``, ``sum_i w_i sigma_i``
    (:func:`~lmc_lightning.weights.renorm.renormalize_mix`); BN statistics are recomputed on the way.

    Args:
        net: The architecture (not modified).
        thetas: The (aligned) endpoints.
        merged: Their average, e.g. :func:`average` with the same ``weights``.
        batches: Training inputs on the net's device.
        mode: ``"reset"`` or a mode of :data:`~lmc_lightning.weights.renorm.MODES`.
        weights: Merge weights (uniform when None).
    """
    if mode == "reset":
        return renorm.reset_bn(net, batches, merged, sync=False)
    if mode not in renorm.MODES:
        raise ValueError(f"mode must be 'reset' or one of {renorm.MODES}, got {mode!r}.")
    w = check_weights(weights, len(thetas))
    return renorm.renormalize_mix(net, thetas, merged, w, batches, mode, rule="post_norm", sync=False)
