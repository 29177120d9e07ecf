"""PathResult: loss and accuracy at the evaluated points of a path or surface, with barriers and writers."""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path as FilePath
from typing import Any

import numpy as np

from lmc_lightning.io import atomic_write_text
from lmc_lightning.metrics.functional import barrier


def _jsonable(value: Any) -> Any:
    """JSON form of numpy values and tensors that end up in ``meta``; ``str`` for anything else."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


@dataclass
class PathResult:
    """Loss and accuracy at ``P`` points.

    Attributes:
        coords: ``[P, dim]`` coordinates (``t`` for curves, ``(u, v)`` for surfaces).
        loss: ``[P]`` mean cross-entropy per point.
        accuracy: ``[P]`` accuracy per point, in ``[0, 1]``.
        meta: Free-form settings of the run (bn mode, strategy, precision, sample counts, seconds, ...).
    """

    coords: np.ndarray
    loss: np.ndarray
    accuracy: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        c = np.asarray(self.coords, dtype=np.float64)
        self.coords = c.reshape(-1, 1) if c.ndim <= 1 else c
        self.loss = np.asarray(self.loss, dtype=np.float64).reshape(-1)
        self.accuracy = np.asarray(self.accuracy, dtype=np.float64).reshape(-1)
        p = self.coords.shape[0]
        if self.coords.ndim != 2 or self.coords.shape[1] not in (1, 2):
            raise ValueError(f"coords must be [P, 1] or [P, 2], got shape {self.coords.shape}.")
        if len(self.loss) != p or len(self.accuracy) != p:
            raise ValueError(f"Got {p} coordinates but {len(self.loss)} losses and {len(self.accuracy)} accuracies.")

    @property
    def dim(self) -> int:
        """1 for a curve, 2 for a surface."""
        return self.coords.shape[1]

    @property
    def ts(self) -> np.ndarray:
        """``[P]`` values of ``t`` (curves only)."""
        if self.dim != 1:
            raise ValueError("ts is defined for curves (dim 1); this result is a surface, use coords.")
        return self.coords[:, 0]

    @property
    def loss_barrier(self) -> float:
        """``max_t loss(t) - line(t)`` (surface: minus the bilinear interpolation of the corners)."""
        return float(barrier(self.loss, self.coords))

    @property
    def accuracy_barrier(self) -> float:
        """``max_t line(t) - accuracy(t)``: the largest drop below the endpoints' line (or corner surface)."""
        return float(barrier(self.accuracy, self.coords, higher_is_better=True))

    @property
    def loss_barrier_mean(self) -> float:
        """Git Re-Basin convention: ``max_t loss(t) - mean(endpoint losses)``."""
        return float(barrier(self.loss, self.coords, reference="mean"))

    @property
    def accuracy_barrier_mean(self) -> float:
        """Git Re-Basin convention: ``mean(endpoint accuracies) - min_t accuracy(t)``."""
        return float(barrier(self.accuracy, self.coords, higher_is_better=True, reference="mean"))

    def barriers(self) -> dict[str, float | None]:
        """The four barrier numbers; ``None`` for each when the endpoints were not evaluated."""
        names = ("loss_barrier", "accuracy_barrier", "loss_barrier_mean", "accuracy_barrier_mean")
        try:
            return {n: getattr(self, n) for n in names}
        except ValueError:
            return dict.fromkeys(names)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: coordinates, per-point values, barriers and meta."""
        return {
            "dim": self.dim,
            "coords": self.coords.tolist(),
            "loss": self.loss.tolist(),
            "accuracy": self.accuracy.tolist(),
            **self.barriers(),
            "meta": dict(self.meta),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PathResult:
        """Inverse of :meth:`to_dict` (barriers are recomputed, not read)."""
        missing = [k for k in ("coords", "loss", "accuracy") if k not in d]
        if missing:
            raise ValueError(f"Not a PathResult dict: missing {missing}.")
        return cls(np.asarray(d["coords"]), np.asarray(d["loss"]), np.asarray(d["accuracy"]), dict(d.get("meta", {})))

    def to_json(self, path: str | os.PathLike) -> FilePath:
        """Write :meth:`to_dict` as JSON, atomically."""
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=2, default=_jsonable) + "\n")

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> PathResult:
        """Read a result written by :meth:`to_json`."""
        return cls.from_dict(json.loads(FilePath(path).read_text()))

    def to_csv(self, path: str | os.PathLike) -> FilePath:
        """Write one row per point (``t`` or ``u, v``, then loss and accuracy), atomically."""
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow([*(["t"] if self.dim == 1 else ["u", "v"]), "loss", "accuracy"])
        for c, lo, acc in zip(self.coords, self.loss, self.accuracy, strict=True):
            writer.writerow([*(repr(float(x)) for x in c), repr(float(lo)), repr(float(acc))])
        return atomic_write_text(path, buf.getvalue())

    def plot(self, path: str | os.PathLike, title: str | None = None) -> FilePath:
        """Save loss and accuracy along ``t`` (curves) or heat maps over ``(u, v)`` (surfaces), atomically."""
        from lmc_lightning.plots import plot_result, save_figure

        return save_figure(plot_result(self, title=title), path)
