"""Paths in weight space: maps from coordinates (t, or (u, v)) to a weight dict.

:class:`Path` and its subclasses are linear combinations of control points, ``theta(c) = sum_i w_i(c) * P_i``, with
coefficients ``w(c)`` given by the path type (line, arc, Bernstein basis, ...). Some control points are fixed (the
endpoints or corner modes, frozen buffers) and some are free (``nn.Parameter``s a curve module may train).
Non-floating tensors such as ``num_batches_tracked`` are carried over from the first endpoint, not interpolated.
:class:`NonlinearPath` (:class:`FunctionPath`, :class:`PointsPath`) covers curves that are not: weight-adjusted and
step-wise connections (:mod:`lmc_lightning.weights.connect`) on ``[0, end_time]``.
"""

from __future__ import annotations

import bisect
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

WeightDict = dict[str, Tensor]


def check_finite(theta: Mapping[str, Tensor], source: str = "weights") -> None:
    """Raise a ValueError naming ``source`` and the first tensor holding NaN or Inf (floating tensors only).

    A diverged endpoint would otherwise give NaN losses that read as a barrier of zero.
    """
    for key, value in theta.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            kind = "NaN" if bool(torch.isnan(value).any()) else "Inf"
            raise ValueError(f"{source} has non-finite weights ({kind}) in '{key}': the run that wrote it diverged. "
                             "Use a checkpoint from before the divergence, or retrain with a lower learning rate.")


def check_compatible(*thetas: Mapping[str, Tensor], names: Sequence[str] | None = None, devices: bool = False) -> None:
    """Check that weight dicts share keys, shapes and dtypes (and devices, if asked).

    Args:
        *thetas: Weight dicts (state dicts) to compare with the first one.
        names: Names used in error messages, one per dict (default ``theta_0, theta_1, ...``).
        devices: Also require every tensor to sit on the device of the first dict's tensor of the same key.

    Raises:
        ValueError: Naming the first offending key and both shapes or dtypes.
    """
    names = list(names) if names is not None else [f"theta_{i}" for i in range(len(thetas))]
    ref, ref_name = thetas[0], names[0]
    for other, name in zip(thetas[1:], names[1:], strict=True):
        missing = [k for k in ref if k not in other]
        extra = [k for k in other if k not in ref]
        if missing or extra:
            key = (missing or extra)[0]
            where = name if missing else ref_name
            raise ValueError(
                f"Weight dicts do not match: key '{key}' is missing from {where}. "
                "The endpoints must come from the same architecture (same net name and arguments)."
            )
        for key, a in ref.items():
            b = other[key]
            if a.shape != b.shape:
                raise ValueError(
                    f"Weight dicts do not match at '{key}': {ref_name} has shape {tuple(a.shape)}, "
                    f"{name} has shape {tuple(b.shape)}. The endpoints must share architecture and width."
                )
            if a.dtype != b.dtype:
                raise ValueError(
                    f"Weight dicts do not match at '{key}': {ref_name} has dtype {a.dtype}, {name} has {b.dtype}. "
                    "Cast both to the same dtype first."
                )
            if devices and a.device != b.device:
                raise ValueError(
                    f"Weight dicts are on different devices at '{key}': {ref_name} on {a.device}, {name} on "
                    f"{b.device}. Move all of them to one device first (e.g. net.to(device) before state_dict())."
                )


def combine(coef: Tensor | Sequence[float], points: Tensor) -> Tensor:
    """``coef @ points`` over the control-point axis, as a chain of multiply-adds.

    ``coef`` is ``[P, K]`` (or ``[K]``), ``points`` is ``[K, *shape]``; returns ``[P, *shape]`` (or ``[*shape]``).
    With K a handful of control points a GEMM falls back to a slow CUDA kernel (``gemmk1``): on an H100 it took 10 ms
    of a 27 ms curve-training step of VGG-11-BN x4; K element-wise multiply-adds are memory-bound and cheap.

    ``coef`` may also be a sequence of K Python floats (one point): the coefficients then travel as kernel arguments,
    with no host-to-device copy (a copy from pageable host memory can make the host wait for the GPU every step).
    """
    if not isinstance(coef, Tensor):
        coef = [float(c) for c in coef]
        out = points[0] * coef[0]
        for k in range(1, len(coef)):
            out = torch.add(out, points[k], alpha=coef[k])
        return out
    coef = coef.to(points.dtype)
    single = coef.dim() == 1
    c = coef.reshape(1 if single else coef.shape[0], coef.shape[-1], *[1] * (points.dim() - 1))
    out = c[:, 0] * points[0]
    for k in range(1, points.shape[0]):
        out = out + c[:, k] * points[k]
    return out[0] if single else out


def _slot(key: str) -> str:
    """Turn a state-dict key into a valid module attribute name."""
    return key.replace(".", "__")


class Path(nn.Module, ABC):
    """A path or surface in weight space spanned by control points.

    Subclasses define :meth:`coefficients`. Control points are stored per key as a frozen buffer ``fixed`` of shape
    ``[n_fixed, *shape]`` and a trainable parameter ``free`` of shape ``[n_free, *shape]``; ``order`` says where
    each control point sits in the coefficient vector.

    Args:
        fixed: Fixed control points (endpoints / corners), all with the same keys, shapes and dtypes.
        free: Initial values of the free control points (may be empty).
        fixed_index: Position of each fixed point in the control-point sequence.
        free_index: Position of each free point in the control-point sequence.
    """

    dim: int = 1

    def __init__(
        self,
        fixed: Sequence[Mapping[str, Tensor]],
        free: Sequence[Mapping[str, Tensor]] = (),
        fixed_index: Sequence[int] | None = None,
        free_index: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if not fixed:
            raise ValueError("A path needs at least one fixed control point (an endpoint).")
        check_compatible(*fixed, *free, names=[f"endpoint {i}" for i in range(len(fixed))]
                         + [f"control point {i}" for i in range(len(free))], devices=True)
        self.num_fixed, self.num_free = len(fixed), len(free)
        self.fixed_index = list(fixed_index if fixed_index is not None else range(len(fixed)))
        self.free_index = list(free_index if free_index is not None else range(len(fixed), len(fixed) + len(free)))
        order = sorted(self.fixed_index + self.free_index)
        if order != list(range(len(fixed) + len(free))):
            raise ValueError(f"fixed_index and free_index must partition 0..{len(order) - 1}, got {order}.")
        self.keys_: list[str] = list(fixed[0].keys())
        self.float_keys: list[str] = [k for k in self.keys_ if torch.is_floating_point(fixed[0][k])]
        self.fixed_store = nn.Module()
        self.free_store = nn.Module()
        self.other_store = nn.Module()
        for key in self.keys_:
            first = fixed[0][key].detach()
            if key not in self.float_keys:
                self.other_store.register_buffer(_slot(key), first.clone())
                continue
            self.fixed_store.register_buffer(_slot(key), torch.stack([t[key].detach() for t in fixed]).clone())
            if free:
                value = torch.stack([t[key].detach() for t in free]).clone()
            else:
                value = first.new_empty((0, *first.shape))
            self.free_store.register_parameter(_slot(key), nn.Parameter(value, requires_grad=bool(free)))

    @property
    def num_points(self) -> int:
        """Number of control points."""
        return self.num_fixed + self.num_free

    @abstractmethod
    def coefficients(self, coords: Tensor) -> Tensor:
        """Coefficients of the control points.

        Args:
            coords: ``[P, dim]`` coordinates of ``P`` points.

        Returns:
            ``[P, num_points]`` weights, column ``i`` multiplying control point ``i``.
        """

    def control_points(self, key: str) -> Tensor:
        """All control points of one floating key, ``[num_points, *shape]``, in sequence order."""
        fixed = getattr(self.fixed_store, _slot(key))
        free = getattr(self.free_store, _slot(key))
        out = [None] * self.num_points
        for i, j in enumerate(self.fixed_index):
            out[j] = fixed[i]
        for i, j in enumerate(self.free_index):
            out[j] = free[i]
        return torch.stack(out)

    def _coords(self, coords) -> Tensor:
        ref = getattr(self.fixed_store, _slot(self.float_keys[0]))
        c = torch.as_tensor(coords, dtype=torch.float64).reshape(-1, self.dim)
        return c.to(device=ref.device)

    def stacked(self, coords) -> WeightDict:
        """Weights at many points at once.

        Args:
            coords: ``P`` coordinates: a sequence of floats (curves), or ``[P, dim]``.

        Returns:
            Dict of ``[P, *shape]`` tensors (non-floating tensors repeated ``P`` times).
        """
        return self.from_coefficients(self.coefficients(self._coords(coords)))

    def forward(self, *coords: float | Tensor) -> WeightDict:
        """Weights at one point: ``path(t)`` for curves, ``path(u, v)`` for surfaces."""
        if len(coords) != self.dim:
            raise ValueError(f"{type(self).__name__} takes {self.dim} coordinate(s), got {len(coords)}.")
        return self.from_coefficients(self.point_coefficients(coords))

    def from_coefficients(self, coef: Tensor | Sequence[float], control: Mapping[str, Tensor] | None = None
                          ) -> WeightDict:
        """Weights from control-point coefficients (rows of :meth:`coefficients`), combined by :func:`combine`.

        Args:
            coef: One point's ``[K]`` coefficients (or K Python floats), or ``[P, K]`` for ``P`` points, whose
                non-floating tensors are then repeated ``P`` times.
            control: ``{key: self.control_points(key)}`` for every floating key, to reuse across calls (default:
                stacked now).
        """
        many = isinstance(coef, Tensor) and coef.dim() == 2
        if control is None:
            control = {k: self.control_points(k) for k in self.float_keys}
        out: WeightDict = {}
        for key in self.keys_:
            points = control.get(key)
            if points is not None:
                out[key] = combine(coef, points)
            else:
                buf = getattr(self.other_store, _slot(key))
                out[key] = buf.unsqueeze(0).expand(coef.shape[0], *buf.shape) if many else buf
        return out

    def point_coefficients(self, coords: Sequence[float | Tensor]) -> list[float]:
        """The coefficients of one point as Python floats, computed on the CPU (see :func:`combine`)."""
        c = torch.tensor([[float(x) for x in coords]], dtype=torch.float64)
        return self.coefficients(c)[0].tolist()

    def endpoint(self, i: int) -> WeightDict:
        """The ``i``-th fixed control point as a weight dict."""
        out = {k: getattr(self.fixed_store, _slot(k))[i] for k in self.float_keys}
        out.update({k: getattr(self.other_store, _slot(k)) for k in self.keys_ if k not in self.float_keys})
        return {k: out[k] for k in self.keys_}


def bias_degrees(keys: Sequence[str]) -> dict[str, int]:
    """``{bias key: h}`` with ``h`` the number of ``*weight*`` keys up to it in state-dict order (the
    rethink-re-basin seed's ``interpolate_state_dicts(bias_norm=True)``)."""
    height, out = 0, {}
    for key in keys:
        if "batches" in key:
            continue
        if "weight" in key:
            height += 1
        if "bias" in key:
            out[key] = height
    return out


class Linear(Path):
    """The straight line ``(1 - t) * theta_a + t * theta_b``.

    With ``homogeneous``, biases follow ``(1 - t)^h * b_a + t^h * b_b`` instead, ``h`` being the number of weight
    tensors up to that bias (:func:`bias_degrees`): the homogeneous interpolation of Qu & Horvath's seed, under which
    a bias-carrying ReLU net scales like a bias-free one. Every other tensor (weights, BN running statistics) stays
    linear; the seed zeroes running statistics here instead (they are re-estimated by a BN reset anyway).

    Args:
        theta_a: Weights at ``t = 0``.
        theta_b: Weights at ``t = 1``.
        homogeneous: Homogeneous bias interpolation.
    """

    def __init__(self, theta_a: Mapping[str, Tensor], theta_b: Mapping[str, Tensor], homogeneous: bool = False
                 ) -> None:
        super().__init__([theta_a, theta_b])
        self.homogeneous = bool(homogeneous)
        self.degrees = {k: h for k, h in bias_degrees(self.keys_).items() if k in self.float_keys and h != 1}

    def coefficients(self, coords: Tensor) -> Tensor:
        t = coords[:, 0]
        return torch.stack([1 - t, t], dim=1)

    def from_coefficients(self, coef: Tensor | Sequence[float], control: Mapping[str, Tensor] | None = None
                          ) -> WeightDict:
        """As :meth:`Path.from_coefficients`; with ``homogeneous``, bias coefficients raised to their degree."""
        out = super().from_coefficients(coef, control)
        if not self.homogeneous:
            return out
        for key, h in self.degrees.items():
            powered = coef.pow(h) if isinstance(coef, Tensor) else [float(c) ** h for c in coef]
            out[key] = combine(powered, control[key] if control is not None else self.control_points(key))
        return out


def neuron_center(theta_a: Mapping[str, Tensor], theta_b: Mapping[str, Tensor]) -> WeightDict:
    """Per-tensor neuron mean of two weight dicts, the centre of Anokhin & Yarotsky's ``arc_connect``.

    A tensor of two or more dims is a set of neuron samples, one row per output unit (dim 0): the centre is the mean
    row over all ``2n`` rows of both tensors, broadcast back to the tensor's shape. 1-D (and 0-D) tensors, such as
    biases, are one sample each: the centre is ``(a + b) / 2``. Non-floating tensors are taken from ``theta_a``.
    """
    out: WeightDict = {}
    for key, a in theta_a.items():
        b = theta_b[key]
        if not torch.is_floating_point(a):
            out[key] = a
        elif a.dim() >= 2:
            out[key] = torch.cat([a, b]).mean(0, keepdim=True).expand_as(a).clone()
        else:
            out[key] = (a + b) / 2
    return out


class Arc(Path):
    """The arc of Anokhin & Yarotsky: ``mu + cos(pi t / 2) (theta_a - mu) + sin(pi t / 2) (theta_b - mu)``.

    With ``centered=False`` (the default, this library's original form) ``mu = 0``: the arc on the raw weights,
    meaningful when both endpoints are samples of the same zero-mean distribution. With ``centered=True`` it is the
    seed's ``arc_connect`` applied to every tensor on its own (Anokhin & Yarotsky's ``PointFinderSimultaneous``
    with ``arc_connect``): ``mu`` is :func:`neuron_center` (the mean row of each weight tensor over both endpoints'
    output units; ``(a + b) / 2`` for biases). An explicit ``center`` dict gives any other centre (the neuron-sample
    views of :mod:`lmc_lightning.weights.connect` use it). Both forms are linear combinations of fixed control points
    (``theta_a``, ``theta_b``, ``mu`` with coefficients ``cos``, ``sin``, ``1 - cos - sin``), so the evaluator's fast
    path applies.

    Args:
        theta_a: Weights at ``t = 0``.
        theta_b: Weights at ``t = 1``.
        centered: Centre every tensor on its neuron mean (:func:`neuron_center`).
        center: An explicit centre ``mu`` (same keys and shapes); overrides ``centered``.
    """

    def __init__(self, theta_a: Mapping[str, Tensor], theta_b: Mapping[str, Tensor], centered: bool = False,
                 center: Mapping[str, Tensor] | None = None) -> None:
        if center is None and centered:
            check_compatible(theta_a, theta_b, names=["theta_a", "theta_b"])
            center = neuron_center(theta_a, theta_b)
        self.centered = center is not None
        super().__init__([theta_a, theta_b] + ([dict(center)] if center is not None else []))

    def coefficients(self, coords: Tensor) -> Tensor:
        t = coords[:, 0].to(torch.float64) * (math.pi / 2)
        cos, sin = torch.cos(t), torch.sin(t)
        # exact endpoints: cos(pi/2) is 6e-17 in floating point, not 0
        cos = torch.where(coords[:, 0] == 1, torch.zeros_like(cos), cos)
        sin = torch.where(coords[:, 0] == 0, torch.zeros_like(sin), sin)
        cols = [cos, sin] + ([1 - cos - sin] if self.centered else [])
        return torch.stack(cols, dim=1)

    def center(self) -> WeightDict | None:
        """The centre ``mu`` (None for the uncentred arc)."""
        if not self.centered:
            return None
        out = {k: getattr(self.fixed_store, _slot(k))[2] for k in self.float_keys}
        out.update({k: getattr(self.other_store, _slot(k)) for k in self.keys_ if k not in self.float_keys})
        return {k: out[k] for k in self.keys_}


class NonlinearPath(ABC):
    """A curve whose weights at ``t`` are not a fixed linear combination of control points.

    Anokhin & Yarotsky's weight-adjusted and step-wise paths are nonlinear in ``t`` (least-squares re-fits, piecewise
    definitions on ``[0, end_time]``). :func:`~lmc_lightning.weights.evaluate.evaluate_path` evaluates them point by
    point through :meth:`weights_at`, with the same BN reset / REPAIR machinery as linear paths. Subclasses implement
    :meth:`weights_at`; :class:`FunctionPath` wraps a callable and :class:`PointsPath` holds precomputed points.

    Attributes:
        end_time: The path runs over ``t`` in ``[0, end_time]``; ``weights_at(end_time)`` is the second endpoint.
    """

    dim: int = 1
    end_time: float = 1.0

    @abstractmethod
    def weights_at(self, t: float) -> WeightDict:
        """Weights at ``t`` in ``[0, end_time]`` (full state dict of the net)."""

    def __call__(self, t: float | Tensor) -> WeightDict:
        return self.weights_at(float(t))

    def check_t(self, t: float) -> float:
        """``t`` as a float, or a ValueError when it lies outside ``[0, end_time]``."""
        t = float(t)
        if not -1e-9 <= t <= self.end_time + 1e-9:
            raise ValueError(f"t={t:g} lies outside this path's range [0, {self.end_time:g}].")
        return min(max(t, 0.0), float(self.end_time))

    def endpoint(self, i: int) -> WeightDict:
        """Weights at ``t = 0`` (``i = 0``) or ``t = end_time`` (``i = 1``)."""
        if i not in (0, 1):
            raise ValueError(f"A curve has endpoints 0 and 1, got {i}.")
        return self.weights_at(0.0 if i == 0 else float(self.end_time))

    @property
    def keys_(self) -> list[str]:
        """Keys of the weight dicts."""
        return list(self.endpoint(0))

    def stacked(self, coords: Sequence[float] | Tensor) -> WeightDict:
        """Weights at many points, stacked along a leading dim."""
        ts = torch.as_tensor(coords, dtype=torch.float64).reshape(-1).tolist()
        points = [self.weights_at(t) for t in ts]
        return {k: torch.stack([p[k] for p in points]) for k in points[0]}

    def precompute(self, coords: Sequence[float] | Tensor) -> PointsPath:
        """A :class:`PointsPath` holding this path's weights at ``coords`` (computed once)."""
        ts = torch.as_tensor(coords, dtype=torch.float64).reshape(-1).tolist()
        return PointsPath(ts, [self.weights_at(t) for t in ts], end_time=self.end_time)


class FunctionPath(NonlinearPath):
    """A nonlinear path given by a function ``t -> weight dict`` on ``[0, end_time]``.

    Args:
        fn: Returns the full weight dict at ``t``.
        end_time: Right end of the parameter range.
    """

    def __init__(self, fn: Callable[[float], Mapping[str, Tensor]], end_time: float = 1.0) -> None:
        if end_time <= 0:
            raise ValueError(f"end_time must be positive, got {end_time}.")
        self.fn, self.end_time = fn, float(end_time)

    def weights_at(self, t: float) -> WeightDict:
        return dict(self.fn(self.check_t(t)))


class PointsPath(NonlinearPath):
    """Precomputed weights at increasing ``ts``; exact there, linear between neighbouring points.

    Args:
        ts: Increasing parameter values; the first must be 0.
        points: One weight dict per value of ``ts``.
        end_time: Right end of the range (default: the last of ``ts``).
    """

    def __init__(self, ts: Sequence[float], points: Sequence[Mapping[str, Tensor]], end_time: float | None = None
                 ) -> None:
        ts = [float(t) for t in ts]
        if len(ts) != len(points) or len(ts) < 2:
            raise ValueError(f"PointsPath needs at least 2 points and one t per point; got {len(ts)} values of t "
                             f"and {len(points)} weight dicts.")
        if ts[0] != 0 or any(b <= a for a, b in zip(ts[:-1], ts[1:], strict=True)):
            raise ValueError("PointsPath ts must start at 0 and increase strictly.")
        check_compatible(*points, names=[f"point {i}" for i in range(len(points))])
        self.ts, self.points = ts, [dict(p) for p in points]
        self.end_time = float(end_time if end_time is not None else ts[-1])
        if abs(self.end_time - ts[-1]) > 1e-9:
            raise ValueError(f"The last of ts ({ts[-1]:g}) must be end_time ({self.end_time:g}).")

    def weights_at(self, t: float) -> WeightDict:
        t = self.check_t(t)
        j = bisect.bisect_left(self.ts, t - 1e-12)
        if j < len(self.ts) and abs(self.ts[j] - t) <= 1e-12:
            return dict(self.points[j])
        a, b = self.points[j - 1], self.points[j]
        s = (t - self.ts[j - 1]) / (self.ts[j] - self.ts[j - 1])
        return {k: torch.lerp(a[k], b[k], s) if torch.is_floating_point(a[k]) else a[k] for k in a}


AnyPath = Path | NonlinearPath
