"""Paths in weight space: maps from coordinates (t, or (u, v)) to a weight dict.

Every path here is a linear combination of control points, ``theta(c) = sum_i w_i(c) * P_i``, with
coefficients ``w(c)`` given by the path type (line, arc, Bernstein basis, ...). Some control points are fixed (the
endpoints or corner modes, frozen buffers) and some are free (``nn.Parameter``s a curve module may train).
Non-floating tensors such as ``num_batches_tracked`` are carried over from the first endpoint, not interpolated.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence

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


class Linear(Path):
    """The straight line ``(1 - t) * theta_a + t * theta_b``.

    Args:
        theta_a: Weights at ``t = 0``.
        theta_b: Weights at ``t = 1``.
    """

    def __init__(self, theta_a: Mapping[str, Tensor], theta_b: Mapping[str, Tensor]) -> None:
        super().__init__([theta_a, theta_b])

    def coefficients(self, coords: Tensor) -> Tensor:
        t = coords[:, 0]
        return torch.stack([1 - t, t], dim=1)


class Arc(Path):
    """The arc ``cos(pi t / 2) * theta_a + sin(pi t / 2) * theta_b`` (Anokhin & Yarotsky's arc connection).

    Meaningful when both endpoints are samples of the same zero-mean distribution, e.g. outputs of a point finder.
    """

    def __init__(self, theta_a: Mapping[str, Tensor], theta_b: Mapping[str, Tensor]) -> None:
        super().__init__([theta_a, theta_b])

    def coefficients(self, coords: Tensor) -> Tensor:
        t = coords[:, 0] * (math.pi / 2)
        return torch.stack([torch.cos(t), torch.sin(t)], dim=1)
