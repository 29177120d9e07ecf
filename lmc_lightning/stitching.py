"""Model stitching (Godfrey et al., 2022, the modelsym seed): stitch points, stitching layers, stitched nets.

A stitched net runs net A up to a point, a stitching layer, then net B from the point on::

    points = stitch_points(net_a)                      # every activation module, in execution order
    model = stitch(net_a, net_b, points[2], "birkhoff", input_shape=(1, 28, 28))

Stitching layers act on the channel axis (dim 1) of ``[N, C, h, w]`` or ``[N, C]`` features, as 1x1 convolutions:
``Affine`` (full C x C), ``LowRank`` (C -> r -> C), ``Lasso`` (full + L1), ``Birkhoff`` (G_ReLU: doubly stochastic W
times positive scalars, rounded to a permutation at evaluation), ``SoftSort`` (a relaxed permutation times positive
scalars) and ``IdentityStitch`` (no parameters). Each exposes ``penalty()`` (its extra loss) and ``project()`` (run
after every optimiser step).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, fx, nn

from lmc_lightning.weights.permutation.weight_matching import solve_assignment

#: Module types whose outputs are stitch points.
ACTIVATIONS: tuple[type[nn.Module], ...] = (nn.ReLU, nn.LeakyReLU, nn.Sigmoid, nn.Tanh, nn.GELU, nn.SiLU)
LAYERS = ("identity", "affine", "lowrank", "lasso", "birkhoff", "softsort")


# --------------------------------------------------------------------------------------------- permutation helpers
def sinkhorn_(a: Tensor, iters: int = 16) -> Tensor:
    """Alternately divide the rows, then the columns, of a non-negative matrix by their sums (``iters`` rounds
    each), in place; returns ``a``.

    Zero sums are left alone (as in the seed), so an all-zero row or column stays zero. Three kernels per half
    round (sum, clamp, divide) and no temporaries beyond the sums.
    """
    tiny = torch.finfo(a.dtype).tiny  # a zero sum means an all-zero line: dividing it by ``tiny`` leaves it zero
    for _ in range(iters):
        a.div_(a.sum(dim=1, keepdim=True).clamp_min_(tiny))
        a.div_(a.sum(dim=0, keepdim=True).clamp_min_(tiny))
    return a


def sinkhorn(a: Tensor, iters: int = 16) -> Tensor:
    """:func:`sinkhorn_` on a copy of ``a`` (``a`` is left unchanged)."""
    return sinkhorn_(a.clone(), iters)


def hungarian(w: Tensor) -> Tensor:
    """The permutation matrix ``P`` maximising ``sum(P * w)`` (linear assignment), same dtype and device as ``w``."""
    p = torch.zeros_like(w)
    p[torch.arange(len(w)), solve_assignment(w).to(w.device)] = 1
    return p


def channel_map(x: Tensor, m: Tensor) -> Tensor:
    """Apply ``m`` ``[C_out, C_in]`` to the channel axis (dim 1) of ``x``: a 1x1 convolution without bias."""
    if x.dim() == 2:
        return x @ m.t()
    return torch.einsum("oc,nc...->no...", m.to(x.dtype), x)


def _capture(fn: Callable[[], None], device: torch.device) -> torch.cuda.CUDAGraph | None:
    """Capture ``fn`` (in-place work on fixed tensors) into a CUDA graph; None if capture fails."""
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.device(device), torch.cuda.graph(graph, capture_error_mode="thread_local"):
            fn()
    except RuntimeError as err:  # capture unsupported here (e.g. another capture under way): stay eager
        warnings.warn(f"Birkhoff projection: CUDA graph capture failed ({err}); using the eager projection.",
                      stacklevel=3)
        return None
    return graph


# ------------------------------------------------------------------------------------------------ stitching layers
class StitchLayer(nn.Module):
    """Base stitching layer: ``forward`` maps features, ``penalty`` is its extra loss, ``project`` runs after steps."""

    def matrix(self) -> Tensor:
        """The C x C map currently applied (train or eval form, following ``self.training``)."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        """Map the channels of ``x``."""
        return channel_map(x, self.matrix())

    def penalty(self) -> Tensor | float:
        """Extra loss added to the cross-entropy during training."""
        return 0.0

    @torch.no_grad()
    def project(self) -> None:
        """Constraint step after each optimiser step (none by default)."""


class IdentityStitch(StitchLayer):
    """The identity map (an untrained stitch: A's features fed to B as they are)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels

    def forward(self, x: Tensor) -> Tensor:
        """``x`` unchanged."""
        return x

    def matrix(self) -> Tensor:
        """The identity matrix."""
        return torch.eye(self.channels)


def _conv_init(rows: int, cols: int) -> Tensor:
    """``nn.Conv2d(cols, rows, 1)``'s default weight init (Kaiming uniform, a = sqrt(5): U(+-1/sqrt(cols)))."""
    bound = 1 / math.sqrt(cols)
    return torch.empty(rows, cols).uniform_(-bound, bound)


class Affine(StitchLayer):
    """Full C x C 1x1 convolution without bias, initialised as ``nn.Conv2d(C, C, 1)`` (the seed's standard stitch)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(_conv_init(channels, channels))

    def matrix(self) -> Tensor:
        """The weight."""
        return self.weight


class LowRank(StitchLayer):
    """C -> r -> C: two bias-free 1x1 convolutions (``down`` then ``up``), rank ``r``."""

    def __init__(self, channels: int, rank: int = 1) -> None:
        super().__init__()
        if not 1 <= rank <= channels:
            raise ValueError(f"rank must be in [1, {channels}] (the channels at the point), got {rank}.")
        self.down = nn.Parameter(_conv_init(rank, channels))
        self.up = nn.Parameter(_conv_init(channels, rank))

    def forward(self, x: Tensor) -> Tensor:
        """``up(down(x))``, without forming the C x C product."""
        return channel_map(channel_map(x, self.down), self.up)

    def matrix(self) -> Tensor:
        """``up @ down``."""
        return self.up @ self.down


class Lasso(StitchLayer):
    """Full C x C map with an L1 penalty ``lam * sum|W|``; entries with ``|W| < threshold`` are zero at evaluation.

    Args:
        channels: C.
        lam: L1 multiplier (the seed's ``--multiplier``, swept over 1e-4..1e-1).
        threshold: Magnitude below which entries are dropped at evaluation (1e-4 in the seed).
    """

    def __init__(self, channels: int, lam: float = 1e-3, threshold: float = 1e-4) -> None:
        super().__init__()
        if lam < 0:
            raise ValueError(f"lam must be >= 0, got {lam}.")
        self.lam, self.threshold = lam, threshold
        self.weight = nn.Parameter(_conv_init(channels, channels))

    def matrix(self) -> Tensor:
        """The weight; thresholded in eval mode."""
        if self.training:
            return self.weight
        return self.weight * (self.weight.abs() >= self.threshold)

    def penalty(self) -> Tensor:
        """``lam * sum|W|``."""
        return self.lam * self.weight.abs().sum()


class _Rounded(StitchLayer):
    """A stitch whose eval form is a hard permutation times ``diag(s)``, cached until the next train-mode forward."""

    def __init__(self) -> None:
        super().__init__()
        self._cached: Tensor | None = None
        #: In eval mode, apply the rounded permutation (True) or the soft matrix (False).
        self.hard = True

    def soft(self) -> Tensor:
        """The relaxed permutation (no scalars)."""
        raise NotImplementedError

    def scale(self) -> Tensor:
        """The per-channel scalars (ones while they are off)."""
        raise NotImplementedError

    def permutation(self) -> Tensor:
        """Hungarian rounding (maximise) of the relaxed permutation."""
        if self._cached is None or self._cached.device != self.soft().device:
            self._cached = hungarian(self.soft().detach())
        return self._cached

    def train(self, mode: bool = True) -> _Rounded:
        """Switch mode; parameters may change in train mode, so the cached rounding is dropped."""
        if mode:
            self._cached = None
        return super().train(mode)

    def matrix(self) -> Tensor:
        """``soft * diag(s)`` when training (or ``hard`` is False), ``P * diag(s)`` in eval mode."""
        if self.training:
            self._cached = None
            return self.soft() * self.scale()
        return (self.permutation() if self.hard else self.soft()) * self.scale()

    @torch.no_grad()
    def distance_to_permutation(self) -> dict[str, float]:
        """How far the relaxed matrix is from its rounding ``P``.

        Returns:
            ``distance``: ``||W - P||_F / sqrt(2C)`` (0 at a permutation, at most 1 for doubly stochastic W);
            ``row_max``: mean over rows of the largest entry (1 at a permutation, 1/C at the barycentre).
        """
        w = self.soft().detach()
        p = hungarian(w)
        c = w.shape[0]
        return {"distance": float((w - p).norm() / math.sqrt(2 * c)), "row_max": float(w.max(dim=1).values.mean())}


class Birkhoff(_Rounded):
    """G_ReLU stitch of the seed: ``W * diag(s)`` with ``W`` in the Birkhoff polytope and scalars ``s >= 0``.

    ``W`` starts at ``sinkhorn(rand, init_iters)``; after every optimiser step :meth:`project` sets
    ``W <- sinkhorn(relu(W), iters)`` and ``s <- relu(s)``. :meth:`penalty` is ``-alpha * ||W||_F``, which pushes W
    toward the vertices (permutations have the largest norm, sqrt(C)). At evaluation the map is
    ``Hungarian(W) * diag(s)``. The scalars start off (``scalars_on=False``: the map is ``W``; the seed's
    "permutation warm-up"); :class:`~lmc_lightning.modules.StitchModule` switches them on.

    Args:
        channels: C.
        alpha: Weight of the ``-||W||_F`` penalty.
        iters: Sinkhorn rounds of the projection (rows then columns, each round).
        init_iters: Sinkhorn rounds of the initialisation (100 in the seed).
        rms: Divide the penalty by sqrt(C) (the seed's ``rms`` option, off in its runs).
        cuda_graph: On CUDA, run the projection as one captured CUDA graph (see :meth:`project`).
    """

    def __init__(self, channels: int, alpha: float = 0.1, iters: int = 16, init_iters: int = 100,
                 rms: bool = False, cuda_graph: bool = True) -> None:
        super().__init__()
        self.alpha, self.iters, self.rms, self.cuda_graph = alpha, iters, rms, cuda_graph
        self._graph: tuple[tuple, torch.cuda.CUDAGraph] | None = None
        self.weight = nn.Parameter(sinkhorn(torch.rand(channels, channels), init_iters))
        self.weight_scalars = nn.Parameter(torch.ones(channels))
        self.register_buffer("scalars_enabled", torch.tensor(False))

    @property
    def scalars_on(self) -> bool:
        """Whether the map uses the scalars (a buffer, so checkpoints keep it)."""
        return bool(self.scalars_enabled)

    @scalars_on.setter
    def scalars_on(self, value: bool) -> None:
        self.scalars_enabled.fill_(bool(value))

    def soft(self) -> Tensor:
        """``W``."""
        return self.weight

    def scale(self) -> Tensor:
        """``s`` when the scalars are on, else ones."""
        return self.weight_scalars if self.scalars_on else torch.ones_like(self.weight_scalars)

    def penalty(self) -> Tensor:
        """``-alpha * ||W||_F`` (divided by sqrt(C) with ``rms``)."""
        norm = self.weight.norm()
        return -self.alpha * (norm / math.sqrt(self.weight.shape[0]) if self.rms else norm)

    @torch.no_grad()
    def _project_(self) -> None:
        self.weight.clamp_(min=0)
        sinkhorn_(self.weight, self.iters)
        self.weight_scalars.clamp_(min=0)

    @torch.no_grad()
    def project(self) -> None:
        """``W <- sinkhorn(relu(W))``, ``s <- relu(s)``, in place.

        On CUDA with ``cuda_graph`` the ~100 small kernels of the 16 rounds are captured once into a CUDA graph on
        W's and s's storage and replayed as one launch (the same kernels, so the same result); the graph is
        captured again when the parameters move, and the eager form is used if capture fails.
        """
        w = self.weight
        if not (self.cuda_graph and w.is_cuda):
            self._project_()
        else:
            key = (w.data_ptr(), self.weight_scalars.data_ptr(), tuple(w.shape), w.dtype, w.device, self.iters)
            if self._graph is not None and self._graph[0] == key:
                self._graph[1].replay()
            else:
                self._project_()  # this step eagerly; it also warms the kernels up for the capture
                graph = _capture(self._project_, w.device)
                self._graph = None if graph is None else (key, graph)
                self.cuda_graph = graph is not None
        self._cached = None

    def __getstate__(self) -> dict[str, Any]:
        """Pickle/deepcopy without the CUDA graph (captured again on first use)."""
        return {**self.__dict__, "_graph": None}


class SoftSort(_Rounded):
    """SoftSort permutation layer (the seed's unused ``Wreath``): ``P * diag(exp(t))``.

    ``P_ij = softmax_j(-|sort(s)_i - s_j| / (tau / C))`` with ``s ~ U(-1, 1)^C`` (sorted in descending order, as in
    Prillo & Eisenschlos's SoftSort); at evaluation ``P`` is rounded by Hungarian matching (the row-wise argmax
    whenever that is a permutation).

    Args:
        channels: C.
        tau: Temperature (divided by C).
    """

    def __init__(self, channels: int, tau: float = 1.0) -> None:
        super().__init__()
        if tau <= 0:
            raise ValueError(f"tau must be positive, got {tau}.")
        self.tau = tau
        self.weight = nn.Parameter(torch.empty(channels).uniform_(-1, 1))
        self.log_scalars = nn.Parameter(torch.zeros(channels))
        self.scalars_on = True

    def soft(self) -> Tensor:
        """The SoftSort matrix."""
        s = self.weight
        diff = (s.sort(descending=True).values[:, None] - s[None, :]).abs()
        return torch.softmax(-diff / (self.tau / len(s)), dim=1)

    def scale(self) -> Tensor:
        """``exp(t)``."""
        return self.log_scalars.exp()


def make_layer(kind: str, channels: int, **options: Any) -> StitchLayer:
    """Build a stitching layer by name.

    Args:
        kind: One of ``LAYERS``: ``"identity"``, ``"affine"``, ``"lowrank"`` (option ``rank``), ``"lasso"``
            (``lam``, ``threshold``), ``"birkhoff"`` (``alpha``, ``iters``, ``init_iters``, ``rms``), ``"softsort"``
            (``tau``).
        channels: C at the point.
        **options: The layer's options; options of other layers are ignored.
    """
    classes: dict[str, type[StitchLayer]] = {"identity": IdentityStitch, "affine": Affine, "lowrank": LowRank,
                                             "lasso": Lasso, "birkhoff": Birkhoff, "softsort": SoftSort}
    if kind not in classes:
        raise ValueError(f"Unknown stitching layer {kind!r}; choose one of {LAYERS}.")
    cls = classes[kind]
    import inspect

    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "channels"}
    return cls(channels, **{k: v for k, v in options.items() if k in accepted and v is not None})


# ------------------------------------------------------------------------------------------------- stitched nets
def _activation_nodes(gm: fx.GraphModule, types: tuple[type[nn.Module], ...]) -> dict[str, fx.Node]:
    modules = dict(gm.named_modules())
    nodes: dict[str, fx.Node] = {}
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(modules.get(str(node.target)), types):
            target = str(node.target)
            calls[target] = calls.get(target, 0) + 1
            nodes[target if calls[target] == 1 else node.name] = node
    return nodes


def stitch_points(net: nn.Module, types: tuple[type[nn.Module], ...] = ACTIVATIONS) -> list[str]:
    """Names of the stitch points of a ``torch.fx``-traceable net: every activation module's output, in execution
    order (the module name; the fx node name for a module called more than once).

    Args:
        net: The network.
        types: Module types that make a point (ReLU and the other common activations).
    """
    return list(_activation_nodes(fx.symbolic_trace(net), types))


@torch.no_grad()
def point_shapes(net: nn.Module, input_shape: tuple[int, ...], points: list[str] | None = None) -> dict[str, tuple]:
    """Feature shape (without the batch axis) at each point, from one forward pass in eval mode."""
    from lmc_lightning.weights.permutation.batches import capture_module, eval_mode

    points = stitch_points(net) if points is None else points
    gm = capture_module(net, points)
    p = next(net.parameters(), None)
    with eval_mode(gm):
        outs = gm(torch.zeros(2, *input_shape, device=p.device if p is not None else None))
    return {pt: tuple(o.shape[1:]) for pt, o in zip(points, outs, strict=True)}


def _signature(gm: fx.GraphModule) -> list[tuple]:
    return [(n.op, str(n.target)) for n in gm.graph.nodes]


class StitchedNet(fx.GraphModule):
    """A traced net whose nodes run with A's modules up to the point and B's downstream of the stitch.

    Attributes ``a``, ``b`` (the two nets, shared, not copied) and ``stitcher`` (the stitching layer); ``point``.
    """

    point: str


def stitch(net_a: nn.Module, net_b: nn.Module, point: str, layer: str | nn.Module = "affine",
           input_shape: tuple[int, ...] | None = None, **options: Any) -> StitchedNet:
    """Stitch net A into net B at ``point``.

    Every node of the traced graph that depends on the point's output runs with B's modules and parameters; every
    other node (everything up to the point, and skip paths that leave the stream before it) runs with A's. So at a
    point inside a residual block, the block's skip path carries A's stream into B's addition, as in the seed. The
    nets must share one architecture (the same traced graph). They are shared, not copied: deep-copy them first to
    keep the originals' BN statistics when training the stitch.

    Args:
        net_a: Net run up to the point.
        net_b: Net run from the point on.
        point: One of :func:`stitch_points` ``(net_a)`` (or any called module's name).
        layer: A stitching layer module, or its name (see :func:`make_layer`; then ``input_shape`` is needed).
        input_shape: ``(C, H, W)`` of one input, to find the channels at the point when ``layer`` is a name.
        **options: Options of the named layer (``rank``, ``alpha``, ...).

    Returns:
        The stitched net; ``stitched.stitcher`` is the layer.

    Raises:
        ValueError: Unknown point, different architectures, or a named layer without ``input_shape``.
    """
    gm_a, gm_b = fx.symbolic_trace(net_a), fx.symbolic_trace(net_b)
    if _signature(gm_a) != _signature(gm_b):
        raise ValueError("net_a and net_b trace to different graphs; stitching needs one architecture (same net name "
                         "and arguments).")
    nodes = _activation_nodes(gm_a, ACTIVATIONS)
    by_module = {str(n.target): n for n in gm_a.graph.nodes if n.op == "call_module"}
    node = nodes.get(point) or by_module.get(point)
    if node is None:
        raise ValueError(f"Unknown stitch point {point!r}; stitch_points(net) gives {list(nodes)}.")
    if isinstance(layer, str):
        if input_shape is None:
            raise ValueError("stitch(..., layer=<name>) needs input_shape=(C, H, W) to find the channels at the point; "
                             "or pass a layer module.")
        channels = point_shapes(net_a, tuple(input_shape), [point])[point][0]
        layer = make_layer(layer, channels, **options)
    graph, copies = fx.Graph(), {}
    graph.output(graph.graph_copy(gm_a.graph, copies))
    node = copies[node]
    # nodes downstream of the point run with B
    downstream: set[fx.Node] = set()
    for n in graph.nodes:
        if any(arg in downstream or arg is node for arg in n.all_input_nodes):
            downstream.add(n)
    for n in graph.nodes:
        if n.op in ("call_module", "get_attr"):
            n.target = ("b." if n in downstream else "a.") + str(n.target)
    with graph.inserting_after(node):
        stitched = graph.call_module("stitcher", (node,))
    node.replace_all_uses_with(stitched, delete_user_cb=lambda user: user is not stitched)
    root = nn.Module()
    root.a, root.b, root.stitcher = net_a, net_b, layer
    out = StitchedNet(root, graph, class_name="StitchedNet")
    out.point = point
    return out
