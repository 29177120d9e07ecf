"""PathResult: loss and accuracy at the evaluated points of a path or surface, with barriers and writers.

A result may hold several named evaluation sets evaluated at the same points (e.g. MMC's counterfactual sets
``clean``, ``cue``, ``rand_cue``, ``rand_image``): :meth:`PathResult.from_sets` builds one, ``result.sets[name]`` is
the single-set result of one set (with its own barriers), and ``loss``/``accuracy`` are the first set's.
"""

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
from lmc_lightning.weights.simplex import simplex_barrier


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
        sets: Per evaluation set, its single-set result at the same points (empty for a single-set result). When
            given, ``loss`` and ``accuracy`` are the first set's; build such results with :meth:`from_sets`.
    """

    coords: np.ndarray
    loss: np.ndarray
    accuracy: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)
    sets: dict[str, PathResult] = field(default_factory=dict)
    length: np.ndarray | None = None
    end_time: float = 1.0

    def __post_init__(self) -> None:
        c = np.asarray(self.coords, dtype=np.float64)
        self.coords = c.reshape(-1, 1) if c.ndim <= 1 else c
        self.loss = np.asarray(self.loss, dtype=np.float64).reshape(-1)
        self.accuracy = np.asarray(self.accuracy, dtype=np.float64).reshape(-1)
        p = self.coords.shape[0]
        if self.coords.ndim != 2 or (self.coords.shape[1] not in (1, 2) and not self.simplex):
            raise ValueError(f"coords must be [P, 1] or [P, 2] (or [P, N - 1] with meta kind 'simplex'), got shape "
                             f"{self.coords.shape}.")
        if len(self.loss) != p or len(self.accuracy) != p:
            raise ValueError(f"Got {p} coordinates but {len(self.loss)} losses and {len(self.accuracy)} accuracies.")
        if self.length is not None:
            self.length = np.asarray(self.length, dtype=np.float64).reshape(-1)
            if len(self.length) != p:
                raise ValueError(f"Got {p} coordinates but {len(self.length)} path lengths.")
        self.end_time = float(self.end_time)
        if self.end_time <= 0:
            raise ValueError(f"end_time must be positive, got {self.end_time}.")
        self.sets = dict(self.sets)
        for name, part in self.sets.items():
            if not isinstance(part, PathResult) or part.sets or not np.array_equal(part.coords, self.coords):
                raise ValueError(f"sets[{name!r}] must be a single-set PathResult at the same coordinates.")

    @classmethod
    def from_sets(cls, coords: np.ndarray, values: dict[str, tuple[np.ndarray, np.ndarray]],
                  meta: dict[str, Any] | None = None, length: np.ndarray | None = None, end_time: float = 1.0
                  ) -> PathResult:
        """A multi-set result from ``{set name: (loss [P], accuracy [P])}``; ``loss``/``accuracy`` are the first set's.

        Raises:
            ValueError: No sets.
        """
        if not values:
            raise ValueError("from_sets needs at least one named evaluation set.")
        meta = dict(meta or {})
        sets = {str(name): cls(coords, lo, acc, dict(meta), length=length, end_time=end_time)
                for name, (lo, acc) in values.items()}
        first = next(iter(sets.values()))
        return cls(first.coords, first.loss, first.accuracy, meta, sets, length, end_time)

    @property
    def set_names(self) -> list[str]:
        """Names of the evaluation sets (empty for a single-set result)."""
        return list(self.sets)

    @property
    def dim(self) -> int:
        """1 for a curve, 2 for a surface, N - 1 for the simplex of N endpoints."""
        return self.coords.shape[1]

    @property
    def simplex(self) -> bool:
        """Whether the points lie on a simplex of endpoints (``meta["kind"] == "simplex"``): barycentric
        coordinates, barriers relative to the endpoints' plane."""
        return self.meta.get("kind") == "simplex"

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
        """Barrier of ``values``; a curve on ``[0, end_time]`` is measured against its endpoints at 0 and
        ``end_time``."""
        if self.nonfinite.any():
            return math.nan
        if self.simplex:
            return simplex_barrier(values, self.coords, kwargs.get("higher_is_better", False),
                                   "mean" if kwargs.get("reference") == "mean" else "plane")
        coords = self.coords / self.end_time if self.dim == 1 else self.coords
        return float(barrier(values, coords, **kwargs))

    def _stats(self, values: np.ndarray) -> dict[str, float | None]:
        dl = np.diff(self.length) if self.length is not None else None
        integral = None
        if dl is not None and dl.sum() > 0:
            integral = float((0.5 * (values[1:] + values[:-1]) * dl).sum() / dl.sum())
        return {"start": float(values[0]), "end": float(values[-1]), "min": float(values.min()),
                "max": float(values.max()), "mean": float(values.mean()), "int": integral}

    def summary(self) -> dict[str, Any]:
        """Per metric (and per evaluation set of a multi-set result), as in Anokhin & Yarotsky's ``eval_curve.py``:
        ``start``, ``end``, ``min``, ``max``, ``mean`` over the points and ``int``, the length-weighted integral
        ``sum_i (v_i + v_{i-1}) / 2 * dl_i / sum_i dl_i`` (``dl_i`` the weight-space distance between consecutive
        points; None without path lengths), plus ``length``, the path's total length.

        Returns:
            ``{"loss": {...}, "accuracy": {...}, "length": L}``, or ``{set name: that dict}`` with several sets.
        """
        if getattr(self, "sets", None):
            return {name: part.summary() for name, part in self.sets.items()}
        total = float(self.length[-1] - self.length[0]) if self.length is not None else None
        return {"loss": self._stats(self.loss), "accuracy": self._stats(self.accuracy), "length": total}

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

    def set_barriers(self) -> dict[str, dict[str, float | None]]:
        """:meth:`barriers` of every evaluation set (empty for a single-set result)."""
        return {name: part.barriers() for name, part in self.sets.items()}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: coordinates, per-point values, barriers and meta (and per set, its values and barriers)."""
        out = {
            "dim": self.dim,
            "coords": self.coords.tolist(),
            "loss": self.loss.tolist(),
            "accuracy": self.accuracy.tolist(),
            **self.barriers(),
            "meta": dict(self.meta),
            "end_time": self.end_time,
            "length": self.length.tolist() if self.length is not None else None,
        }
        if self.dim == 1:
            out["summary"] = self.summary()
        if self.sets:
            out["sets"] = {name: {"loss": part.loss.tolist(), "accuracy": part.accuracy.tolist(), **part.barriers()}
                           for name, part in self.sets.items()}
        return _finite_or_none(out)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PathResult:
        """Inverse of :meth:`to_dict` (barriers are recomputed, not read)."""
        missing = [k for k in ("coords", "loss", "accuracy") if k not in d]
        if missing:
            raise ValueError(f"Not a PathResult dict: missing {missing}.")
        if d.get("sets"):
            values = {name: (np.asarray(v["loss"], dtype=float), np.asarray(v["accuracy"], dtype=float))
                      for name, v in d["sets"].items()}
            return cls.from_sets(np.asarray(d["coords"], dtype=float), values, dict(d.get("meta", {})),
                                 length=d.get("length"), end_time=d.get("end_time", 1.0))
        return cls(np.asarray(d["coords"], dtype=float), np.asarray(d["loss"], dtype=float),
                   np.asarray(d["accuracy"], dtype=float), dict(d.get("meta", {})), length=d.get("length"),
                   end_time=d.get("end_time", 1.0))

    def to_json(self, path: str | os.PathLike) -> FilePath:
        """Write :meth:`to_dict` as strict JSON (non-finite values as ``null``), atomically."""
        text = json.dumps(self.to_dict(), indent=2, default=_jsonable, allow_nan=False)
        return atomic_write_text(path, text + "\n")

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> PathResult:
        """Read a result written by :meth:`to_json`."""
        return cls.from_dict(json.loads(FilePath(path).read_text()))

    def to_csv(self, path: str | os.PathLike) -> FilePath:
        """Write one row per point (``t`` or ``u, v``, then loss and accuracy), atomically; a multi-set result has
        one row per point and set, with a ``set`` column after the coordinates."""
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        coord_names = ([f"lambda_{i + 1}" for i in range(self.dim)] if self.simplex else ["t"] if self.dim == 1
                       else ["u", "v"])
        parts = self.sets.items() if self.sets else [(None, self)]
        writer.writerow([*coord_names, *(["set"] if self.sets else []), "loss", "accuracy"])
        for name, part in parts:
            for c, lo, acc in zip(part.coords, part.loss, part.accuracy, strict=True):
                writer.writerow([*(repr(float(x)) for x in c), *([name] if name is not None else []),
                                 repr(float(lo)), repr(float(acc))])
        return atomic_write_text(path, buf.getvalue())

    def figure(self, title: str | None = None) -> Any:
        """The matplotlib figure of :meth:`plot` (loss and accuracy along ``t``, or heat maps over ``(u, v)``)."""
        return plot_result(self, title=title)

    def plot(self, path: str | os.PathLike, title: str | None = None) -> FilePath:
        """Save loss and accuracy along ``t`` (curves) or heat maps over ``(u, v)`` (surfaces), atomically."""
        return save_figure(plot_result(self, title=title), path)
