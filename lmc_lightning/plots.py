"""Figures of loss and accuracy along a path (curves) or over a surface (heat maps), without pyplot state."""

from __future__ import annotations

import io
import os
from pathlib import Path as FilePath
from typing import Any, Protocol

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lmc_lightning.io import atomic_write


class PathResult(Protocol):
    """What a figure needs of a result (:class:`lmc_lightning.weights.result.PathResult` has it; this module does
    not import it, so the dependency runs one way: ``weights.result -> plots``)."""

    coords: np.ndarray
    loss: np.ndarray
    accuracy: np.ndarray

    @property
    def dim(self) -> int: ...

    @property
    def ts(self) -> np.ndarray: ...

    def barriers(self) -> dict[str, Any]: ...


def _subtitle(result: PathResult) -> str:
    b = result.barriers()
    bad = int((~(np.isfinite(result.loss) & np.isfinite(result.accuracy))).sum())
    if bad:
        return f"non-finite loss at {bad} point(s): no barrier"
    if b["loss_barrier"] is None:
        return ""
    return f"loss barrier {b['loss_barrier']:.4f}, accuracy barrier {100 * b['accuracy_barrier']:.2f} pts"


def _panels(result: PathResult) -> tuple[tuple[np.ndarray, np.ndarray], tuple[str, str]]:
    return (result.loss, 100 * result.accuracy), ("loss", "accuracy (%)")


def _set_label(name: str, result: PathResult) -> str:
    b = result.barriers()
    return name if b["loss_barrier"] is None else f"{name} (loss barrier {b['loss_barrier']:.3f})"


def plot_curve(result: PathResult, title: str | None = None) -> Figure:
    """Loss and accuracy against ``t``, two panels side by side; one line per set for a multi-set result."""
    fig = Figure(figsize=(9, 3.5), layout="constrained")
    FigureCanvasAgg(fig)
    t = result.ts
    order = np.argsort(t)
    parts = list(result.sets.items()) or [(None, result)]
    for ax, panel in zip(fig.subplots(1, 2), range(2), strict=True):
        for name, part in parts:
            values = _panels(part)[0][panel]
            ax.plot(t[order], values[order], marker="o", markersize=3,
                    label=None if name is None else _set_label(name, part))
        ax.set_xlabel("t")
        ax.set_ylabel(_panels(result)[1][panel])
        ax.grid(alpha=0.3)
    if result.sets:
        fig.axes[0].legend(fontsize="small")
    subtitle = "" if result.sets else _subtitle(result)
    fig.suptitle("\n".join(s for s in (title, subtitle) if s) or None)
    return fig


def _grid(result: PathResult, values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Values on the full ``(u, v)`` grid, or ``None`` when the points are not a full grid."""
    us, vs = np.unique(result.coords[:, 0]), np.unique(result.coords[:, 1])
    if len(us) * len(vs) != len(values):
        return None
    grid = np.full((len(vs), len(us)), np.nan)
    grid[np.searchsorted(vs, result.coords[:, 1]), np.searchsorted(us, result.coords[:, 0])] = values
    return (None if np.isnan(grid).any() else (us, vs, grid))


def plot_surface(result: PathResult, title: str | None = None) -> Figure:
    """Heat maps of loss and accuracy over ``(u, v)`` (scatter when the points are not a full grid); one row of
    maps per set for a multi-set result."""
    parts = list(result.sets.items()) or [(None, result)]
    fig = Figure(figsize=(10, 4 * len(parts)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = np.asarray(fig.subplots(len(parts), 2)).reshape(len(parts), 2)
    for row, (name, part) in zip(axes, parts, strict=True):
        _surface_row(fig, row, part, name)
    fig.suptitle("\n".join(s for s in (title, "" if result.sets else _subtitle(result)) if s) or None)
    return fig


def _surface_row(fig: Figure, axes: np.ndarray, result: PathResult, name: str | None) -> None:
    """Loss and accuracy maps of one (single-set) result into a row of two axes."""
    for ax, values, label in zip(axes, _panels(result)[0], _panels(result)[1], strict=True):
        grid = _grid(result, values)
        if grid is None:
            art = ax.scatter(result.coords[:, 0], result.coords[:, 1], c=values, cmap="viridis")
        else:
            us, vs, g = grid
            art = ax.pcolormesh(us, vs, g, shading="nearest", cmap="viridis")
        fig.colorbar(art, ax=ax, label=label)
        ax.set_xlabel("u")
        ax.set_ylabel("v")
        ax.set_title(label if name is None else f"{name}: {label}")


def plot_result(result: PathResult, title: str | None = None) -> Figure:
    """:func:`plot_curve` for curves, :func:`plot_surface` for surfaces."""
    return plot_curve(result, title) if result.dim == 1 else plot_surface(result, title)


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 120) -> FilePath:
    """Save a figure atomically; the format follows the suffix (png, pdf, svg, ...)."""
    path = FilePath(path)
    buf = io.BytesIO()
    fig.savefig(buf, format=path.suffix.lstrip(".") or "png", dpi=dpi)
    return atomic_write(path, lambda f: f.write(buf.getvalue()), mode="wb")


def plot_heatmap(matrix: np.ndarray, rows: list[str], cols: list[str], title: str | None = None,
                 label: str = "similarity") -> Figure:
    """Layer x layer heat map (rows: net A's points, columns: net B's), values written in the cells when few."""
    matrix = np.asarray(matrix, dtype=float)
    fig = Figure(figsize=(1.0 + 0.45 * len(cols), 0.8 + 0.4 * len(rows)), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    im = ax.imshow(matrix, cmap="viridis", vmin=min(0.0, float(np.nanmin(matrix))), vmax=1.0)
    ax.set_xticks(range(len(cols)), cols, rotation=90, fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    ax.set_xlabel("net B point")
    ax.set_ylabel("net A point")
    if matrix.size <= 64:
        for (i, j), v in np.ndenumerate(matrix):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w" if v < 0.6 else "k")
    fig.colorbar(im, ax=ax, label=label)
    if title:
        ax.set_title(title)
    return fig


def plot_bars(values: dict[str, list[float]], groups: list[str], ylabel: str, title: str | None = None) -> Figure:
    """Grouped bar plot: one group per entry of ``groups`` (e.g. stitch points), one bar per series of ``values``."""
    fig = Figure(figsize=(max(5.0, 0.9 * len(groups) * max(len(values), 1) / 2), 3.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / max(len(values), 1)
    x = np.arange(len(groups))
    for k, (name, ys) in enumerate(values.items()):
        ax.bar(x + (k - (len(values) - 1) / 2) * width, ys, width, label=name)
    ax.set_xticks(x, groups, rotation=45 if len(groups) > 6 else 0, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.axhline(0, color="k", lw=0.5)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return fig
