"""Functional barrier: how far a loss (or accuracy) curve or surface rises above (drops below) its endpoints."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

_ATOL = 1e-9


def _as_tensor(x: Tensor | np.ndarray | Sequence[float]) -> Tensor:
    return torch.as_tensor(np.asarray(x.detach().cpu() if isinstance(x, Tensor) else x, dtype=np.float64))


def _find(coords: Tensor, corner: Sequence[float]) -> int:
    """Index of the point at ``corner``; a clear error when it was not evaluated."""
    hit = (coords - coords.new_tensor(corner)).abs().le(_ATOL).all(dim=1).nonzero()
    if len(hit) == 0:
        where = f"t={corner[0]:g}" if len(corner) == 1 else f"(u, v)=({corner[0]:g}, {corner[1]:g})"
        raise ValueError(f"A barrier needs the endpoint {where} among the evaluated coordinates; include it.")
    return int(hit[0])


def reference_values(values: Tensor, coords: Tensor) -> Tensor:
    """Values expected from the endpoints alone: the line between t=0 and t=1, or the bilinear corner surface.

    Args:
        values: ``[P]`` values.
        coords: ``[P, 1]`` curve coordinates ``t`` or ``[P, 2]`` surface coordinates ``(u, v)``.

    Returns:
        ``[P]`` reference values.
    """
    if coords.shape[1] == 1:
        t = coords[:, 0]
        v0, v1 = values[_find(coords, [0.0])], values[_find(coords, [1.0])]
        return (1 - t) * v0 + t * v1
    if coords.shape[1] == 2:
        u, v = coords[:, 0], coords[:, 1]
        c00, c10 = values[_find(coords, [0.0, 0.0])], values[_find(coords, [1.0, 0.0])]
        c01, c11 = values[_find(coords, [0.0, 1.0])], values[_find(coords, [1.0, 1.0])]
        return (1 - u) * (1 - v) * c00 + u * (1 - v) * c10 + (1 - u) * v * c01 + u * v * c11
    raise ValueError(f"coords must be [P, 1] (curve) or [P, 2] (surface), got shape {tuple(coords.shape)}.")


def _endpoint_mean(values: Tensor, coords: Tensor) -> Tensor:
    corners = [[0.0], [1.0]] if coords.shape[1] == 1 else [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]
    return torch.stack([values[_find(coords, c)] for c in corners]).mean()


def barrier(
    values: Tensor | np.ndarray | Sequence[float],
    coords: Tensor | np.ndarray | Sequence[float],
    *,
    higher_is_better: bool = False,
    reference: str = "line",
) -> Tensor:
    """Barrier height of a curve (``coords`` = ``t``) or a surface (``coords`` = ``(u, v)``).

    With ``reference="line"``: ``max_t value(t) - line(t)``, the line through the endpoints' values (for a surface the
    bilinear interpolation of the four corners). With ``reference="mean"`` (Git Re-Basin convention):
    ``max_t value(t) - mean(endpoint values)``. For ``higher_is_better`` values (accuracy) the barrier is the drop
    below the reference instead: ``max_t line(t) - value(t)``, or ``mean(endpoints) - min_t value(t)``.

    Args:
        values: ``[P]`` values at the points.
        coords: ``[P]`` or ``[P, 1]`` values of ``t``, or ``[P, 2]`` values of ``(u, v)``; must include the endpoints
            (``t = 0`` and ``1``, or the four corners).
        higher_is_better: ``True`` for accuracy-like values.
        reference: ``"line"`` or ``"mean"``.

    Returns:
        0-dim float64 tensor.
    """
    v = _as_tensor(values).reshape(-1)
    c = _as_tensor(coords)
    c = c.reshape(-1, 1) if c.dim() <= 1 else c
    if c.shape[0] != v.shape[0]:
        raise ValueError(f"Got {v.shape[0]} values for {c.shape[0]} coordinates.")
    if higher_is_better:
        v = -v
    if reference == "line":
        return (v - reference_values(v, c)).max()
    if reference == "mean":
        return v.max() - _endpoint_mean(v, c)
    raise ValueError(f"reference must be 'line' or 'mean', got {reference!r}.")


# Representation similarity (the modelsym seed); defined in similarity_functional, exported here as twins of the
# Metrics in lmc_lightning.metrics.similarity.
from lmc_lightning.metrics.similarity_functional import (  # noqa: E402
    grelu_cka,
    grelu_procrustes,
    linear_cka,
    orthogonal_procrustes,
)

__all__ = ["barrier", "grelu_cka", "grelu_procrustes", "linear_cka", "orthogonal_procrustes", "reference_values"]
