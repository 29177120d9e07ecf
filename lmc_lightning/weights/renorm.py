"""Statistics along paths: BatchNorm reset and re-normalisation (REPAIR, RESCALE, RESHIFT), as maps from weight
dict to weight dict.

Statistics are taken per batch (count, per-channel mean and variance, from the fused batch-norm kernel, so a bf16
activation is never copied to float32), turned into float64 sums (count, sum, sum of squares, and the sums of the
per-batch means and unbiased variances), all-reduced with ``torch.distributed`` when it is initialised (so each rank
may pass its own share of the data and the result is exact), and only then turned into means and variances.

* :func:`reset_bn` recomputes BatchNorm running statistics: the exact mean and (unbiased) variance of every BN
  layer's input over the given batches, with each BN normalising by its batch statistics on the way (train-mode
  forward, as ``momentum=None`` does), written in place with ``copy_`` (module) or into a new weight dict.
* :func:`renormalize` corrects the per-channel output statistics of every *site* of an interpolated net towards a
  goal, by default ``(1 - t) * stat_a + t * stat_b`` (:func:`interpolate_statistics`; N models with weights
  ``alpha_i``: :func:`renormalize_mix`, built on :func:`mix_statistics` and :func:`renormalize_to`). The modes,
  with ``mu``/``sigma`` the channel's own mean and ``sqrt(var + eps)``:

  - ``"repair"`` (Jordan et al., 2022): ``y' = (y - mu) / sigma * sigma_goal + mu_goal``;
  - ``"rescale"``, as in Qu & Horvath ("Rethink model re-basin and the linear mode connectivity", 2024; their
    ``BatchScale2d``): ``y' = y / sigma * sigma_goal``, **no centring**, so the channel mean scales by
    ``sigma_goal / sigma`` too;
  - ``"reshift"`` (their ``BatchShift2d``): ``y' = y - mu + mu_goal``;
  - ``"rescale_centered"``, the mean-preserving variant (this library's earlier "rescale", not the seed's):
    ``y' = (y - mu) / sigma * sigma_goal + mu``.

  Variants, as in the seed's ``repair()``: ``average`` (a channel-constant goal ``mean|mu_goal| * sign(mu_goal)``,
  ``mean(sigma_goal)``), ``factor`` (multiplies the goal mean and std) and ``sequential`` (each site corrected alone,
  in execution order, its statistics measured with the earlier sites already corrected).

Sites (:func:`find_sites`, ``rule``):

* ``"post_norm"`` (this library's rule, after Jordan et al.): every conv/linear layer except the net's output layer;
  where a normalisation layer (BatchNorm, GroupNorm, LayerNorm, InstanceNorm) directly consumes the layer's output,
  the site is that norm layer's output (the correction is fused into its affine parameters).
* ``"pre_norm"`` (the rethink-re-basin seed's rule): the output of every conv layer, *before* its norm; linear layers
  are never sites, and a net may list conv layers to skip in a ``renorm_skip`` attribute of glob patterns (the
  library's ResNets skip the stem and shortcut convs, as the seed corrects only each block's two convs).
* ``"auto"``: a net's ``renorm_rule`` attribute when it has one (the VGG and ResNet families that the seed uses say
  ``"pre_norm"``), else ``"post_norm"``.

For BN nets, a correction at a pre-BN site is undone by the BN, whose statistics are re-estimated afterwards, so
REPAIR/RESCALE there amount to a BN reset (as in the seed).

Statistics (``statistics``): ``"pooled"`` (the library's): exact pooled mean and variance over the statistics batches,
endpoints in eval mode, ``sigma = sqrt(var + eps)``. ``"seed"`` (the seed's ``TrackLayer``): a train-mode pass (BN
layers normalise by batch statistics), the average of per-batch means and of per-batch unbiased variances, and the
goal ``sigma = sqrt(var)`` without ``eps``.

The correction ``y -> a * y + b`` is fused into the site's weight and bias. A layer built without bias gets a
``<layer>.bias`` entry in the returned dict, which ``torch.func.functional_call`` accepts. Corrections are found in
one pass per point, as in Jordan et al.: during the pass every BN layer normalises with its batch statistics and every
site is corrected with its batch statistics, so later layers see already corrected inputs; the statistics of the pass
give the fused correction. With a single statistics batch the pass is exact.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Literal, TypedDict

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.func import functional_call, vmap
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from lmc_lightning.weights.fused import FusedBatchNorm

if TYPE_CHECKING:
    from typing_extensions import Unpack

WeightDict = dict[str, Tensor]
Stats = dict[str, tuple[Tensor, Tensor]]
Mode = Literal["repair", "rescale", "reshift", "rescale_centered"]
Rule = Literal["auto", "pre_norm", "post_norm"]
Statistics = Literal["pooled", "seed"]
MODES = ("repair", "rescale", "reshift", "rescale_centered")
RULES = ("auto", "pre_norm", "post_norm")
STATISTICS = ("pooled", "seed")

NORM_TYPES = (_BatchNorm, nn.GroupNorm, nn.LayerNorm, _InstanceNorm)
LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
EPS = 1e-5


@dataclass(frozen=True)
class RenormOptions:
    """Settings of a re-normalisation beyond its mode (see the module docstring); passed to
    :func:`~lmc_lightning.weights.evaluate.evaluate_path` as ``renorm_options`` and to the path modules as
    ``--model.renorm_options '{sites: post_norm, average: true}'``.

    Attributes:
        sites: Site rule, ``"auto"``, ``"pre_norm"`` or ``"post_norm"``, or a list of conv/linear module names.
        average: Channel-constant goal.
        factor: Multiplies the goal.
        sequential: Correct one site at a time, in execution order.
        statistics: ``"pooled"`` (the library's) or ``"seed"`` (train-mode pass, averages of per-batch moments).
    """

    sites: str | tuple[str, ...] = "auto"
    average: bool = False
    factor: float = 1.0
    sequential: bool = False
    statistics: str = "pooled"

    def __post_init__(self) -> None:
        if isinstance(self.sites, str):
            resolve_rule(nn.Module(), self.sites)
        else:
            object.__setattr__(self, "sites", tuple(str(s) for s in self.sites))
        _check_statistics(self.statistics)
        if not self.factor > 0:
            raise ValueError(f"factor must be > 0 (it multiplies the goal statistics), got {self.factor!r}.")

    @classmethod
    def parse(cls, options: RenormOptions | Mapping | None) -> RenormOptions:
        """Options from an instance, a mapping of its fields, or None (the defaults)."""
        if options is None:
            return cls()
        if isinstance(options, cls):
            return options
        unknown = sorted(set(options) - {"sites", "average", "factor", "sequential", "statistics"})
        if unknown:
            raise ValueError(f"Unknown re-normalisation option(s) {unknown}; valid: sites, average, factor, "
                             "sequential, statistics.")
        return cls(**dict(options))


@dataclass(frozen=True)
class Site:
    """A place whose per-channel output statistics re-normalisation corrects.

    Attributes:
        name: Module whose output is corrected (and into whose weight/bias the correction is fused).
        layer: The conv/linear layer producing the pre-activation.
        kind: ``"batchnorm"`` (BN with running statistics), ``"norm"`` (other normalisation) or ``"layer"``.
    """

    name: str
    layer: str
    kind: str


def batchnorms(net: nn.Module) -> dict[str, _BatchNorm]:
    """BatchNorm layers that keep running statistics, by module name."""
    return {
        n: m
        for n, m in net.named_modules()
        if isinstance(m, _BatchNorm) and m.track_running_stats and m.running_mean is not None
    }


def _as_batches(batches: Tensor | Iterable) -> list[Tensor]:
    """A list of input tensors from a tensor, a sequence of tensors, or an iterable of ``(x, y)`` batches."""
    if isinstance(batches, Tensor):
        return [batches]
    out = [b[0] if isinstance(b, (tuple, list)) else b for b in batches]
    if not out or not all(isinstance(b, Tensor) for b in out):
        raise ValueError("batches must be a non-empty sequence of input tensors (or of (x, y) pairs).")
    return out


def _first(weights: Mapping[str, Tensor] | None, stacked: bool) -> WeightDict | None:
    if weights is None or not stacked:
        return None if weights is None else dict(weights)
    return {k: v[0] for k, v in weights.items()}


def _forward(net: nn.Module, weights: Mapping[str, Tensor] | None, x: Tensor) -> Tensor:
    return net(x) if weights is None else functional_call(net, dict(weights), (x,))


class _EvalMode:
    """Puts a net in eval mode and restores every module's flag afterwards."""

    def __init__(self, net: nn.Module) -> None:
        self.net = net

    def __enter__(self) -> nn.Module:
        self.flags = [(m, m.training) for m in self.net.modules()]
        self.net.eval()
        return self.net

    def __exit__(self, *exc) -> None:
        for m, flag in self.flags:
            m.training = flag


def resolve_rule(net: nn.Module, rule: str = "auto") -> str:
    """The site rule ``"pre_norm"`` or ``"post_norm"`` for ``rule`` (``"auto"``: the net's ``renorm_rule``)."""
    if rule not in RULES:
        raise ValueError(f"sites must be one of {RULES} (or a list of module names), got {rule!r}.")
    if rule == "auto":
        rule = getattr(net, "renorm_rule", "post_norm")
    return rule


def find_sites(net: nn.Module, example: Tensor, weights: Mapping[str, Tensor] | None = None,
               rule: str | Sequence[str] = "post_norm") -> list[Site]:
    """Trace one forward pass and list the re-normalisation sites in execution order.

    Args:
        net: The network.
        example: A small input batch (two samples are enough).
        weights: Optional weight dict for ``functional_call``.
        rule: ``"post_norm"``, ``"pre_norm"``, ``"auto"`` (see the module docstring) or a list of conv/linear
            module names whose outputs are the sites.

    Returns:
        One :class:`Site` per corrected layer output, in execution order.

    Raises:
        ValueError: A named module is not a conv/linear layer run by the net.
    """
    outputs: list[tuple[str, Tensor]] = []
    norm_inputs: list[tuple[str, Tensor]] = []
    handles = []
    for name, m in net.named_modules():
        if isinstance(m, LAYER_TYPES):
            handles.append(m.register_forward_hook(lambda mod, a, out, name=name: outputs.append((name, out))))
        elif isinstance(m, NORM_TYPES):
            handles.append(m.register_forward_pre_hook(lambda mod, a, name=name: norm_inputs.append((name, a[0]))))
    try:
        with torch.no_grad(), _EvalMode(net):
            _forward(net, weights, example)
    finally:
        for h in handles:
            h.remove()
    order = list(dict.fromkeys(name for name, _ in outputs))
    if not isinstance(rule, str):
        unknown = [n for n in rule if n not in order]
        if unknown:
            raise ValueError(f"Sites {unknown} are not conv/linear layers run by {type(net).__name__}; pick from "
                             f"{order}.")
        return [Site(n, n, "layer") for n in order if n in set(rule)]
    rule = resolve_rule(net, rule)
    if not outputs:
        return []
    if rule == "pre_norm":
        skip = tuple(getattr(net, "renorm_skip", ()))
        convs = [n for n in order if isinstance(net.get_submodule(n), LAYER_TYPES[:3])]
        return [Site(n, n, "layer") for n in convs if not any(fnmatch.fnmatchcase(n, pat) for pat in skip)]
    bns = batchnorms(net)
    last = outputs[-1][0]
    sites, seen = [], set()
    for name, out in outputs:
        if name == last or name in seen:
            continue
        seen.add(name)
        norm = next((n for n, inp in norm_inputs if inp is out), None)
        if norm is None:
            sites.append(Site(name, name, "layer"))
        else:
            sites.append(Site(norm, name, "batchnorm" if norm in bns else "norm"))
    return sites


Moments = dict[str, list[tuple[int, Tensor, Tensor, float | None]]]
"""Per record key, one ``(count, mean, second, eps)`` per batch: ``second`` is the biased variance when ``eps`` is
None, else ``invstd = 1 / sqrt(var + eps)`` (as the fused batch-norm kernel returns it)."""


class _Pass:
    """Collects per-batch, per-channel moments of BN inputs and site outputs; optionally corrects site outputs.

    Inside the context the net is in eval mode, except that the listed BN layers normalise by batch statistics without
    touching their buffers (their forward becomes ``torch.native_batch_norm`` in training mode, whose batch mean and
    inverse std are recorded at no extra cost). Site outputs are measured, and corrected, with the same fused kernel,
    so no float32 copy of a bf16 activation is ever made.

    :meth:`run` may forward several equal statistics batches as one (``merge``): every BN layer then normalises each
    batch by that batch's own statistics (one pass for a :class:`~lmc_lightning.weights.fused.FusedBatchNorm`, a
    loop over the batches otherwise), so the moments are those of the batches forwarded one by one.
    """

    def __init__(
        self,
        net: nn.Module,
        bn_inputs: Iterable[str] = (),
        sites: Iterable[Site] = (),
        mode: Mode | None = None,
        eps: float = EPS,
    ) -> None:
        self.net, self.bn_names, self.sites, self.mode, self.eps = net, list(bn_inputs), list(sites), mode, eps
        self.records: dict[str, tuple[Tensor, Tensor]] = {}
        self.counts: dict[str, int] = {}
        self.eps_of: dict[str, float | None] = {}
        self.goal: Stats = {}
        self.groups = 1  # statistics batches in the current forward

    def __enter__(self) -> _Pass:
        self._eval = _EvalMode(self.net)
        self._eval.__enter__()
        self._handles, self._patched, self._fused = [], [], []
        for name in self.bn_names:
            m = self.net.get_submodule(name)
            if isinstance(m, FusedBatchNorm):  # normalises by batch statistics and reports them while hooked
                m.stats_hook = partial(self._record, f"in:{name}", eps=None)
                self._fused.append(m)
            else:
                m.forward = partial(self._bn_forward, name, m)  # instance attribute, removed on exit
            self._patched.append(m)
        for site in self.sites:
            m = self.net.get_submodule(site.name)
            self._handles.append(m.register_forward_hook(partial(self._site_hook, site.name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        for m in self._patched:
            m.__dict__.pop("forward", None)
            if isinstance(m, FusedBatchNorm):
                m.stats_hook, m.stats_groups = None, 1
        self._eval.__exit__(*exc)

    def _record(self, key: str, y: Tensor, mean: Tensor, second: Tensor, eps: float | None) -> None:
        # no arithmetic here: a few hundred tiny kernels per point add up on a GPU; _reduce converts all at once
        self.counts[key] = y.numel() // y.shape[1] // self.groups
        self.eps_of[key] = eps
        self.records[key] = (mean, second)

    def _bn_forward(self, name: str, m: _BatchNorm, x: Tensor) -> Tensor:
        if self.groups == 1:
            out, mean, invstd = torch.native_batch_norm(x, m.weight, m.bias, None, None, True, 0.0, m.eps)
        else:
            parts = [torch.native_batch_norm(xg, m.weight, m.bias, None, None, True, 0.0, m.eps)
                     for xg in x.chunk(self.groups)]
            outs, means, invstds = zip(*parts, strict=True)
            out, mean, invstd = torch.cat(outs), torch.stack(means), torch.stack(invstds)
        self._record(f"in:{name}", x, mean, invstd, m.eps)
        return out.to(x.dtype)

    def _site_hook(self, name: str, module: nn.Module, args: tuple, out: Tensor) -> Tensor | None:
        if out.dim() < 2:
            raise ValueError(f"Cannot take per-channel statistics of the {out.dim()}-D output of '{name}'.")
        if self.mode is None:
            _, mean, invstd = torch.native_batch_norm(out, None, None, None, None, True, 0.0, self.eps)
            self._record(f"out:{name}", out, mean, invstd, self.eps)
            return None
        goal_mean, goal_std = self.goal[name]
        if self.mode == "reshift":
            _, mean, invstd = torch.native_batch_norm(out, None, None, None, None, True, 0.0, self.eps)
            self._record(f"out:{name}", out, mean, invstd, self.eps)
            return (out + _channel_view(goal_mean - mean, out)).to(out.dtype)
        bias = goal_mean if self.mode == "repair" else None
        fixed, mean, invstd = torch.native_batch_norm(out, goal_std, bias, None, None, True, 0.0, self.eps)
        self._record(f"out:{name}", out, mean, invstd, self.eps)
        if self.mode == "rescale":  # y / sigma * sigma_goal: the normalised part plus the scaled mean
            fixed = fixed + _channel_view(mean * invstd * goal_std, out).to(fixed.dtype)
        elif self.mode == "rescale_centered":
            fixed = fixed + _channel_view(mean, out).to(fixed.dtype)
        return fixed.to(out.dtype)

    def run(
        self,
        batches: Sequence[Tensor],
        weights: Mapping[str, Tensor] | None = None,
        stacked: bool = False,
        goal: Stats | None = None,
        merge: int = 1,
    ) -> Moments:
        """Forward every batch (up to ``merge`` consecutive equal-shaped ones at once); returns the per-batch moments
        of every record key."""
        if stacked and weights is None:
            raise ValueError("stacked=True needs a stacked weight dict.")
        if merge > 1 and (stacked or self.sites):
            raise ValueError("merge > 1 works for BN statistics of one point (no stacked weights, no sites).")
        goal = goal or {}
        if any(isinstance(m, _BatchNorm) and not m.track_running_stats for m in self.net.modules()):
            merge = 1  # such a layer would take statistics over the merged batches

        def call(w, g, x):
            self.goal, self.records = g, {}
            _forward(self.net, w, x)
            out, self.records, self.goal = self.records, {}, {}
            return out

        fn = vmap(call, in_dims=(0, 0 if goal else None, None)) if stacked else call
        moments: Moments = {}
        for group in _merged(batches, merge):
            self.groups = len(group)
            for m in self._fused:
                m.stats_groups = self.groups
            x = group[0] if len(group) == 1 else torch.cat(group)
            for key, (mean, second) in fn(weights, goal, x).items():
                pairs = zip(mean.unbind(), second.unbind(), strict=True) if self.groups > 1 else [(mean, second)]
                moments.setdefault(key, []).extend((self.counts[key], m, sec, self.eps_of[key]) for m, sec in pairs)
        self.groups = 1
        return moments


def _channel_view(v: Tensor, like: Tensor) -> Tensor:
    """A per-channel vector shaped to broadcast over ``[B, C, *spatial]``."""
    return v.view(1, -1, *[1] * (like.dim() - 2))


def _merged(batches: Sequence[Tensor], merge: int) -> list[list[Tensor]]:
    """Consecutive runs of at most ``merge`` batches of one shape (each run is forwarded as one tensor)."""
    runs: list[list[Tensor]] = []
    for x in batches:
        if runs and len(runs[-1]) < merge and runs[-1][0].shape == x.shape:
            runs[-1].append(x)
        else:
            runs.append([x])
    return runs


def _should_sync(sync: bool | None) -> bool:
    if sync is None:
        return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    return sync


def _reduce(moments: Moments, sync: bool | None) -> dict[str, tuple[Tensor, ...]]:
    """``{key: (count, sum, sum of squares, sum of per-batch means, sum of per-batch unbiased variances, number of
    batches)}`` in float64, summed over batches and (when syncing) over ranks."""
    keys = sorted(moments)
    if not keys:
        return {}
    parts = []
    for k in keys:
        # batches grouped by sample count, weighted with Python numbers: no host-to-device copy, no sync
        total = batches = 0
        acc = None
        for count, eps in dict.fromkeys((c, e) for c, _, _, e in moments[k]):
            group = [(m, sec) for c, m, sec, e in moments[k] if (c, e) == (count, eps)]
            mean = torch.stack([m for m, _ in group]).double()
            second = torch.stack([sec for _, sec in group]).double()
            var = second if eps is None else (second.pow(-2) - eps).clamp_min(0)
            new = (count * mean.sum(0), count * (var + mean * mean).sum(0), mean.sum(0),
                   var.sum(0) * (count / max(count - 1, 1)))
            acc = new if acc is None else tuple(a + b for a, b in zip(acc, new, strict=True))
            total += count * len(group)
            batches += len(group)
        s1 = acc[0]
        parts.append((s1.new_full((), float(total)), *acc, s1.new_full((), float(batches))))
    if _should_sync(sync):
        flat = torch.cat([t.reshape(-1) for p in parts for t in p])
        dist.all_reduce(flat)
        out, i = [], 0
        for p in parts:
            new = []
            for t in p:
                new.append(flat[i : i + t.numel()].view_as(t))
                i += t.numel()
            out.append(tuple(new))
        parts = out
    return dict(zip(keys, parts, strict=True))


def _moments(n: Tensor, s: Tensor, ss: Tensor, *_: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Mean, biased and unbiased variance from count, sum and sum of squares (float64)."""
    mean = s / n
    var = (ss / n - mean * mean).clamp_min(0)
    return mean, var, var * (n / (n - 1).clamp_min(1))


def _site_moments(totals: tuple[Tensor, ...], statistics: str) -> tuple[Tensor, Tensor]:
    """A site's channel mean and variance: pooled (biased), or the seed's averages of per-batch means and unbiased
    variances."""
    if statistics == "seed":
        nb = totals[5]
        return totals[3] / nb, totals[4] / nb
    mean, var, _ = _moments(*totals)
    return mean, var


def _bn_statistics(net: nn.Module, totals: dict) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
    return {name: _moments(*totals[f"in:{name}"]) for name in batchnorms(net) if f"in:{name}" in totals}


def _write_bn(net: nn.Module, weights: Mapping[str, Tensor] | None, stats: dict) -> WeightDict:
    """Running statistics into the module's buffers (``copy_``, when ``weights`` is None) or into a new dict."""
    if weights is None:
        for name, (mean, _, var) in stats.items():
            bn = net.get_submodule(name)
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
        return dict(net.state_dict())
    out = dict(weights)
    for name, (mean, _, var) in stats.items():
        for key, value in ((f"{name}.running_mean", mean), (f"{name}.running_var", var)):
            ref = weights.get(key)
            out[key] = value.to(ref.dtype if ref is not None else torch.float32)
    return out


def reset_bn(
    net: nn.Module,
    batches: Tensor | Iterable,
    weights: Mapping[str, Tensor] | None = None,
    *,
    stacked: bool = False,
    sync: bool | None = None,
    merge: int = 1,
) -> WeightDict:
    """Recompute the running mean and variance of every BatchNorm layer on ``batches``.

    The statistics are the exact mean and unbiased variance of each BN layer's input over all batches (what a
    train-mode pass with ``momentum=None`` gives for a single batch), summed across ranks under DDP.

    Args:
        net: The network; its BN buffers are overwritten in place when ``weights`` is None.
        batches: Input tensors (or ``(x, y)`` pairs) on the net's device; under DDP each rank's share.
        weights: Optional weight dict used through ``functional_call``; it is not modified.
        stacked: ``weights`` hold ``P`` points along a leading dim (evaluated with ``torch.func.vmap``).
        sync: All-reduce the sums across ranks; default: when ``torch.distributed`` is initialised.
        merge: Forward up to this many consecutive batches of one shape as one tensor; each BN layer still
            normalises every batch by its own statistics, so the result is the same (fewer, larger kernels: pays
            with BN layers fused by :func:`lmc_lightning.weights.fused.fuse_norms`). Not with ``stacked``.

    Returns:
        The weight dict with the new statistics (the module's ``state_dict()`` when ``weights`` is None).

    Raises:
        ValueError: If the net has no BatchNorm layer with running statistics.
    """
    bns = batchnorms(net)
    if not bns:
        raise ValueError(
            f"{type(net).__name__} has no BatchNorm layer with running statistics, so there is nothing to reset. "
            "Use bn=None, or 'repair'/'rescale' to renormalise a net without BatchNorm."
        )
    with torch.no_grad(), _Pass(net, bn_inputs=bns) as p:
        moments = p.run(_as_batches(batches), weights, stacked, merge=merge)
    return _write_bn(net, weights, _bn_statistics(net, _reduce(moments, sync)))


def _check_statistics(statistics: str) -> None:
    if statistics not in STATISTICS:
        raise ValueError(f"statistics must be one of {STATISTICS}, got {statistics!r}.")


def site_statistics(
    net: nn.Module,
    batches: Tensor | Iterable,
    weights: Mapping[str, Tensor] | None = None,
    *,
    sites: Sequence[Site] | None = None,
    rule: str | Sequence[str] = "auto",
    stacked: bool = False,
    eps: float = EPS,
    sync: bool | None = None,
    statistics: Statistics = "pooled",
) -> Stats:
    """Per-channel mean and standard deviation of every site's output.

    Args:
        net: The network.
        batches: Input tensors (or ``(x, y)`` pairs).
        weights: Optional weight dict (``[P, ...]`` when stacked).
        sites: Sites from :func:`find_sites` (traced with ``rule`` when None).
        rule: Site rule when ``sites`` is None.
        stacked: ``weights`` hold several points.
        eps: ``"pooled"``: the std is ``sqrt(var + eps)``.
        sync: All-reduce across ranks; default: when ``torch.distributed`` is initialised.
        statistics: ``"pooled"``: exact mean and biased variance, net in eval mode; ``"seed"``: train-mode pass (BN
            layers use batch statistics), average of per-batch means and of per-batch unbiased variances, std
            ``sqrt(var)`` (the seed's ``TrackLayer`` with ``momentum=None``).

    Returns:
        ``{site name: (mean [C], std [C])}`` (``[P, C]`` when stacked), float64.
    """
    _check_statistics(statistics)
    batches = _as_batches(batches)
    if sites is None:
        sites = find_sites(net, batches[0][:2], _first(weights, stacked), rule)
    bns = batchnorms(net) if statistics == "seed" else ()
    with torch.no_grad(), _Pass(net, bn_inputs=bns, sites=sites, eps=eps) as p:
        moments = p.run(batches, weights, stacked)
    totals = _reduce(moments, sync)
    out = {}
    for site in sites:
        mean, var = _site_moments(totals[f"out:{site.name}"], statistics)
        out[site.name] = (mean, torch.sqrt(var + (eps if statistics == "pooled" else 0.0)))
    return out


def _affine(w: Mapping[str, Tensor], net: nn.Module, site: Site, lead: tuple[int, ...], c: int, like: Tensor):
    """The (weight, bias) a correction is fused into, created as ones/zeros where the module has none."""
    mod = net.get_submodule(site.name)
    wkey, bkey = f"{site.name}.weight", f"{site.name}.bias"
    if site.kind == "layer":
        weight = w[wkey]
        bias = w.get(bkey)
        if bias is None:
            bias = weight.new_zeros((*lead, c))
        return weight, bias
    if wkey in w:
        shape = tuple(w[wkey].shape[len(lead) :])
    else:
        shape = tuple(getattr(mod, "normalized_shape", (c,)))
    if shape[0] != c:
        raise ValueError(
            f"Cannot fold a per-channel correction into '{site.name}': its affine shape {shape} does not start "
            f"with the {c} channels of its input."
        )
    weight = w[wkey] if wkey in w else like.new_ones((*lead, *shape), dtype=torch.float32)
    bias = w[bkey] if bkey in w else like.new_zeros((*lead, *shape), dtype=torch.float32)
    return weight, bias


def _fuse(w: WeightDict, net: nn.Module, site: Site, scale: Tensor, shift: Tensor, stacked: bool) -> None:
    """Fold ``y -> scale * y + shift`` (per channel) into the site's weight and bias, in the dict ``w``."""
    lead = tuple(scale.shape[:1]) if stacked else ()
    c = scale.shape[-1]
    weight, bias = _affine(w, net, site, lead, c, scale)

    def view(x: Tensor, ndim: int) -> Tensor:
        return x.reshape(*lead, c, *[1] * (ndim - len(lead) - 1))

    w[f"{site.name}.weight"] = (weight.double() * view(scale, weight.dim())).to(weight.dtype)
    w[f"{site.name}.bias"] = (bias.double() * view(scale, bias.dim()) + view(shift, bias.dim())).to(bias.dtype)


def interpolate_statistics(stats_a: Stats, stats_b: Stats, t: Tensor | float) -> Stats:
    """The goal ``(1 - t) * stat_a + t * stat_b`` of every site (``t`` a float, or ``[P, 1]`` for stacked goals)."""
    return mix_statistics([stats_a, stats_b], [1 - t, t])


def mix_statistics(stats: Sequence[Stats], alpha: Sequence[float | Tensor] | None = None) -> Stats:
    """The goal ``sum_i alpha_i * stat_i`` of every site, for N models (the seed's ``repair(alpha_s=...)``).

    Args:
        stats: One :func:`site_statistics` result per model.
        alpha: One weight per model (floats, or tensors broadcasting against ``[C]``); default uniform ``1 / N``.
    """
    if not stats:
        raise ValueError("mix_statistics needs the statistics of at least one model.")
    alpha = [1.0 / len(stats)] * len(stats) if alpha is None else list(alpha)
    if len(alpha) != len(stats):
        raise ValueError(f"Got {len(alpha)} weights alpha for {len(stats)} models; give one per model.")
    names = list(stats[0])
    for i, st in enumerate(stats[1:], 1):
        if set(st) != set(names):
            raise ValueError(f"Model {i}'s statistics cover other sites than model 0's: "
                             f"{sorted(set(st) ^ set(names))}.")
    return {
        name: (sum(a * st[name][0] for a, st in zip(alpha, stats, strict=True)),
               sum(a * st[name][1] for a, st in zip(alpha, stats, strict=True)))
        for name in names
    }


def adjust_goal(goal: Stats, average: bool = False, factor: float = 1.0) -> Stats:
    """The seed's goal variants: ``average`` makes every site's goal channel-constant, ``mean|mu| * sign(mu)`` and
    ``mean(sigma)``; then both are multiplied by ``factor``."""
    out = {}
    for name, (mu, sigma) in goal.items():
        if average:
            mu = mu.abs().mean(-1, keepdim=True) * mu.sign()
            sigma = sigma.mean(-1, keepdim=True).expand_as(sigma)
        out[name] = (mu * factor, sigma * factor)
    return out


def _correction(mode: str, mu: Tensor, var: Tensor, goal: tuple[Tensor, Tensor], eps: float
                ) -> tuple[Tensor, Tensor]:
    """``(scale, shift)`` of ``y -> scale * y + shift`` taking a channel (mean ``mu``, variance ``var``) to the goal."""
    goal_mean, goal_std = goal
    if mode == "reshift":
        return torch.ones_like(mu), goal_mean - mu
    scale = goal_std / torch.sqrt(var + eps)
    if mode == "repair":
        return scale, goal_mean - scale * mu
    if mode == "rescale":
        return scale, torch.zeros_like(mu)
    return scale, (1 - scale) * mu  # rescale_centered


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")


def renormalize_to(
    net: nn.Module,
    theta: Mapping[str, Tensor] | None,
    goal: Stats,
    batches: Tensor | Iterable,
    mode: Mode = "repair",
    *,
    sites: Sequence[Site] | None = None,
    rule: str | Sequence[str] = "auto",
    stacked: bool = False,
    average: bool = False,
    factor: float = 1.0,
    sequential: bool = False,
    statistics: Statistics = "pooled",
    eps: float = EPS,
    sync: bool | None = None,
) -> WeightDict:
    """Correct every site of ``theta`` towards ``goal`` (see the module docstring) and re-estimate BN statistics.

    This is the core of :func:`renormalize`; use it directly for N-model goals (:func:`mix_statistics`) or any other
    goal, e.g. a pruned net towards its dense model's own statistics.

    Args:
        net: The network (structure; its own weights are used when ``theta`` is None). Not modified.
        theta: Weights to correct; with ``stacked``, ``P`` points along a leading dim.
        goal: ``{site: (mean, std)}``, ``[C]`` (or ``[P, C]`` when stacked), for every site.
        batches: Input tensors (or ``(x, y)`` pairs) of training data on the net's device.
        mode: ``"repair"``, ``"rescale"``, ``"reshift"`` or ``"rescale_centered"``.
        sites: Sites from :func:`find_sites` (traced with ``rule`` when None).
        rule: Site rule when ``sites`` is None: ``"auto"``, ``"pre_norm"``, ``"post_norm"`` or module names.
        stacked: Whether ``theta`` holds several points (evaluated with ``torch.func.vmap``).
        average: Channel-constant goal (:func:`adjust_goal`).
        factor: Multiplies the goal.
        sequential: Correct one site at a time in execution order, each measured with the earlier ones already
            fused (one pass per site); otherwise all sites in one pass.
        statistics: How the corrected net's own channel statistics are estimated (``"pooled"`` or ``"seed"``).
        eps: Added to variances in the correction.
        sync: All-reduce statistics across ranks; default: when ``torch.distributed`` is initialised.

    Returns:
        A new weight dict (stacked if ``stacked``) with corrected weights and re-estimated BN statistics.
    """
    _check_mode(mode)
    _check_statistics(statistics)
    batches = _as_batches(batches)
    if sites is None:
        sites = find_sites(net, batches[0][:2], _first(theta, stacked), rule)
    if not sites:
        raise ValueError(f"{type(net).__name__} has no site to renormalise (no hidden conv/linear layer under "
                         f"this site rule); try sites='post_norm'.")
    missing = [s.name for s in sites if s.name not in goal]
    if missing:
        raise ValueError(f"The goal has no statistics for sites {missing}; compute them with the same sites.")
    goal = adjust_goal({s.name: goal[s.name] for s in sites}, average, factor)
    out = dict(theta) if theta is not None else {k: v.clone() for k, v in net.state_dict().items()}
    groups = [[site] for site in sites] if sequential else [list(sites)]
    bns = batchnorms(net)
    with torch.no_grad():
        for group in groups:
            goal32 = {s.name: (goal[s.name][0].float(), goal[s.name][1].float()) for s in group}
            with _Pass(net, bn_inputs=bns, sites=group, mode=mode, eps=eps) as p:
                moments = p.run(batches, out, stacked, goal32)
            totals = _reduce(moments, sync)
            bn_stats = _bn_statistics(net, totals)
            out = _write_bn(net, out, bn_stats)
            for site in group:
                if site.kind == "batchnorm":
                    # Eval-mode output statistics of the BN with its new running statistics, from its input moments.
                    _, var_b, var_u = bn_stats[site.name]
                    lead = tuple(var_b.shape[:1]) if stacked else ()
                    gamma, beta = _affine(out, net, site, lead, var_b.shape[-1], var_b)
                    mu, var = beta.double(), gamma.double() ** 2 * var_b / (var_u + net.get_submodule(site.name).eps)
                else:
                    mu, var = _site_moments(totals[f"out:{site.name}"], statistics)
                scale, shift = _correction(mode, mu, var, goal[site.name], eps)
                _fuse(out, net, site, scale, shift, stacked)
        if sequential and bns:  # BN statistics of the fully corrected net
            with _Pass(net, bn_inputs=bns) as p:
                moments = p.run(batches, out, stacked)
            out = _write_bn(net, out, _bn_statistics(net, _reduce(moments, sync)))
    return out


class RenormKwargs(TypedDict, total=False):
    """The keyword options that :func:`renormalize` and :func:`renormalize_mix` pass on to :func:`renormalize_to`
    (see its Args): ``sites``, ``rule``, ``stacked``, ``average``, ``factor``, ``sequential``, ``statistics``,
    ``eps``, ``sync``."""

    sites: Sequence[Site] | None
    rule: str | Sequence[str]
    stacked: bool
    average: bool
    factor: float
    sequential: bool
    statistics: Statistics
    eps: float
    sync: bool | None


def renormalize_mix(
    net: nn.Module,
    thetas: Sequence[Mapping[str, Tensor] | None],
    theta: Mapping[str, Tensor] | None,
    alpha: Sequence[float | Tensor] | None,
    batches: Tensor | Iterable,
    mode: Mode = "repair",
    *,
    endpoint_stats: Sequence[Stats] | None = None,
    **options: Unpack[RenormKwargs],
) -> WeightDict:
    """Re-normalise ``theta`` towards ``sum_i alpha_i * stat_i``, the weighted site statistics of N endpoints (the
    seed's ``repair(alpha_s=...)``; :func:`renormalize` is the case N = 2, ``alpha = (1 - t, t)``).

    Args:
        net: The network (structure; its own weights are used when ``theta`` is None). Not modified.
        thetas: The endpoints' weights (entries may be None when ``endpoint_stats`` is given).
        theta: Weights to correct, e.g. their average; with ``stacked``, ``P`` points along a leading dim.
        alpha: One weight per endpoint (floats, or ``[P, 1]`` tensors for stacked goals); None: uniform.
        batches: Input tensors (or ``(x, y)`` pairs) of training data on the net's device.
        mode: ``"repair"``, ``"rescale"`` (the seed's, no centring), ``"reshift"`` or ``"rescale_centered"``.
        endpoint_stats: :func:`site_statistics` of each endpoint, to reuse across calls.
        **options: :class:`RenormKwargs`, as in :func:`renormalize_to`; ``statistics`` and ``eps`` also apply to the
            endpoints' statistics, and the sites are traced with ``rule`` on ``theta`` when ``sites`` is None.

    Returns:
        A new weight dict (stacked if ``stacked``) with corrected weights and re-estimated BN statistics.
    """
    _check_mode(mode)
    batches = _as_batches(batches)
    sites = options.pop("sites", None)
    rule = options.pop("rule", "auto")
    if sites is None:
        sites = find_sites(net, batches[0][:2], _first(theta, options.get("stacked", False)), rule)
    if not sites:
        raise ValueError(f"{type(net).__name__} has no hidden conv/linear layer to renormalise.")
    if endpoint_stats is None:
        missing = [i for i, th in enumerate(thetas) if th is None]
        if missing:
            raise ValueError(f"The weights of endpoint(s) {missing} are None (theta_a / theta_b for renormalize); "
                             "give them, or their endpoint_stats.")
        endpoint_stats = [site_statistics(net, batches, th, sites=sites, eps=options.get("eps", EPS),
                                          sync=options.get("sync"), statistics=options.get("statistics", "pooled"))
                          for th in thetas]
    ref = next(iter(endpoint_stats[0].values()))[0]
    alpha = None if alpha is None else [a.to(ref.device) if isinstance(a, Tensor) else a for a in alpha]
    goal = mix_statistics([{s.name: st[s.name] for s in sites if s.name in st} for st in endpoint_stats], alpha)
    return renormalize_to(net, theta, goal, batches, mode, sites=sites, **options)


def renormalize(
    net: nn.Module,
    theta_a: Mapping[str, Tensor] | None,
    theta_b: Mapping[str, Tensor] | None,
    theta_t: Mapping[str, Tensor] | None,
    t: float | Tensor,
    batches: Tensor | Iterable,
    mode: Mode = "repair",
    *,
    endpoint_stats: tuple[Stats, Stats] | None = None,
    **options: Unpack[RenormKwargs],
) -> WeightDict:
    """Re-normalise the interpolated weights ``theta_t`` towards ``(1 - t) * stat_a + t * stat_b``.

    See the module docstring for the modes, site rules and variants; BatchNorm running statistics are recomputed on
    the way (as in :func:`reset_bn`). The two-endpoint case of :func:`renormalize_mix`.

    Args:
        net: The network (structure; its own weights are used when ``theta_t`` is None). Not modified.
        theta_a: Weights at ``t = 0`` (may be None when ``endpoint_stats`` is given).
        theta_b: Weights at ``t = 1`` (likewise).
        theta_t: Weights at ``t``; with ``stacked``, ``P`` points along a leading dim.
        t: Interpolation coefficient(s) of the endpoints' statistics: a float, or ``[P]`` when stacked.
        batches: Input tensors (or ``(x, y)`` pairs) of training data on the net's device.
        mode: ``"repair"``, ``"rescale"`` (the seed's, no centring), ``"reshift"`` or ``"rescale_centered"``.
        endpoint_stats: ``(site_statistics(theta_a), site_statistics(theta_b))``, to reuse across points.
        **options: :class:`RenormKwargs` (``sites``, ``rule``, ``stacked``, ``average``, ``factor``, ``sequential``,
            ``statistics``, ``eps``, ``sync``), as in :func:`renormalize_to`.

    Returns:
        A new weight dict (stacked if ``stacked``) with corrected weights and BN statistics.
    """
    tt = torch.as_tensor(t, dtype=torch.float64).reshape(-1, 1) if options.get("stacked", False) else float(t)
    return renormalize_mix(net, (theta_a, theta_b), theta_t, (1 - tt, tt), batches, mode,
                           endpoint_stats=endpoint_stats, **options)
