"""PathResult: loss and accuracy at the evaluated points of a path or surface, with barriers and writers."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path as FilePath
from typing import Any

import numpy as np

from lmc_lightning.io import atomic_write_text
from lmc_lightning.metrics.functional import barrier
from lmc_lightning.plots import plot_result, save_figure


def _jsonable(value: Any) -> Any:
    """JSON form of numpy values and tensors that end up in ``meta``; ``str`` for anything else."""
    if hasattr(value, "tolist"):
        return _finite_or_none(value.tolist())
    return str(value)


def _finite_or_none(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (JSON ``null``), through lists and dicts."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_none(v) for v in value]
    return value


@dataclass
class PathResult:
    """Loss and accuracy at ``P`` points.

    A point whose loss (or accuracy) is not finite (NaN/Inf: the weights there diverged) has no barrier: the barrier
    properties are NaN, :meth:`barriers` gives None for each, the JSON holds ``null`` for that point's values, and
    :meth:`warn_nonfinite` names the points.

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
    def nonfinite(self) -> np.ndarray:
        """``[P]`` bool: points whose loss or accuracy is NaN or infinite."""
        return ~(np.isfinite(self.loss) & np.isfinite(self.accuracy))

    def _barrier(self, values: np.ndarray, **kwargs: Any) -> float:
        return math.nan if self.nonfinite.any() else float(barrier(values, self.coords, **kwargs))

    @property
    def loss_barrier(self) -> float:
        """``max_t loss(t) - line(t)`` (surface: minus the bilinear interpolation of the corners); NaN when a point
        is not finite."""
        return self._barrier(self.loss)

    @property
    def accuracy_barrier(self) -> float:
        """``max_t line(t) - accuracy(t)``: the largest drop below the endpoints' line (or corner surface); NaN when
        a point is not finite."""
        return self._barrier(self.accuracy, higher_is_better=True)

    @property
    def loss_barrier_mean(self) -> float:
        """Git Re-Basin convention: ``max_t loss(t) - mean(endpoint losses)``; NaN when a point is not finite."""
        return self._barrier(self.loss, reference="mean")

    @property
    def accuracy_barrier_mean(self) -> float:
        """Git Re-Basin convention: ``mean(endpoint accuracies) - min_t accuracy(t)``; NaN when a point is not
        finite."""
        return self._barrier(self.accuracy, higher_is_better=True, reference="mean")

    def barriers(self) -> dict[str, float | None]:
        """The four barrier numbers; ``None`` for each when the endpoints were not evaluated or a point is not
        finite."""
        names = ("loss_barrier", "accuracy_barrier", "loss_barrier_mean", "accuracy_barrier_mean")
        try:
            values = {n: getattr(self, n) for n in names}
        except ValueError:
            return dict.fromkeys(names)
        return {n: (v if math.isfinite(v) else None) for n, v in values.items()}

    def warn_nonfinite(self) -> bool:
        """Warn, naming the points, when some loss or accuracy is not finite; returns whether it warned."""
        bad = np.flatnonzero(self.nonfinite)
        if not len(bad):
            return False
        where = ", ".join(str(tuple(round(float(c), 4) for c in self.coords[i])) for i in bad[:8])
        warnings.warn(f"Non-finite loss at {len(bad)} of {len(self.loss)} point(s) (coordinates {where}"
                      f"{', ...' if len(bad) > 8 else ''}): the weights there diverge. Their values are reported as "
                      "null and no barrier is computed.", RuntimeWarning, stacklevel=2)
        return True

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: coordinates, per-point values, barriers and meta."""
        return _finite_or_none({
            "dim": self.dim,
            "coords": self.coords.tolist(),
            "loss": self.loss.tolist(),
            "accuracy": self.accuracy.tolist(),
            **self.barriers(),
            "meta": dict(self.meta),
        })

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PathResult:
        """Inverse of :meth:`to_dict` (barriers are recomputed, not read)."""
        missing = [k for k in ("coords", "loss", "accuracy") if k not in d]
        if missing:
            raise ValueError(f"Not a PathResult dict: missing {missing}.")
        return cls(np.asarray(d["coords"], dtype=float), np.asarray(d["loss"], dtype=float),
                   np.asarray(d["accuracy"], dtype=float), dict(d.get("meta", {})))

    def to_json(self, path: str | os.PathLike) -> FilePath:
        """Write :meth:`to_dict` as strict JSON (non-finite values as ``null``), atomically."""
        text = json.dumps(self.to_dict(), indent=2, default=_jsonable, allow_nan=False)
        return atomic_write_text(path, text + "\n")

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

    def figure(self, title: str | None = None) -> Any:
        """The matplotlib figure of :meth:`plot` (loss and accuracy along ``t``, or heat maps over ``(u, v)``)."""
        return plot_result(self, title=title)

    def plot(self, path: str | os.PathLike, title: str | None = None) -> FilePath:
        """Save loss and accuracy along ``t`` (curves) or heat maps over ``(u, v)`` (surfaces), atomically."""
        return save_figure(plot_result(self, title=title), path)
