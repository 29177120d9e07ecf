"""Trainable curves and surfaces in weight space: Bezier curves, polygonal chains, Bezier surfaces.

Each path is a :class:`~lmc_lightning.weights.paths.Path` whose fixed control points are the endpoints (or the four
corner modes) and whose free control points ("bends") are ``nn.Parameter``s. By default the bends start on the
straight line (or bilinear patch) between the fixed points, where every path here *is* that line or patch exactly,
so training starts from linear interpolation. Non-floating tensors (``num_batches_tracked``) are carried from the
first endpoint.

Control-point order (the order of :meth:`Path.coefficients` columns and of ``init``):

* curves: ``[theta_a, bend_1, ..., bend_n, theta_b]``; ``init`` lists the bends ``bend_1..bend_n``;
* :class:`BezierSurface`: an ``(n + 2) x (n + 2)`` grid ``P[i][j]`` (``n = num_bends = degree - 1``; ``i`` along
  ``u``, ``j`` along ``v``) stored row-major (index ``i * (n + 2) + j``); corners ``[(0, 0), (1, 0), (0, 1), (1, 1)]``
  in ``(u, v)``; ``init`` lists the non-corner grid points in row-major order.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from lmc_lightning.weights.paths import Path, WeightDict, _slot, check_compatible, combine

CORNERS: tuple[tuple[int, int], ...] = ((0, 0), (1, 0), (0, 1), (1, 1))
"""``(u, v)`` position of each corner mode of a :class:`BezierSurface`, in the order the corners are given."""

CORNER_ORDERS: dict[str, tuple[tuple[int, int], ...]] = {
    "uv": CORNERS,
    "mcsurface": ((0, 0), (0, 1), (1, 0), (1, 1)),
}
"""``(u, v)`` positions of the four corners for each ``corner_order`` of :class:`BezierSurface`: ours (``"uv"``,
``u`` varies first) and MCSurface's (checkpoint 1 at ``(0, 1)``, checkpoint 2 at ``(1, 0)``)."""


def surface_degree(num_bends: int | None = None, degree: int | None = None) -> int:
    """Number of free control points per edge of a Bezier surface from either of its two descriptions.

    ``num_bends`` counts the free control points between two corners along an edge (control grid
    ``(num_bends + 2)^2``, polynomial degree ``num_bends + 1``); ``degree`` is the polynomial degree ``n`` of
    MCSurface's ``num_bends: n`` (control grid ``(n + 1)^2``). ``degree = num_bends + 1``.

    Args:
        num_bends: Free points per edge (default 1 when ``degree`` is not given either).
        degree: Bezier degree (>= 1), MCSurface's meaning of ``num_bends``.

    Returns:
        ``num_bends``.

    Raises:
        ValueError: A value out of range, or both given and inconsistent.
    """
    if degree is None:
        return _check_bends(1 if num_bends is None else num_bends)
    if isinstance(degree, bool) or not isinstance(degree, int) or degree < 1:
        raise ValueError(f"degree must be an integer >= 1 (the Bezier degree, MCSurface's num_bends), "
                         f"got {degree!r}.")
    if num_bends is not None and num_bends != degree - 1:
        raise ValueError(f"degree={degree} means num_bends={degree - 1} free points per edge, but "
                         f"num_bends={num_bends} was also given; pass only one of them.")
    return degree - 1


@functools.lru_cache(maxsize=64)
def _bernstein_constants(degree: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """Exponents ``k`` and binomial coefficients ``C(n, k)`` (cached: built once per degree, dtype and device)."""
    with torch.inference_mode(False):
        k = torch.arange(degree + 1, dtype=dtype, device=device)
        binom = torch.tensor([math.comb(degree, i) for i in range(degree + 1)], dtype=dtype, device=device)
    return k, binom


def bernstein(t: Tensor, degree: int) -> Tensor:
    """Bernstein basis polynomials ``C(n, k) t^k (1 - t)^(n - k)``.

    Args:
        t: ``[P]`` parameters in ``[0, 1]``.
        degree: Polynomial degree ``n`` (``n + 1`` basis functions).

    Returns:
        ``[P, degree + 1]`` basis values; every row sums to 1.
    """
    k, binom = _bernstein_constants(degree, t.dtype, t.device)
    t = t[:, None]
    return binom * t.pow(k) * (1 - t).pow(degree - k)


def _check_bends(num_bends: int) -> int:
    if isinstance(num_bends, bool) or not isinstance(num_bends, int) or num_bends < 0:
        raise ValueError(f"num_bends must be a non-negative integer (free control points), got {num_bends!r}.")
    return num_bends


def _check_count(thetas: Sequence[Mapping[str, Tensor]], count: int, what: str) -> list[Mapping[str, Tensor]]:
    thetas = list(thetas)
    if len(thetas) != count:
        raise ValueError(f"{what}: expected {count} weight dicts, got {len(thetas)}.")
    return thetas


class ControlPath(Path):
    """A :class:`Path` whose free control points have a "linear" position: a fixed mix of the fixed points.

    ``linear_weights[i, j]`` is the weight of fixed point ``j`` in the linear position of free point ``i``; at those
    positions the path reduces to linear (bilinear) interpolation of the fixed points. This gives the default
    initialisation, :meth:`distance_to_linear` (for L2 regularisation toward the straight path) and
    :meth:`reset_to_linear`.

    Args:
        fixed: Fixed control points.
        linear_weights: ``[n_free, n_fixed]`` mixing weights of the linear position of each free point.
        init: Initial free control points (full weight dicts, one per free point); ``None`` for the linear position.
        fixed_index: Position of each fixed point in the control-point sequence.
        free_index: Position of each free point in the control-point sequence.
    """

    def __init__(
        self,
        fixed: Sequence[Mapping[str, Tensor]],
        linear_weights: Tensor,
        init: Sequence[Mapping[str, Tensor]] | None = None,
        fixed_index: Sequence[int] | None = None,
        free_index: Sequence[int] | None = None,
    ) -> None:
        linear_weights = torch.as_tensor(linear_weights, dtype=torch.float64)
        n_free = linear_weights.shape[0]
        if not fixed:
            raise ValueError(f"{type(self).__name__} needs at least one fixed control point.")
        check_compatible(*fixed, names=[f"endpoint {i}" for i in range(len(fixed))], devices=True)
        if init is None:
            free = [self._mix(fixed, row) for row in linear_weights]
        else:
            free = list(init)
            if len(free) != n_free:
                raise ValueError(
                    f"{type(self).__name__}: init has {len(free)} weight dicts but the path has {n_free} free control "
                    "points; pass one weight dict per free point (or init=None for the linear initialisation)."
                )
        super().__init__(fixed, free, fixed_index, free_index)
        self.linear_weights = linear_weights

    @staticmethod
    def _mix(thetas: Sequence[Mapping[str, Tensor]], weights: Tensor) -> WeightDict:
        out: WeightDict = {}
        for key, ref in thetas[0].items():
            if torch.is_floating_point(ref):
                out[key] = sum(float(w) * t[key].detach() for w, t in zip(weights, thetas, strict=True))
            else:
                out[key] = ref.detach()
        return out

    def _fixed(self, key: str) -> Tensor:
        return getattr(self.fixed_store, _slot(key))

    def _free(self, key: str) -> Tensor:
        return getattr(self.free_store, _slot(key))

    def free_parameter(self, key: str) -> Tensor:
        """The ``[n_free, *shape]`` parameter holding the free control points of floating key ``key``."""
        if key not in self.float_keys:
            raise KeyError(f"'{key}' is not a floating-point key of this path; free points exist for {self.float_keys}")
        return self._free(key)

    def linear_free(self, key: str) -> Tensor:
        """Linear position of the free control points of ``key``, ``[n_free, *shape]``."""
        fixed = self._fixed(key)
        return torch.tensordot(self.linear_weights.to(fixed), fixed, dims=1)

    def distance_to_linear(self, keys: Sequence[str] | None = None) -> Tensor:
        """Squared L2 distance of the free control points to their linear position, summed over points and keys.

        Args:
            keys: Keys to include (default: all floating keys). Pass only parameter keys to leave BN statistics out.
        """
        keys = self.float_keys if keys is None else list(keys)
        total = self._fixed(self.float_keys[0]).new_zeros(())
        if self.num_free == 0:
            return total
        for key in keys:
            total = total + (self._free(key) - self.linear_free(key)).pow(2).sum()
        return total

    @torch.no_grad()
    def reset_to_linear(self) -> None:
        """Move every free control point back to its linear position (in place)."""
        for key in self.float_keys:
            if self.num_free:
                self._free(key).copy_(self.linear_free(key))

    def _split(self, coords: Tensor) -> tuple[Tensor, Tensor]:
        """Coefficients of the fixed and the free points, ``[P, n_fixed]`` and ``[P, n_free]``, on the device.

        Computed on the CPU and sent in one small copy (for many points at once; a single point uses Python floats,
        see :meth:`_point`); both parts are column views of that one tensor.
        """
        coords = coords.detach().to("cpu", torch.float64).reshape(-1, self.dim)
        coef = self.coefficients(coords)
        ref = self._fixed(self.float_keys[0])
        both = coef[:, self.fixed_index + self.free_index].to(ref.dtype)
        if ref.device.type != "cpu":
            both = both.to(ref.device, non_blocking=True)
        return both[:, : self.num_fixed], both[:, self.num_fixed :]

    def _flat_layout(self, copy_keys: frozenset[str]) -> _FlatLayout:
        """The cached :class:`_FlatLayout` for ``copy_keys``, rebuilt whenever a stored tensor changed."""
        cache = self.__dict__.setdefault("_flat_cache", {})
        layout = cache.get(copy_keys)
        if layout is not None and layout.still_valid(self):
            return layout
        layout = _FlatLayout(self, copy_keys)
        cache[copy_keys] = layout
        return layout

    def _point(self, coords: Sequence[float], copy_keys: frozenset[str] = frozenset()) -> WeightDict:
        """Weights at one point, every group of keys computed by one fused combination of flat control points.

        Keys whose free points need gradients form one flat vector ``c_fixed @ fixed + c_free @ cat(free)`` (one
        concatenation and a few multiply-adds, see :func:`combine`, with the coefficients as Python floats), viewed
        per key. ``copy_keys`` (buffers the net may update in place) come back as fresh tensors, detached, sharing
        nothing with the other keys.
        """
        coef = self.point_coefficients(coords)
        coef_fixed, coef_free = [coef[i] for i in self.fixed_index], [coef[i] for i in self.free_index]
        layout = self._flat_layout(copy_keys)
        out: WeightDict = {}
        free = self.free_store._parameters
        for group in layout.float_groups:
            with torch.set_grad_enabled(group.grad and torch.is_grad_enabled()):
                flat = combine(coef_fixed, group.fixed)
                if self.num_free:
                    points = group.free
                    if points is None:
                        points = torch.cat([free[_slot(k)].reshape(self.num_free, -1) for k in group.keys], 1)
                    flat = flat + combine(coef_free, points)
            for key, piece, shape in zip(group.keys, flat.view(-1).split(group.sizes), group.shapes, strict=True):
                out[key] = piece.view(shape)
        for group in layout.other_groups:
            flat = group.fixed.clone()
            for key, piece, shape in zip(group.keys, flat.split(group.sizes), group.shapes, strict=True):
                out[key] = piece.view(shape)
        for key in layout.stored_keys:
            out[key] = self.other_store._buffers[_slot(key)]
        return {key: out[key] for key in self.keys_}

    def _combine(self, key: str, coef_fixed: Tensor, coef_free: Tensor) -> Tensor:
        """``[P, *shape]`` weights of ``key`` from the split coefficients, without stacking the control points."""
        fixed = self._fixed(key)
        out = combine(coef_fixed, fixed.flatten(1))
        if self.num_free:
            out = out + combine(coef_free, self._free(key).flatten(1))
        return out.view(-1, *fixed.shape[1:])

    def stacked(self, coords) -> WeightDict:
        """Weights at many points at once, ``{key: [P, *shape]}`` (see :meth:`Path.stacked`)."""
        coef = self._split(torch.as_tensor(coords, dtype=torch.float64))
        out: WeightDict = {}
        for key in self.keys_:
            if key in self.float_keys:
                out[key] = self._combine(key, *coef)
            else:
                buf = getattr(self.other_store, _slot(key))
                out[key] = buf.unsqueeze(0).expand(coef[0].shape[0], *buf.shape)
        return out

    def forward(self, *coords: float | Tensor) -> WeightDict:
        """Weights at one point: ``path(t)`` for curves, ``path(u, v)`` for surfaces."""
        if len(coords) != self.dim:
            raise ValueError(f"{type(self).__name__} takes {self.dim} coordinate(s), got {len(coords)}.")
        return self._point(coords)


class _KeyGroup:
    """Keys whose control points are combined as one flat vector: ``fixed`` ``[n_fixed, N]`` (or, for non-floating
    keys, the ``[N]`` carried values), ``free`` ``[n_free, N]`` when cached, ``None`` when concatenated every call
    (trainable points), and per-key sizes and shapes to view the result."""

    def __init__(self, keys: list[str], tensors: list[Tensor], lead: int | None, grad: bool = False) -> None:
        self.keys, self.grad = keys, grad
        self.shapes = [t.shape[1:] if lead is not None else t.shape for t in tensors]
        self.sizes = [math.prod(shape) for shape in self.shapes]
        flat = [t.reshape(lead, -1) if lead is not None else t.reshape(-1) for t in tensors]
        self.fixed = torch.cat(flat, dim=-1)
        self.free: Tensor | None = None


class _FlatLayout:
    """Flat copies of a :class:`ControlPath`'s stored control points, grouped so each group is one fused op.

    Groups: floating keys whose free points train (free points concatenated per call so gradients reach the
    per-key parameters), ``copy_keys`` (fresh detached copies for in-place updates), other floating keys, and the
    non-floating ``copy_keys`` by dtype (one clone each). The rest of the non-floating keys are returned as stored.
    """

    def __init__(self, path: ControlPath, copy_keys: frozenset[str]) -> None:
        free = path.free_store._parameters
        n_free = path.num_free
        trains = [k for k in path.float_keys if k not in copy_keys and n_free and free[_slot(k)].requires_grad]
        copies = [k for k in path.float_keys if k in copy_keys]
        rest = [k for k in path.float_keys if k not in copy_keys and k not in trains]
        self.float_groups: list[_KeyGroup] = []
        with torch.no_grad(), torch.inference_mode(False):
            for keys, grad in ((trains, True), (copies, False), (rest, False)):
                if not keys:
                    continue
                group = _KeyGroup(keys, [path._fixed(k) for k in keys], path.num_fixed, grad)
                if not grad and n_free:
                    group.free = torch.cat([free[_slot(k)].reshape(n_free, -1) for k in keys], 1)
                self.float_groups.append(group)
            others = [k for k in path.keys_ if k not in path.float_keys and k in copy_keys]
            stored = {k: path.other_store._buffers[_slot(k)] for k in others}
            self.other_groups = [
                _KeyGroup(keys, [stored[k] for k in keys], None)
                for dtype in dict.fromkeys(t.dtype for t in stored.values())
                for keys in [[k for k in others if stored[k].dtype == dtype]]
            ]
        self.stored_keys = [k for k in path.keys_ if k not in path.float_keys and k not in copy_keys]
        trained = {_slot(k) for k in trains}
        # Tensors copied into this layout: watched for edits. Aliases keep their memory alive, so an address seen
        # again is the same tensor.
        self.watched = [*path.fixed_store._buffers.values(), *path.other_store._buffers.values(),
                        *(p for name, p in free.items() if name not in trained)]
        self.aliases = [t.detach() for t in self.watched]
        self.signature = self._signature(path)

    def _signature(self, path: ControlPath) -> tuple:
        free = path.free_store._parameters.values()
        return (tuple(map(Tensor.data_ptr, self.watched)), tuple(t._version for t in self.watched),
                tuple(map(Tensor.data_ptr, free)), tuple(p.requires_grad for p in free))

    def still_valid(self, path: ControlPath) -> bool:
        """Whether no copied tensor of ``path`` was replaced or edited in place since this layout was built."""
        current = [*path.fixed_store._buffers.values(), *path.other_store._buffers.values()]
        if any(a is not b for a, b in zip(current, self.watched, strict=False)) or len(current) > len(self.watched):
            return False
        return self._signature(path) == self.signature


def _curve_linear_weights(num_bends: int) -> Tensor:
    """Bend ``k`` (of ``n``) sits at ``t = k / (n + 1)`` on the line: weights ``[1 - t, t]``."""
    t = torch.arange(1, num_bends + 1, dtype=torch.float64) / (num_bends + 1)
    return torch.stack([1 - t, t], dim=1)


class Bezier(ControlPath):
    """Bezier curve of degree ``num_bends + 1`` between two endpoints (Garipov et al., 2018).

    ``theta(t) = sum_k B_{k,n+1}(t) P_k`` with the Bernstein basis ``B``, ``P_0 = theta_a``,
    ``P_{n+1} = theta_b`` and ``n = num_bends`` free bends. One bend gives the quadratic curve.

    Args:
        endpoints: ``[theta_a, theta_b]`` weight dicts (frozen).
        num_bends: Number of free control points (0 gives the straight line).
        init: ``num_bends`` weight dicts to start the bends from; default: equally spaced on the line, where the curve
            equals linear interpolation with the same parametrisation.
    """

    def __init__(
        self,
        endpoints: Sequence[Mapping[str, Tensor]],
        num_bends: int = 1,
        init: Sequence[Mapping[str, Tensor]] | None = None,
    ) -> None:
        endpoints = _check_count(endpoints, 2, f"{type(self).__name__} endpoints")
        self.num_bends = _check_bends(num_bends)
        super().__init__(
            endpoints,
            _curve_linear_weights(num_bends),
            init,
            fixed_index=[0, num_bends + 1],
            free_index=list(range(1, num_bends + 1)),
        )

    def coefficients(self, coords: Tensor) -> Tensor:
        return bernstein(coords[:, 0], self.num_bends + 1)

    @classmethod
    def through_midpoint(
        cls, theta_a: Mapping[str, Tensor], theta_b: Mapping[str, Tensor], midpoint: Mapping[str, Tensor]
    ) -> Bezier:
        """The quadratic Bezier curve from ``theta_a`` to ``theta_b`` that passes through ``midpoint`` at ``t = 0.5``.

        Its control point is ``2 m - (theta_a + theta_b) / 2``. (MMC's quadratic path is this curve family too, but it
        trains the control point itself, from a random net: ``CurveModule(objective="qmc")``.)
        """
        control = {
            k: (2 * m.detach() - (theta_a[k].detach() + theta_b[k].detach()) / 2) if torch.is_floating_point(m)
            else m.detach()
            for k, m in midpoint.items()
        }
        return cls([theta_a, theta_b], num_bends=1, init=[control])


class MidpointQuadratic(ControlPath):
    """The quadratic curve through ``theta_a`` (t=0), a free midpoint ``m`` (t=0.5) and ``theta_b`` (t=1).

    The same curve as :meth:`Bezier.through_midpoint`, parametrised by the on-curve midpoint itself (Lagrange basis
    ``(1 - t)(1 - 2t), 4t(1 - t), t(2t - 1)``), so training optimises ``m = theta(0.5)``. This is our objective, not
    MMC's: MMC trains the Bezier control point (coefficient ``2t(1 - t)``, a 4x smaller effective step than ``m``'s
    ``4t(1 - t)``) from a random net; see ``CurveModule(objective="qmc")``.

    Args:
        endpoints: ``[theta_a, theta_b]`` weight dicts (frozen).
        init: ``[m]``, one weight dict to start the midpoint from; default ``(theta_a + theta_b) / 2``.
    """

    num_bends = 1

    def __init__(
        self, endpoints: Sequence[Mapping[str, Tensor]], init: Sequence[Mapping[str, Tensor]] | None = None
    ) -> None:
        endpoints = _check_count(endpoints, 2, f"{type(self).__name__} endpoints")
        super().__init__(endpoints, _curve_linear_weights(1), init, fixed_index=[0, 2], free_index=[1])

    def coefficients(self, coords: Tensor) -> Tensor:
        t = coords[:, 0]
        return torch.stack([(1 - t) * (1 - 2 * t), 4 * t * (1 - t), t * (2 * t - 1)], dim=1)

    def midpoint(self) -> WeightDict:
        """The current midpoint ``theta(0.5)`` as a weight dict."""
        return self(0.5)

    def to_bezier(self) -> Bezier:
        """An equal :class:`Bezier` curve (one bend), detached from this module."""
        return Bezier.through_midpoint(self.endpoint(0), self.endpoint(1), self.midpoint())


class PolyChain(ControlPath):
    """Polygonal chain ``theta_a -> bend_1 -> ... -> bend_n -> theta_b``, bends at ``t = k / (n + 1)``.

    Piecewise linear in ``t`` with equally long parameter intervals (Garipov et al.'s PolyChain).

    Args:
        endpoints: ``[theta_a, theta_b]`` weight dicts (frozen).
        num_bends: Number of free bends (0 gives the straight line).
        init: ``num_bends`` weight dicts to start the bends from; default: on the line at ``t = k / (n + 1)``.
    """

    def __init__(
        self,
        endpoints: Sequence[Mapping[str, Tensor]],
        num_bends: int = 1,
        init: Sequence[Mapping[str, Tensor]] | None = None,
    ) -> None:
        endpoints = _check_count(endpoints, 2, f"{type(self).__name__} endpoints")
        self.num_bends = _check_bends(num_bends)
        super().__init__(
            endpoints,
            _curve_linear_weights(num_bends),
            init,
            fixed_index=[0, num_bends + 1],
            free_index=list(range(1, num_bends + 1)),
        )

    def coefficients(self, coords: Tensor) -> Tensor:
        n = self.num_bends + 1
        knots = torch.arange(n + 1, dtype=coords.dtype, device=coords.device)
        return (1 - (coords[:, :1] * n - knots).abs()).clamp_min(0)


class BezierSurface(ControlPath):
    """Tensor-product Bezier surface spanned by four corner modes (MCSurface).

    ``theta(u, v) = sum_{i,j} B_{i,n+1}(u) B_{j,n+1}(v) P_ij`` over an ``(n + 2) x (n + 2)`` control grid whose corners
    are the fixed modes. Its edges are Bezier curves between adjacent corners (see :meth:`edge`).

    Size: ``num_bends`` counts free points per edge (grid ``num_bends + 2``); ``degree`` is MCSurface's
    ``num_bends: n``, the polynomial degree (grid ``n + 1``). MCSurface's ``n = 2`` (a 3x3 grid, 5 free points) is
    ``degree=2`` = ``num_bends=1``. Pass one of them (see :func:`surface_degree`).

    Corner order: ``corner_order="uv"`` places the corners at ``(0, 0), (1, 0), (0, 1), (1, 1)``;
    ``"mcsurface"`` at ``(0, 0), (0, 1), (1, 0), (1, 1)`` as MCSurface's ``checkpoint_paths`` (the same four modes
    give the transposed surface). Internally the fixed points are stored in the ``"uv"`` order.

    Args:
        corners: Four weight dicts (frozen), at the positions of ``corner_order``.
        num_bends: Free grid points per edge between two corners (grid side ``num_bends + 2``); default 1.
        init: Weight dicts for the ``(n + 2)^2 - 4`` non-corner grid points in row-major order; default: the bilinear
            interpolation of the corners at ``(i / (n + 1), j / (n + 1))``, where the surface equals the bilinear patch.
        degree: Bezier degree (MCSurface's ``num_bends``); alternative to ``num_bends``.
        corner_order: ``"uv"`` or ``"mcsurface"`` (see above).
    """

    dim = 2

    def __init__(
        self,
        corners: Sequence[Mapping[str, Tensor]],
        num_bends: int | None = None,
        init: Sequence[Mapping[str, Tensor]] | None = None,
        degree: int | None = None,
        corner_order: str = "uv",
    ) -> None:
        if corner_order not in CORNER_ORDERS:
            raise ValueError(f"corner_order must be one of {sorted(CORNER_ORDERS)}, got {corner_order!r}.")
        order = CORNER_ORDERS[corner_order]
        corners = _check_count(corners, 4, f"{type(self).__name__} corners (order (u, v) = {list(order)})")
        corners = [corners[order.index(pos)] for pos in CORNERS]  # stored in the "uv" order
        self.corner_order = corner_order
        num_bends = surface_degree(num_bends, degree)
        self.num_bends = num_bends
        m = num_bends + 2
        corner_index = [i * (m - 1) * m + j * (m - 1) for i, j in CORNERS]
        free_index = [k for k in range(m * m) if k not in corner_index]
        pos = torch.tensor([divmod(k, m) for k in free_index], dtype=torch.float64).reshape(-1, 2) / (m - 1)
        super().__init__(corners, self._bilinear(pos), init, fixed_index=corner_index, free_index=free_index)
        grid = [divmod(k, m) for k in free_index]
        # Per free point: whether it lies on the boundary of the control grid (a bend of an edge curve).
        self.on_edge: list[bool] = [i in (0, m - 1) or j in (0, m - 1) for i, j in grid]

    @property
    def degree(self) -> int:
        """Bezier degree ``num_bends + 1`` (MCSurface's ``num_bends``)."""
        return self.num_bends + 1

    @staticmethod
    def _bilinear(uv: Tensor) -> Tensor:
        u, v = uv[:, 0], uv[:, 1]
        return torch.stack([(1 - u) * (1 - v), u * (1 - v), (1 - u) * v, u * v], dim=1)

    @property
    def grid_size(self) -> int:
        """Control points per side, ``num_bends + 2``."""
        return self.num_bends + 2

    def coefficients(self, coords: Tensor) -> Tensor:
        bu = bernstein(coords[:, 0], self.num_bends + 1)
        bv = bernstein(coords[:, 1], self.num_bends + 1)
        return (bu[:, :, None] * bv[:, None, :]).reshape(coords.shape[0], -1)

    def grid_point(self, key: str, i: int, j: int) -> Tensor:
        """Control point ``P_ij`` of floating key ``key``."""
        m = self.grid_size
        if not (0 <= i < m and 0 <= j < m):
            raise IndexError(f"Grid point ({i}, {j}) outside the {m} x {m} control grid.")
        k = i * m + j
        if k in self.fixed_index:
            return self._fixed(key)[self.fixed_index.index(k)]
        return self._free(key)[self.free_index.index(k)]

    def edge(self, axis: str, side: int) -> Bezier:
        """The edge curve ``u = side`` (``axis="u"``) or ``v = side`` (``axis="v"``) as a detached :class:`Bezier`.

        ``edge("v", 0)`` runs from corner ``(0, 0)`` to ``(1, 0)`` along ``u``; ``edge("u", 1)`` from ``(1, 0)`` to
        ``(1, 1)`` along ``v``. On that edge the surface equals the returned curve.
        """
        if axis not in ("u", "v") or side not in (0, 1):
            raise ValueError(f"edge(axis, side) takes axis 'u' or 'v' and side 0 or 1, got ({axis!r}, {side!r}).")
        m = self.grid_size
        fixed_line = (m - 1) * side
        cells = [(fixed_line, k) if axis == "u" else (k, fixed_line) for k in range(m)]
        points = []
        for i, j in cells:
            theta = {key: self.grid_point(key, i, j).detach() for key in self.float_keys}
            theta.update({key: getattr(self.other_store, _slot(key)) for key in self.keys_ if key not in theta})
            points.append({key: theta[key] for key in self.keys_})
        return Bezier([points[0], points[-1]], self.num_bends, init=points[1:-1])

    @torch.no_grad()
    def fill_interior_from_edges(self) -> None:
        """Set interior grid points to the discrete Coons patch of the boundary control points (in place).

        ``P_ij = (1-u) P_0j + u P_mj + (1-v) P_i0 + v P_im - bilinear(corners)`` with ``u = i/m, v = j/m``. With
        straight edges this is the bilinear initialisation; used after an edge-only warm-up (``init_epochs``).
        """
        m = self.grid_size - 1
        for key in self.float_keys:
            free = self._free(key)
            p = lambda i, j, key=key: self.grid_point(key, i, j)
            for n, k in enumerate(self.free_index):
                i, j = divmod(k, m + 1)
                if self.on_edge[n]:
                    continue
                u, v = i / m, j / m
                coons = (1 - u) * p(0, j) + u * p(m, j) + (1 - v) * p(i, 0) + v * p(i, m)
                corners = (1 - u) * (1 - v) * p(0, 0) + u * (1 - v) * p(m, 0) + (1 - u) * v * p(0, m) + u * v * p(m, m)
                free[n].copy_(coons - corners)
