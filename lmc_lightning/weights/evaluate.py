"""Evaluate a path (or surface) of weights at many points: one evaluator for every path type.

Fast by construction: the test data and the statistics batches move to the device once for all points; on CUDA,
every net runs under bf16 autocast (conv nets also channels_last, cuDNN autotuned); and points are either evaluated
one after another on a private copy of the net (``"loop"``: weights copied in place, plain module forward) or batched
with ``torch.func.vmap`` over weights stacked along a leading dim (``"vmap"``); :func:`choose_strategy` picks one
from measurements. In fp32 both strategies equal a plain per-point loop to float rounding. On CUDA the loop runs
through a BN-fused trace of the net (:mod:`lmc_lightning.weights.fused`: BatchNorm, ReLU and residual add in one
pass) with large batches: the evaluation batch is as large as memory allows, and BN reset forwards many statistics
batches at once, each still normalised by its own statistics.

Several named evaluation sets (``data={"clean": ..., "rand_cue": ...}``) share one statistics pass per point.

Statistics (``bn="reset"``, ``"repair"``, ``"rescale"``, ``"reshift"``, ``"rescale_centered"``; see
:mod:`lmc_lightning.weights.renorm`) are taken at every
point on the same ``bn_batches x bn_batch_size`` training samples, a subset drawn with :data:`STATS_SEED` (all of the
training data, in order, when it is not larger). Weights at each point come from the path's coefficients, computed
on the device once for all points (paths are linear combinations of their control points), so evaluating a point
needs no host synchronisation.

Example:
    >>> result = evaluate_path(Linear(net_a.state_dict(), net_b.state_dict()), net_a, datamodule, bn="reset")
    >>> result.loss_barrier, result.to_json("path.json"), result.plot("path.png")
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap
from torch.nn.modules.conv import _ConvNd

from lmc_lightning.weights import fused, renorm
from lmc_lightning.weights.data import materialize, seeded_subset
from lmc_lightning.weights.data import to_device as _move
from lmc_lightning.weights.paths import Arc, Linear, NonlinearPath, Path, check_compatible, check_finite
from lmc_lightning.weights.result import PathResult

VMAP_MAX_PARAMS = 20_000_000
VMAP_MAX_CONV_PARAMS = 1_000_000
"""``strategy="auto"`` picks vmap for nets without conv layers up to this many parameters (else the loop)."""

AUTO_BATCH_MAX = 16384
AUTO_MEMORY_FRACTION = 0.25
"""``batch_size=None`` on CUDA (loop strategy): the largest batch, up to :data:`AUTO_BATCH_MAX`, whose measured
forward memory fits in this fraction of the device's free memory."""

STATS_SEED = 0
"""Seed of the random subset of training samples used for statistics (BN reset, REPAIR, RESCALE)."""

BNMode = Literal["auto", "reset", "reset_test", "repair", "rescale", "reshift", "rescale_centered"]
BN_MODES = ("reset", "reset_test", *renorm.MODES)
_PRECISIONS = {"auto": "auto", "32": "32", "32-true": "32", "fp32": "32", "bf16": "bf16", "bf16-mixed": "bf16"}


def _tensors(data: Any, split: str, what: str) -> tuple[Tensor, Tensor]:
    """``(x, y)`` of data in any form (:func:`~lmc_lightning.weights.data.materialize`); statistics (``"train"``)
    need inputs only, so unlabelled training data gets placeholder labels."""
    x, y = materialize(data, split, what=what, labels=split != "train")
    return x, (y if y is not None else torch.zeros(len(x), dtype=torch.long))


def _is_datamodule(data: Any) -> bool:
    return hasattr(data, "split_tensors") or hasattr(data, "train_dataloader")


def _probe(net: nn.Module, x: Tensor, name: str) -> None:
    """Run two samples through ``net``: a clear error naming the input shape when the net cannot take them."""
    try:
        net(x[:2])
    except RuntimeError as err:
        raise ValueError(f"{name} cannot run on inputs of shape {tuple(x.shape[1:])}: "
                         f"{str(err).splitlines()[0]}. Evaluate on data shaped like the net's training data.") from err


def _coords(path: Path | NonlinearPath, num_points: int, coords: Any) -> Tensor:
    """``[P, dim]`` float64 coordinates: given ones, or a linspace (curves) / grid (surfaces) on ``[0, 1]``
    (``[0, end_time]`` for a nonlinear path)."""
    if coords is not None:
        c = torch.as_tensor(coords, dtype=torch.float64).cpu()
        c = c.reshape(-1, 1) if c.dim() <= 1 and path.dim == 1 else c
        if c.dim() != 2 or c.shape[1] != path.dim or len(c) == 0:
            raise ValueError(f"coords must be [P, {path.dim}] for a {path.dim}-D path, got shape {tuple(c.shape)}.")
        return c
    if num_points < 1:
        raise ValueError(f"num_points must be >= 1, got {num_points}.")
    if hasattr(path, "grid"):  # a simplex: its lattice with num_points per edge
        return path.grid(max(num_points, 2))
    lin = torch.linspace(0, float(getattr(path, "end_time", 1.0)), num_points, dtype=torch.float64)
    if path.dim == 1:
        return lin[:, None]
    if path.dim == 2:
        return torch.cartesian_prod(lin, lin)
    raise ValueError(f"Only curves (dim 1) and surfaces (dim 2) are supported, got dim {path.dim}.")


def _stats_batches(x: Tensor, batches: int, batch_size: int) -> list[Tensor]:
    """``batches`` batches of ``batch_size`` from a seeded random subset (all of ``x``, in order, if it is smaller)."""
    if batches < 1 or batch_size < 1:
        raise ValueError(f"bn_batches and bn_batch_size must be >= 1, got {batches} and {batch_size}.")
    need = batches * batch_size
    if len(x) > need:
        x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(STATS_SEED))[:need]]
    return list(x.split(batch_size))


def _device_of(module: nn.Module) -> torch.device:
    t = next(iter(module.state_dict().values()), None)
    return t.device if t is not None else torch.device("cpu")


def choose_strategy(net: nn.Module, device: str | torch.device = "cuda") -> str:
    """What ``strategy="auto"`` picks, from measurements on an H100 (README, "Performance").

    On CUDA: ``"loop"`` for nets with BatchNorm2d when Triton is there (the loop runs them BN-fused with large
    batches: 1.6x faster than vmap for ResNet-20 x1, 2.5x for ResNet-20 x4), else ``"vmap"`` for small nets (at most
    :data:`VMAP_MAX_PARAMS` parameters without conv layers, :data:`VMAP_MAX_CONV_PARAMS` with), where launch overhead
    dominates (an MLP of 2.1M parameters: vmap 1.6x the loop). Elsewhere ``"loop"`` (on CPU, batching points gains
    nothing: a 2-core run of the MLP benchmark measured vmap 0.87x of the loop).
    """
    if torch.device(device).type != "cuda":
        return "loop"
    if fused.supported(torch.device(device)) and fused.has_fusable(net):
        return "loop"
    has_conv = any(isinstance(m, _ConvNd) for m in net.modules())
    size = sum(p.numel() for p in net.parameters())
    return "vmap" if size <= (VMAP_MAX_CONV_PARAMS if has_conv else VMAP_MAX_PARAMS) else "loop"


@contextlib.contextmanager
def _cudnn_autotune(device: torch.device):
    """Let cuDNN pick the fastest conv algorithms for the fixed evaluation shapes (restored afterwards)."""
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = previous or device.type == "cuda"
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous


def _materialize(net: nn.Module, sites: Sequence[renorm.Site]) -> dict[str, Tensor]:
    """Give site modules without bias (or affine) zero/one parameters, so fused REPAIR weights can be loaded.

    Returns:
        The added entries with their neutral values, to be restored before each point.
    """
    ref = next(iter(net.parameters()))
    added = {}
    for site in sites:
        mod = net.get_submodule(site.name)
        if site.kind != "layer" and mod.weight is None:
            shape = getattr(mod, "normalized_shape", None) or (
                getattr(mod, "num_features", None) or getattr(mod, "num_channels", None),
            )
            mod.weight = nn.Parameter(ref.new_ones(tuple(shape)), requires_grad=False)
            added[f"{site.name}.weight"] = mod.weight.detach().clone()
        if mod.bias is None:
            mod.bias = nn.Parameter(ref.new_zeros(mod.weight.shape[:1] if site.kind == "layer" else mod.weight.shape),
                                    requires_grad=False)
            added[f"{site.name}.bias"] = mod.bias.detach().clone()
    return added


def _load(state: Mapping[str, Tensor], weights: Mapping[str, Tensor]) -> None:
    """Copy a weight dict into a module's own tensors (skipping tensors that already are them)."""
    for key, value in weights.items():
        dst = state[key]
        if dst.data_ptr() != value.data_ptr():
            dst.copy_(value)


def _top5(logits: Tensor, y: Tensor) -> Tensor:
    """Whether ``y`` is among the 5 largest logits (all classes when there are fewer), per sample."""
    k = min(5, logits.shape[-1])
    return (logits.topk(k, dim=-1).indices == y.unsqueeze(-1)).any(-1)


class _Evaluator:
    """Per-set, per-point loss sums and correct counts over device-resident test batches.

    ``batches`` are ``(set index, x, y)`` triples: every evaluation set's batches, evaluated after one statistics
    pass per point.
    """

    def __init__(self, batches: list[tuple[int, Tensor, Tensor]], num_sets: int, num_points: int,
                 device: torch.device) -> None:
        self.batches = batches
        self.loss = torch.zeros(num_sets, num_points, dtype=torch.float64, device=device)
        self.correct = torch.zeros(num_sets, num_points, dtype=torch.long, device=device)
        self.correct5 = torch.zeros(num_sets, num_points, dtype=torch.long, device=device)

    def add(self, logits: Tensor, y: Tensor, s: int, index: int | slice) -> None:
        """Logits ``[B, K]`` for one point, or ``[C, B, K]`` for the points in a slice, on evaluation set ``s``."""
        if logits.dim() == 2:
            self.loss[s, index] += F.cross_entropy(logits.float(), y, reduction="sum")
            self.correct[s, index] += (logits.argmax(-1) == y).sum()
            self.correct5[s, index] += _top5(logits, y).sum()
            return
        c, b, k = logits.shape
        losses = F.cross_entropy(logits.float().reshape(c * b, k), y.repeat(c), reduction="none")
        self.loss[s, index] += losses.view(c, b).sum(1)
        self.correct[s, index] += (logits.argmax(-1) == y).sum(1)
        self.correct5[s, index] += _top5(logits, y).sum(-1)


class _Points:
    """Weights of a path at given points, computed on the device without host synchronisation.

    Paths are linear combinations of control points (see :mod:`lmc_lightning.weights.paths`): the coefficients of
    all points are computed once on the device and the control points are stacked once; each point (or chunk) is
    then :meth:`~lmc_lightning.weights.paths.Path.from_coefficients`, as in ``path(t)`` / ``path.stacked(coords)``.
    A :class:`~lmc_lightning.weights.paths.NonlinearPath` gives each point through ``weights_at(t)`` instead (moved to
    the device). Along a curve, ``dl[i] = |theta(t_i) - theta(t_{i-1})|`` over ``length_keys`` (the net's parameters)
    is accumulated on the device as the points are produced.
    """

    def __init__(self, path: Path | NonlinearPath, coords: Tensor, device: torch.device,
                 dtype: torch.dtype | None = None, length_keys: Sequence[str] = ()) -> None:
        self.path, self.dtype, self.device = path, dtype, device
        self.nonlinear = isinstance(path, NonlinearPath)
        self.length_keys = list(length_keys) if coords.shape[1] == 1 else []
        self.dl = torch.zeros(len(coords), dtype=torch.float64, device=device)
        self._prev: tuple[int, list[Tensor]] | None = None
        if self.nonlinear:
            self.ts = coords[:, 0].tolist()
            return
        self.ctrl = {k: path.control_points(k) for k in path.float_keys}
        coef = path.coefficients(coords.to(device))
        dtypes = {v.dtype for v in self.ctrl.values()}
        self.coef = coef.to(dtypes.pop()) if len(dtypes) == 1 else coef  # cast once, not per key and point

    def _track(self, i: int, weights: Mapping[str, Tensor]) -> None:
        if not self.length_keys:
            return
        cur = [weights[k] for k in self.length_keys]
        if self._prev is not None and self._prev[0] == i - 1:
            sq = sum(torch.linalg.vector_norm(a - b, dtype=torch.float64).square() for a, b in zip(cur, self._prev[1],
                                                                                                      strict=True))
            self.dl[i] = sq.sqrt()
        self._prev = (i, cur)

    def at(self, i: int) -> dict[str, Tensor]:
        """Weights at point ``i``."""
        if self.nonlinear:
            w = {k: v.to(self.device, non_blocking=True) for k, v in self.path.weights_at(self.ts[i]).items()}
        else:
            w = self.path.from_coefficients(self.coef[i], self.ctrl)
        self._track(i, w)
        return w

    def chunk(self, start: int, stop: int) -> dict[str, Tensor]:
        """Weights at points ``start:stop``, stacked along a leading dim."""
        if self.nonlinear:
            pts = [self.at(i) for i in range(start, stop)]
            out = {k: torch.stack([p[k] for p in pts]) for k in pts[0]}
        else:
            out = self.path.from_coefficients(self.coef[start:stop], self.ctrl)
            for i in range(start, stop):
                self._track(i, {k: out[k][i - start] for k in self.length_keys})
        if self.dtype is not None:  # vmap passes these to the ops directly: match the autocast compute dtype
            out.update({k: v.to(self.dtype) for k, v in out.items() if v.is_floating_point()})
        return out

    def length(self) -> np.ndarray | None:
        """``[P]`` cumulative path length at the points (None for surfaces)."""
        return self.dl.cumsum(0).cpu().numpy() if self.length_keys else None


def _auto_batch_size(model: nn.Module, x: Tensor, device: torch.device) -> int:
    """The evaluation batch size for ``batch_size=None``: 1000 off CUDA; on CUDA, from the peak memory of a probe
    forward of 256 samples (which resets the device's peak-memory counter), as many samples as fit in
    :data:`AUTO_MEMORY_FRACTION` of the free memory (at most :data:`AUTO_BATCH_MAX`)."""
    if device.type != "cuda":
        return 1000
    probe = x[:256]
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    model(probe)
    per_sample = max(torch.cuda.max_memory_allocated(device) - base, 1) / len(probe)
    free, _ = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(min(AUTO_BATCH_MAX, max(len(probe), AUTO_MEMORY_FRACTION * (free + cached) // per_sample)))


@contextlib.contextmanager
def _batch_statistics_bn(net: nn.Module):
    """BatchNorm layers normalise by the statistics of each batch (train mode); flags restored afterwards."""
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.train()
    try:
        yield
    finally:
        for m in bns:
            m.eval()


def _run_loop(work, points, coords, ev, stats, bn, sites, endpoint_stats, defaults, model=None, merge=1,
              options=None, progress=None) -> None:
    """One point after another: weights copied into ``work``; ``model`` (default ``work``) runs the forward passes,
    e.g. the BN-fused trace of ``work`` (:func:`~lmc_lightning.weights.fused.fuse_norms`, which shares its tensors).
    BN reset forwards up to ``merge`` statistics batches at once (:func:`~lmc_lightning.weights.renorm.reset_bn`)."""
    model = work if model is None else model
    state = dict(work.state_dict())
    for i, t in enumerate(coords[:, 0].tolist()):
        _load(state, {**defaults, **points.at(i)})
        if bn == "reset":
            renorm.reset_bn(model, stats, sync=False, merge=merge)
        elif bn == "reset_test":
            with _batch_statistics_bn(model):
                for s, x, y in ev.batches:
                    ev.add(model(x), y, s, i)
            continue
        elif bn is not None:
            repaired = renorm.renormalize(work, None, None, None, t, stats, bn, sites=sites,
                                          endpoint_stats=endpoint_stats, sync=False, **_renorm_kwargs(options))
            _load(state, repaired)
        for s, x, y in ev.batches:
            ev.add(model(x), y, s, i)
        if progress is not None:
            progress(1)


def _renorm_kwargs(options: renorm.RenormOptions | None) -> dict[str, Any]:
    if options is None:
        return {}
    return {"average": options.average, "factor": options.factor, "sequential": options.sequential,
            "statistics": options.statistics}


def _run_vmap(work, points, coords, ev, stats, bn, sites, endpoint_stats, chunk_size, options=None,
              progress=None) -> None:
    batched = vmap(lambda w, x: functional_call(work, w, (x,)), in_dims=(0, None))
    device = ev.loss.device
    for start in range(0, len(coords), chunk_size):
        stop = min(start + chunk_size, len(coords))
        w = points.chunk(start, stop)
        if bn == "reset":
            w = renorm.reset_bn(work, stats, w, stacked=True, sync=False)
        elif bn is not None:
            w = renorm.renormalize(work, None, None, w, coords[start:stop, 0].to(device), stats, bn, stacked=True,
                                   sites=sites, endpoint_stats=endpoint_stats, sync=False,
                                   **_renorm_kwargs(options))
        for s, x, y in ev.batches:
            ev.add(batched(w, x), y, s, slice(start, stop))
        if progress is not None:
            progress(stop - start)


def _aligned_path(path: Path, net: nn.Module, method: str, data: Any, samples: int, device: torch.device) -> Path:
    """The same kind of path with endpoint 1 permuted into endpoint 0's basin."""
    from lmc_lightning.weights.permutation import align_weights

    if not isinstance(path, (Linear, Arc)):
        raise ValueError(f"align= works on Linear and Arc paths, not {type(path).__name__}: align the endpoints "
                         "first (lmc_lightning.align / align_weights) and build the path from them.")
    x = None
    if method != "weight":
        x = seeded_subset(_tensors(data, "train", "train_data"), samples)[0]
    theta_a, theta_b = path.endpoint(0), path.endpoint(1)
    theta_b, _ = align_weights(net, theta_a, theta_b, method=method, data=x, device=device)
    theta_b = {k: theta_b[k] for k in theta_a}
    if isinstance(path, Arc):  # a centred arc is re-centred on the aligned pair
        return Arc(theta_a, theta_b, centered=path.centered)
    return type(path)(theta_a, theta_b)


def evaluate_path(
    path: Path,
    net: nn.Module,
    data: Any,
    *,
    num_points: int = 21,
    coords: Sequence[float] | Sequence[Sequence[float]] | Tensor | None = None,
    bn: BNMode | None = None,
    train_data: Any = None,
    bn_batches: int = 20,
    bn_batch_size: int = 500,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    precision: str = "auto",
    strategy: str = "auto",
    chunk_size: int | None = None,
    align: str | None = None,
    align_samples: int = 5000,
    fuse_norms: bool | None = None,
    renorm_options: renorm.RenormOptions | Mapping[str, Any] | None = None,
    progress: Callable[[int], Any] | None = None,
) -> PathResult:
    """Loss and accuracy of ``net`` with the weights of ``path`` at many points.

    Args:
        path: A :class:`~lmc_lightning.weights.paths.Path` over full state dicts of ``net``. Not modified.
        net: The architecture (a private copy is evaluated; ``net`` is not modified).
        data: Test data in any form :func:`~lmc_lightning.weights.data.materialize` accepts: ``(x, y)`` tensors, a
            DataLoader or any iterable of ``(x, y)`` batches, a Dataset, or a datamodule (its ``"test"`` split; its
            ``"train"`` split serves for statistics when ``train_data`` is None). Read once, moved to the device
            once (a ``MemoryError`` naming the sizes when it does not fit). Or several named evaluation sets,
            ``{"clean": ..., "rand_cue": ...}`` (each in one of those forms; statistics then come from
            ``train_data``): statistics are computed once per point and every set is evaluated with them; the
            result has one entry per set in ``PathResult.sets``, each with its own barriers.
        num_points: Points per axis when ``coords`` is None: ``linspace(0, 1, num_points)`` for curves, the
            ``num_points x num_points`` grid for surfaces.
        coords: Explicit coordinates, ``[P]`` or ``[P, 1]`` (curves), ``[P, 2]`` (surfaces) or ``[P, N - 1]``
            (a :class:`~lmc_lightning.weights.simplex.Simplex` of N endpoints; default: its lattice with
            ``num_points`` points per edge).
        bn: ``None``; ``"auto"`` (``"reset"`` for nets with BatchNorm, else ``None``); ``"reset"`` (recompute BN
            running statistics at each point); ``"reset_test"`` (the seed's
            data-independent RESET: BN layers normalise each evaluation batch by its own statistics, no training
            data; so it depends on ``batch_size``; loop strategy); ``"repair"``, ``"rescale"`` (the seed's, no
            centring), ``"reshift"`` or ``"rescale_centered"`` (mean-preserving) (see
            :mod:`lmc_lightning.weights.renorm`; curves only, endpoints ``path.endpoint(0)`` / ``(1)``).
        train_data: Data for statistics, same forms as ``data`` (``"train"`` split of a datamodule); labels are not
            needed. It may differ from the evaluation data (e.g. MMC resets BN on clean training data and evaluates
            counterfactual sets).
        bn_batches: Number of statistics batches.
        bn_batch_size: Size of a statistics batch; the samples are a seeded random subset of the training data.
        batch_size: Samples per forward pass when evaluating a point. Default: 1000, or on CUDA with the loop
            strategy as many as fit (:func:`_auto_batch_size`, up to :data:`AUTO_BATCH_MAX`). With fused BN, BN
            reset also forwards ``batch_size // bn_batch_size`` statistics batches at once (each normalised by its
            own statistics, so the numbers do not change).
        device: Default: CUDA when available, else CPU.
        precision: ``"auto"`` (bf16 autocast on CUDA, with channels_last for conv nets; fp32 on CPU), ``"32"``
            (fp32 everywhere) or ``"bf16"`` (bf16 autocast on any device).
        strategy: ``"loop"``, ``"vmap"`` or ``"auto"`` (:func:`choose_strategy`).
        chunk_size: Points per vmap call (default: all points at once).
        align: Permute endpoint 1 into endpoint 0's basin before evaluating (``"weight"``, ``"activation"`` or
            ``"ste"``, see :func:`lmc_lightning.weights.permutation.align_weights`); for two-endpoint paths without
            free control points (``Linear``, ``Arc``). Data-driven methods use ``align_samples`` training samples.
        align_samples: Training samples (a seeded subset) for activation and STE matching.
        fuse_norms: Loop strategy with ``bn`` None or ``"reset"``: run each BatchNorm2d with the ReLU and residual
            add after it as one pass (:func:`lmc_lightning.weights.fused.fuse_norms`; Triton kernels on CUDA,
            float64 torch ops elsewhere). Default (None): on for channels_last bf16 runs on CUDA with Triton
            (:func:`lmc_lightning.weights.fused.supported`).
        progress: Called with the number of points just evaluated (e.g. ``tqdm.update``), after each point (loop)
            or chunk (vmap); on CUDA the work may still be queued when it is called.
        renorm_options: Site rule and variants of re-normalisation (:class:`~lmc_lightning.weights.renorm.
            RenormOptions` or a mapping of its fields: ``sites``, ``average``, ``factor``, ``sequential``,
            ``statistics``).

    Returns:
        A :class:`~lmc_lightning.weights.result.PathResult`; ``meta`` records the settings used and the seconds.
        With named sets as ``data``, a multi-set result (:meth:`~lmc_lightning.weights.result.PathResult.from_sets`)
        whose ``loss``/``accuracy`` are the first set's. Points with a non-finite loss are reported with a
        ``RuntimeWarning`` and get no barrier.

    Raises:
        ValueError: Non-finite endpoint weights (naming the endpoint and tensor), or data the net cannot run on
            (naming the input shape).
    """
    if torch.is_inference_mode_enabled():  # e.g. Lightning's test loop: the evaluator updates its copies in place
        arguments = dict(locals())
        with torch.inference_mode(False):
            return evaluate_path(**arguments)
    start_time = time.perf_counter()
    if bn == "auto":  # BN reset where there is BatchNorm, nothing to recompute elsewhere
        bn = "reset" if renorm.batchnorms(net) else None
    if bn is not None and bn not in BN_MODES:
        raise ValueError(f"bn must be None or one of {BN_MODES}, got {bn!r}.")
    options = renorm.RenormOptions.parse(renorm_options)
    if strategy not in ("auto", "loop", "vmap"):
        raise ValueError(f"strategy must be 'auto', 'loop' or 'vmap', got {strategy!r}.")
    if precision not in _PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(_PRECISIONS)}, got {precision!r}.")
    if (batch_size is not None and batch_size < 1) or (chunk_size is not None and chunk_size < 1):
        raise ValueError(f"batch_size and chunk_size must be >= 1, got {batch_size} and {chunk_size}.")
    if bn in renorm.MODES and path.dim != 1:
        raise ValueError(f"bn={bn!r} interpolates the endpoints' statistics along a curve; this path has dim "
                         f"{path.dim}. Use bn='reset' or None for surfaces.")
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    pts = _coords(path, num_points, coords)
    end_time = float(getattr(path, "end_time", 1.0))
    named = isinstance(data, Mapping)
    if named and not data:
        raise ValueError("data is an empty mapping: name at least one evaluation set, e.g. {'test': (x, y)}.")
    if named and train_data is None and (bn is not None or align in ("activation", "ste")):
        raise ValueError(f"With named evaluation sets, statistics (bn={bn!r}, align={align!r}) need train_data: "
                         "pass train_data=(x, y), a Dataset or a datamodule.")
    for i in range(2 if isinstance(path, NonlinearPath) else path.num_fixed):
        check_finite(path.endpoint(i), f"path endpoint {i}")
    if align is not None:
        path = _aligned_path(path, net, align, train_data if train_data is not None else data, align_samples, device)

    sets = ({str(k): _tensors(v, "test", f"data[{k!r}]") for k, v in data.items()} if named
            else {"": _tensors(data, "test", "data")})
    stats_x = None
    if bn is not None and bn != "reset_test":
        if train_data is None and not _is_datamodule(data):
            raise ValueError(f"bn={bn!r} needs training data for statistics: pass train_data=(x, y) (or a "
                             "Dataset / datamodule), or pass a datamodule as data.")
        stats_x = _tensors(train_data if train_data is not None else data, "train", "train_data")[0]

    work = copy.deepcopy(net).to(device).eval()
    for p in work.parameters():
        p.requires_grad_(False)
    check_compatible(dict(work.state_dict()), path.endpoint(0), names=["net", "path"])
    if bn in ("reset", "reset_test") and not renorm.batchnorms(work):
        raise ValueError(f"bn={bn!r} needs BatchNorm layers with running statistics; {type(net).__name__} has none. "
                         "Use bn=None, or 'repair'/'rescale' for nets without BatchNorm.")
    has_conv = any(isinstance(m, _ConvNd) for m in work.modules())
    mode = _PRECISIONS[precision]
    bf16 = mode == "bf16" or (mode == "auto" and device.type == "cuda")
    channels_last = bf16 and has_conv and device.type == "cuda"
    chosen = choose_strategy(work, device) if strategy == "auto" else strategy
    if bn == "reset_test":
        if strategy == "vmap":
            raise ValueError("bn='reset_test' runs BN in train mode, which vmap cannot batch; use strategy='loop'.")
        chosen = "loop"

    def to_device(x: Tensor, what: str = "data") -> Tensor:
        x = _move(x, device, dtype=torch.bfloat16 if bf16 and x.is_floating_point() else None, what=what)
        return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x

    if channels_last:
        work = work.to(memory_format=torch.channels_last)
    on_device = [(to_device(x), _move(y, device, what="data")) for x, y in sets.values()]
    stats = ([to_device(b, "train_data") for b in _stats_batches(stats_x, bn_batches, bn_batch_size)]
             if stats_x is not None else None)
    path_dev = (path if isinstance(path, NonlinearPath) or _device_of(path) == device
                else copy.deepcopy(path).to(device))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    if fuse_norms is None:
        fuse_norms = channels_last and fused.supported(device)
    # REPAIR / RESCALE hook the unfused layers, so only BN reset and plain evaluation run fused
    model = fused.fuse_norms(work) if fuse_norms and chosen == "loop" and bn in (None, "reset") else None

    with torch.no_grad(), autocast, _cudnn_autotune(device):
        _probe(work, on_device[0][0], type(net).__name__)
        if batch_size is None:
            batch_size = (_auto_batch_size(work if model is None else model, on_device[0][0], device)
                          if chosen == "loop" else 1000)
        test_batches = [(s, xb, yb) for s, (x, y) in enumerate(on_device)
                        for xb, yb in zip(x.split(batch_size), y.split(batch_size), strict=True)]
        ev = _Evaluator(test_batches, len(sets), len(pts), device)
        sites, endpoint_stats, defaults = None, None, {}
        if bn in renorm.MODES:
            theta_a, theta_b = path_dev.endpoint(0), path_dev.endpoint(1)
            sites = renorm.find_sites(work, stats[0][:2], theta_a, options.sites)
            if not sites:
                raise ValueError(f"bn={bn!r}: {type(net).__name__} has no site to renormalise under the site rule "
                                 f"{options.sites!r} (try renorm_options={{'sites': 'post_norm'}}).")
            endpoint_stats = tuple(renorm.site_statistics(work, stats, th, sites=sites, sync=False,
                                                          statistics=options.statistics)
                                   for th in (theta_a, theta_b))
            if chosen == "loop":
                defaults = _materialize(work, sites)
        points = _Points(path_dev, pts, device, torch.bfloat16 if bf16 else None,
                         [k for k, _ in net.named_parameters()])
        rel = pts / end_time  # REPAIR / RESCALE interpolate the endpoints' statistics on [0, 1]
        if chosen == "loop":
            merge = max(1, batch_size // bn_batch_size) if model is not None else 1
            _run_loop(work, points, rel, ev, stats, bn, sites, endpoint_stats, defaults, model, merge, options,
                      progress)
        else:
            _run_vmap(work, points, rel, ev, stats, bn, sites, endpoint_stats, chunk_size or len(pts), options,
                      progress)
    n = torch.tensor([len(y) for _, y in sets.values()], dtype=torch.float64)
    loss, acc = (ev.loss.cpu() / n[:, None]).numpy(), (ev.correct.cpu().double() / n[:, None]).numpy()
    top5 = (ev.correct5.cpu().double() / n[:, None]).numpy()
    meta = {
        "bn": bn, **({"renorm_options": dataclasses.asdict(options)} if bn in renorm.MODES else {}),
        "strategy": chosen, "fused_norms": model is not None, "precision": "bf16" if bf16 else "32",
        "channels_last": channels_last, "batch_size": batch_size, "device": str(device),
        "num_test": {k: int(c) for k, c in zip(sets, n.tolist(), strict=True)} if named else int(n[0]),
        "num_stats": sum(len(b) for b in stats) if stats else 0, "seconds": time.perf_counter() - start_time,
        "accuracy_top5": top5[0].tolist(),
    }
    if getattr(path, "kind", None) == "simplex":
        meta["kind"] = "simplex"  # barriers relative to the endpoints' plane
    if named:
        result = PathResult.from_sets(pts.numpy(), {k: (loss[i], acc[i]) for i, k in enumerate(sets)}, meta,
                                      length=points.length(), end_time=end_time)
        for i, part in enumerate(result.sets.values()):
            part.meta["accuracy_top5"] = top5[i].tolist()
            part.warn_nonfinite()
        return result
    result = PathResult(pts.numpy(), loss[0], acc[0], meta, length=points.length(), end_time=end_time)
    result.warn_nonfinite()
    return result
