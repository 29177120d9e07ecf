"""Distribution-based connectors of Anokhin & Yarotsky (ICML 2020, "Low-loss connection of weight vectors").

A layer is a set of **neuron samples**, one row per output unit. Two nets are connected by moving one sample set into
the other, with ``lin`` (``(1 - t) S1 + t S2``) or the centred ``arc`` (``mu + cos(pi t/2)(S1 - mu) +
sin(pi t/2)(S2 - mu)``, ``mu`` the per-coordinate mean over all ``2n`` samples; ``(b1 + b2) / 2`` for 1-D tensors),
see :func:`connect`. Two operations help: **OT** (:func:`match_samples`: the optimal assignment between the samples on
the squared Euclidean cost, the Hungarian solution of the uniform-marginal transport problem) permutes net 2's units
onto net 1's, and **WA** (:func:`weight_adjust`: ``W1 F1^T pinv(F2^T)``, a float64 least-squares solve on the device)
re-expresses the next layer so that it keeps net 1's function on the current features.

Point finders (:func:`connector_path`, the seed's name in brackets; ``L`` weight layers):

============================  ===============  ==================================================================
finder                         ``end_time``     point at ``t``
============================  ===============  ==================================================================
``with_bias``                  1                one hidden layer: samples ``[W0 row, b0, W1 column]`` connected,
                                                output bias on its own [PointFinderWithBias / Transportation]
``with_bias_wa``               2                one hidden layer: ``t <= 1`` layer 0 connected, output layer
                                                re-fitted by WA; ``t > 1`` output layer to net 2's
                                                [PointFinderInverseWithBias / ...OT]
``simultaneous``               1                every tensor on its own, rows as samples [PointFinderSimultaneous]
``stepwise_butterfly``         ``L - 1``        step ``l``: layer ``l`` to net 2's, layer ``l + 1`` re-expressed
                                                (fixed WA weights) [PointFinderStepWiseButterfly / Transportation]
``stepwise_wa``                ``L``            step ``l``: layer ``l`` to net 2's, layer ``l + 1`` re-fitted by WA at
                                                every ``t``; last step moves the output layer
                                                [PointFinderStepWiseInverse / InverseOT]
============================  ===============  ==================================================================

Conv nets (VGG-style, conv bias, no normalisation) use the same finders (the seed's ``...ConvWBias`` variants): a conv
weight ``[out, in, k, k]`` is ``out`` samples of length ``in k k``, the next layer's samples are its input-channel
slices, and WA features are ``k x k`` patches of the layer's input (:func:`layer_features`). Every finder takes
``match="ot"`` (OT before connecting, per step for the step-wise ones).

Where ours differs from the seed by design:

- Step-wise OT: the permutation found at step ``l`` is applied to net 2 for every later step, so the weight path is
  continuous. The seed re-solves per point and reverts to net 2's unit order at step boundaries: the same function at
  every ``t``, but a jump in weights at integer ``t`` (it changes the path length only).
- Bias of the layer that stays net 1's during a step (layer ``l + 1``) is net 1's, as in the seed; on the last
  butterfly step the output bias moves to net 2's too, so that ``t = end_time`` is net 2 (the seed's conv butterfly
  ends with net 1's output bias). The conv WA finder runs to ``L`` like the FC one (the seed's conv WA stops at
  ``L - 1``, before the output layer reaches net 2's).
- Conv WA features: the seed's patch grid (padding as the layer's, stride ``max(H // 2, 1)``) of every second image,
  which is the seed's "every second patch" of its position-major per-batch lists for even loader batch sizes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torch.func import functional_call

from lmc_lightning.weights.paths import Arc, Linear, NonlinearPath, Path, check_compatible

WeightDict = dict[str, Tensor]
Method = Literal["lin", "arc"]
Match = Literal["none", "ot"]
Solver = Literal["lstsq", "pinv"]
FINDERS = ("with_bias", "with_bias_wa", "simultaneous", "stepwise_butterfly", "stepwise_wa")
END_TIMES: dict[str, Callable[[int], int]] = {
    "with_bias": lambda n: 1, "with_bias_wa": lambda n: 2, "simultaneous": lambda n: 1,
    "stepwise_butterfly": lambda n: n - 1, "stepwise_wa": lambda n: n,
}
_CHAIN_MODULES = (nn.Linear, nn.Conv2d, nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Flatten,
                  nn.Dropout, nn.Identity, nn.Sequential)


# Connections of sample sets -------------------------------------------------------------------------------------------

def _ab(t: float, method: str) -> tuple[float, float]:
    if method == "lin":
        return 1.0 - t, t
    if method == "arc":
        if t == 0:
            return 1.0, 0.0
        if t == 1:
            return 0.0, 1.0
        return math.cos(math.pi * t / 2), math.sin(math.pi * t / 2)
    raise ValueError(f"method must be 'lin' or 'arc', got {method!r}.")


def sample_center(s1: Tensor, s2: Tensor) -> Tensor:
    """``mu`` of ``arc_connect``: the per-coordinate mean over all rows of ``s1`` and ``s2`` (``[1, *rest]``); for
    1-D tensors (one sample each, e.g. biases) ``(s1 + s2) / 2``."""
    if s1.dim() <= 1:
        return (s1 + s2) / 2
    return torch.cat([s1, s2]).mean(0, keepdim=True)


def connect(s1: Tensor, s2: Tensor, t: float, method: Method = "lin", center: Tensor | None = None) -> Tensor:
    """The seed's ``lin_connect`` / ``arc_connect`` of two sample sets (rows are samples).

    Args:
        s1: Samples at ``t = 0`` (``[n, ...]``; a 1-D tensor is one sample).
        s2: Samples at ``t = 1``, same shape.
        t: In ``[0, 1]``.
        method: ``"lin"``: ``(1 - t) s1 + t s2``; ``"arc"``: ``mu + cos(pi t/2)(s1 - mu) + sin(pi t/2)(s2 - mu)``.
        center: ``mu`` for ``arc`` (default :func:`sample_center`).
    """
    if s1.shape != s2.shape:
        raise ValueError(f"Sample sets differ in shape: {tuple(s1.shape)} and {tuple(s2.shape)}.")
    a, b = _ab(float(t), method)
    if b == 0:
        return s1
    if a == 0:
        return s2
    if method == "lin":
        return s1 * a + s2 * b
    mu = sample_center(s1, s2) if center is None else center
    return mu + (s1 - mu) * a + (s2 - mu) * b


def match_samples(s1: Tensor, s2: Tensor) -> Tensor:
    """OT between two equal-size sample sets: the index ``perm`` minimising ``sum_i |s1[i] - s2[perm[i]]|^2``.

    With uniform marginals and equal counts the optimal transport plan is a permutation (the seed's ``ot.emd`` on the
    squared Euclidean cost); this is its Hungarian solution. ``s2[perm]`` is net 2's samples in net 1's order.
    """
    if s1.shape[0] != s2.shape[0]:
        raise ValueError(f"OT needs equal sample counts, got {s1.shape[0]} and {s2.shape[0]}.")
    a = s1.reshape(len(s1), -1).detach().to("cpu", torch.float64)
    b = s2.reshape(len(s2), -1).detach().to("cpu", torch.float64)
    cost = torch.cdist(a, b).square().numpy()
    _, col = linear_sum_assignment(cost)
    return torch.from_numpy(col.astype(np.int64))


# Weight adjustment --------------------------------------------------------------------------------------------------

def solve_wa(features: Tensor, target: Tensor, solver: Solver = "lstsq") -> Tensor:
    """``X`` minimising ``|features @ X - target|`` in float64 on ``features``' device (minimum norm).

    Args:
        features: ``[N, d]`` current features.
        target: ``[N, m]`` values to reproduce.
        solver: ``"lstsq"`` or ``"pinv"`` (the seed's ``pinv(features) @ target``). ``"lstsq"`` is rank-revealing on
            every device: on the CPU ``torch.linalg.lstsq`` (gelsy, pivoted QR); elsewhere, where torch only offers
            gels (no rank detection: ill-conditioned features, common for deep conv layers, give huge weights), the
            minimum-norm solution through the eigendecomposition of ``features^T features``, keeping singular
            values above ``1e-7`` of the largest (:func:`min_norm_solve`; features computed in float32 carry no
            information below that).

    Returns:
        ``[d, m]`` float64.
    """
    f = features.reshape(len(features), -1).to(torch.float64)
    y = target.to(device=f.device, dtype=torch.float64)
    if solver == "pinv":
        return torch.linalg.pinv(f) @ y
    if solver != "lstsq":
        raise ValueError(f"solver must be 'lstsq' or 'pinv', got {solver!r}.")
    if f.device.type != "cpu":
        return min_norm_solve(f, y)
    live = f.abs().amax(0) > 0
    out = f.new_zeros(f.shape[1], y.shape[1])
    if bool(live.any()):
        out[live] = torch.linalg.lstsq(f[:, live], y).solution  # gelsy: rank-revealing
    return out


def min_norm_solve(f: Tensor, y: Tensor, rtol: float = 1e-7) -> Tensor:
    """Minimum-norm least squares ``pinv(f) @ y`` from the eigendecomposition of the Gram matrix ``f^T f``.

    Singular values of ``f`` below ``rtol`` times the largest are dropped (``rtol`` must stay well above float64's
    resolution of the squared values, about ``1e-8``).

    Args:
        f: ``[N, d]`` float64.
        y: ``[N, m]`` float64.
        rtol: Relative singular-value cutoff.

    Returns:
        ``[d, m]``.
    """
    lam, vec = torch.linalg.eigh(f.T @ f)
    keep = lam > lam.max().clamp_min(torch.finfo(f.dtype).tiny) * rtol**2
    v = vec[:, keep]
    return v @ ((v.T @ (f.T @ y)) / lam[keep, None])


def weight_adjust(weight: Tensor, f_target: Tensor, f_current: Tensor, solver: Solver = "lstsq") -> Tensor:
    """WA: ``weight @ f_target^T @ pinv(f_current^T)``, the weight ``W`` with ``W f_current ~ weight f_target``.

    Args:
        weight: ``[out, d1]`` (a conv weight ``[out, in, k, k]`` is flattened, and the result reshaped back).
        f_target: ``[N, d1]`` features the weight was trained on (rows are samples).
        f_current: ``[N, d2]`` the features it must now take (``d2 = d1`` for a conv weight).
        solver: See :func:`solve_wa`.

    Returns:
        The adjusted weight, in ``weight``'s dtype, shape and device.
    """
    w = weight.reshape(weight.shape[0], -1)
    target = f_target.to(torch.float64) @ w.to(device=f_target.device, dtype=torch.float64).T
    x = solve_wa(f_current, target, solver)
    out = x.T.to(dtype=weight.dtype, device=weight.device)
    return out.reshape(weight.shape) if weight.dim() > 2 else out


# Layer chains -------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Layer:
    """A Linear or Conv2d layer of a chain: module name, state-dict keys and unit count."""

    name: str
    weight: str
    bias: str | None
    conv: bool
    out: int
    kernel: int = 1
    padding: int = 0


def layer_chain(net: nn.Module) -> list[Layer]:
    """The Linear / Conv2d layers of a plain feed-forward net (MLP, VGG without normalisation), in forward order.

    Raises:
        ValueError: The net has other kinds of layers (normalisation, residual blocks), or consecutive layers do not
            feed each other unit by unit.
    """
    layers: list[tuple[str, nn.Module]] = []
    for name, mod in net.named_modules():
        if list(mod.children()):
            if name and not isinstance(mod, nn.Sequential):
                raise ValueError(f"Distribution connectors need a plain chain of Linear/Conv2d layers (MLP, VGG "
                                 f"without normalisation); '{name}' is a {type(mod).__name__}. Use "
                                 "finder='simultaneous' for other nets.")
            continue
        if not isinstance(mod, _CHAIN_MODULES):
            raise ValueError(f"Distribution connectors need a plain chain of Linear/Conv2d layers (MLP, VGG without "
                             f"normalisation); '{name}' is a {type(mod).__name__}. Use finder='simultaneous' for "
                             "other nets.")
        if isinstance(mod, (nn.Linear, nn.Conv2d)):
            layers.append((name, mod))
    if len(layers) < 2:
        raise ValueError(f"Distribution connectors need at least 2 Linear/Conv2d layers, {type(net).__name__} has "
                         f"{len(layers)}.")
    chain = []
    for i, (name, mod) in enumerate(layers):
        conv = isinstance(mod, nn.Conv2d)
        if conv and (mod.groups != 1 or mod.kernel_size[0] != mod.kernel_size[1]):
            raise ValueError(f"'{name}': only square, ungrouped convolutions are supported.")
        out = mod.out_channels if conv else mod.out_features
        if i + 1 < len(layers):
            nxt = layers[i + 1][1]
            fan_in = nxt.in_channels if isinstance(nxt, nn.Conv2d) else nxt.in_features
            if (isinstance(nxt, nn.Conv2d) and fan_in != out) or fan_in % out:
                raise ValueError(f"'{layers[i + 1][0]}' takes {fan_in} inputs, which are not the {out} units of "
                                 f"'{name}' (or whole groups of them): the net is not a plain chain.")
        chain.append(single_layer(net, name))
    return chain


def single_layer(net: nn.Module, name: str) -> Layer:
    """The :class:`Layer` of one Linear or Conv2d module of ``net`` by module name."""
    try:
        mod = net.get_submodule(name)
    except AttributeError as err:
        names = [n for n, m in net.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        raise ValueError(f"{type(net).__name__} has no module '{name}'; its Linear/Conv2d layers are {names}.") from err
    if not isinstance(mod, (nn.Linear, nn.Conv2d)):
        raise ValueError(f"'{name}' is a {type(mod).__name__}; weight adjustment needs a Linear or Conv2d layer.")
    conv = isinstance(mod, nn.Conv2d)
    pad = mod.padding[0] if conv and isinstance(mod.padding, tuple) else 0
    return Layer(name, f"{name}.weight", f"{name}.bias" if mod.bias is not None else None, conv,
                 mod.out_channels if conv else mod.out_features, mod.kernel_size[0] if conv else 1, pad)


def out_samples(w: Tensor) -> Tensor:
    """A layer's weight as its output units' samples, ``[out, rest]``."""
    return w.reshape(w.shape[0], -1)


def in_samples(w: Tensor, units: int) -> Tensor:
    """The next layer's weight as samples of the previous layer's ``units``: ``[units, rest]``.

    Conv: input-channel slices ``[in, out k k]``; Linear after a flatten of ``units`` channels: each channel's
    group of columns, ``[units, out * group]``.
    """
    if w.dim() > 2:
        return w.transpose(0, 1).reshape(units, -1)
    group = w.shape[1] // units
    return w.reshape(w.shape[0], units, group).transpose(0, 1).reshape(units, -1)


def from_in_samples(s: Tensor, like: Tensor) -> Tensor:
    """Inverse of :func:`in_samples`."""
    units = s.shape[0]
    if like.dim() > 2:
        return s.reshape(units, like.shape[0], *like.shape[2:]).transpose(0, 1).reshape(like.shape)
    group = like.shape[1] // units
    return s.reshape(units, like.shape[0], group).transpose(0, 1).reshape(like.shape)


def permute_units(theta: Mapping[str, Tensor], chain: Sequence[Layer], index: int, perm: Tensor) -> WeightDict:
    """Reorder layer ``index``'s units by ``perm`` (rows of its weight and bias, inputs of the next layer)."""
    out = dict(theta)
    layer = chain[index]
    perm = perm.to(theta[layer.weight].device)
    out[layer.weight] = theta[layer.weight][perm]
    if layer.bias is not None:
        out[layer.bias] = theta[layer.bias][perm]
    if index + 1 < len(chain):
        nxt = chain[index + 1].weight
        out[nxt] = from_in_samples(in_samples(theta[nxt], layer.out)[perm], theta[nxt])
    return out


def butterfly_samples(theta: Mapping[str, Tensor], chain: Sequence[Layer], index: int,
                      weight: Tensor | None = None, next_weight: Tensor | None = None, bias: bool = True) -> Tensor:
    """Samples ``[W_l row, b_l, W_{l+1} inputs]`` of layer ``index``'s units (``weight`` / ``next_weight`` replace
    the dict's tensors; ``bias=False`` leaves the bias out)."""
    layer = chain[index]
    w = theta[layer.weight] if weight is None else weight
    parts = [out_samples(w)]
    if bias and layer.bias is not None:
        parts.append(theta[layer.bias][:, None])
    if index + 1 < len(chain):
        nw = theta[chain[index + 1].weight] if next_weight is None else next_weight
        parts.append(in_samples(nw, layer.out))
    return torch.cat(parts, dim=1)


# Features -----------------------------------------------------------------------------------------------------------

class _Stop(Exception):
    pass


def patches(x: Tensor, kernel: int, padding: int) -> Tensor:
    """The seed's WA patch samples of a feature map ``[N, C, H, W]``: ``kernel x kernel`` patches of the padded map
    at stride ``max(W // 2, 1)`` of every second image, rows ``[ceil(N / 2) * P, C k k]``.

    The seed keeps every second entry of its per-batch, position-major patch list; with its even loader batch sizes
    that is every patch of every second image (``x[::2]``), the selection made here (rows in another order)."""
    stride = max(x.shape[-1] // 2, 1)
    cols = torch.nn.functional.unfold(x[::2], kernel, padding=padding, stride=stride)  # [N/2, C k k, P]
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def layer_features(net: nn.Module, theta: Mapping[str, Tensor], x: Tensor, layer: Layer,
                   batch_size: int = 1000) -> Tensor:
    """Inputs of ``layer`` under weights ``theta`` as WA sample rows: ``[N, fan_in]`` for a Linear layer,
    :func:`patches` for a Conv2d. The forward pass stops at the layer."""
    module = net.get_submodule(layer.name)
    found: list[Tensor] = []
    batch_size += batch_size % 2  # even batches: every second image of each batch is every second image overall

    def hook(_mod: nn.Module, args: tuple[Tensor, ...]) -> None:
        inp = args[0]
        found.append(patches(inp, layer.kernel, layer.padding) if layer.conv else inp.reshape(len(inp), -1))
        raise _Stop

    handle = module.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            for xb in x.split(batch_size):
                try:
                    functional_call(net, dict(theta), (xb,))
                except _Stop:
                    pass
    finally:
        handle.remove()
    return torch.cat(found).float()


# Paths --------------------------------------------------------------------------------------------------------------

def _bias(theta: Mapping[str, Tensor], layer: Layer) -> dict[str, Tensor]:
    return {layer.bias: theta[layer.bias]} if layer.bias is not None else {}


class StepwisePath(NonlinearPath):
    """The step-wise finders (and the one-hidden-layer WA finder) as a path on ``[0, end_time]``.

    Build it with :func:`connector_path`. ``stepwise_butterfly``: ``Ŵ_0 = W¹_0``, ``Ŵ_k = WA(W¹_k)`` on net 2's
    features for ``0 < k < L - 1``, ``Ŵ_{L-1} = W²_{L-1}``; on step ``l = floor(t)`` (``s = t - l``) layers ``< l``
    are net 2's, layer ``l`` goes ``(Ŵ_l, b¹_l) -> (W²_l, b²_l)`` (rows as samples), layer ``l + 1``'s inputs go
    ``W¹_{l+1} -> Ŵ_{l+1}`` (columns as samples), later layers are net 1's. ``stepwise_wa``: layer ``l`` goes
    ``Ŵ_l -> W²_l`` and layer ``l + 1`` is re-fitted by WA at every ``t`` on the current features to reproduce net
    1's ``W¹_{l+1} F¹_{l+1}``; the last step (``l = L - 1``) moves the output layer ``Ŵ_{L-1} -> W²_{L-1}``.
    """

    def __init__(self, net: nn.Module, theta_a: Mapping[str, Tensor], theta_b: Mapping[str, Tensor],
                 chain: Sequence[Layer], x: Tensor | None, kind: Literal["butterfly", "wa"], method: Method,
                 match: Match, solver: Solver = "lstsq", batch_size: int = 1000, ot_bias: bool = True) -> None:
        self.net, self.chain, self.x, self.kind, self.method = net, list(chain), x, kind, method
        self.solver, self.batch_size = solver, batch_size
        self.a = dict(theta_a)
        self.end_time = float(len(chain) - 1 if kind == "butterfly" else len(chain))
        self._targets: dict[int, Tensor] = {}
        b = dict(theta_b)
        n = len(chain)
        self.w_hat: list[Tensor] = [self.a[chain[0].weight]]
        for layer in range(n - 1 if kind == "butterfly" else n):
            nxt = layer + 1
            if kind == "butterfly" and nxt < n:
                w_next = b[chain[nxt].weight] if nxt == n - 1 else self._adjust(nxt, b)
            if match == "ot" and (kind == "butterfly" or layer < n - 1):
                if kind == "butterfly":
                    s_a = butterfly_samples(self.a, chain, layer, weight=self.w_hat[layer])
                    s_b = butterfly_samples(b, chain, layer, next_weight=w_next)
                else:  # OT on layer l's rows only (the next layer is re-fitted anyway)
                    s_a = butterfly_samples(self.a, chain[:nxt], layer, weight=self.w_hat[layer], bias=ot_bias)
                    s_b = butterfly_samples(b, chain[:nxt], layer, bias=ot_bias)
                perm = match_samples(s_a, s_b)
                b = permute_units(b, chain, layer, perm)
                if kind == "butterfly":
                    w_next = from_in_samples(in_samples(w_next, chain[layer].out)[perm.to(w_next.device)], w_next)
            if nxt < n:
                self.w_hat.append(w_next if kind == "butterfly" else self._adjust(nxt, b))
        self.b = b

    def _target(self, index: int) -> Tensor:
        """``F¹ W¹ᵀ`` of layer ``index`` (net 1's pre-activations without bias), cached."""
        if index not in self._targets:
            w = self.a[self.chain[index].weight]
            f = layer_features(self.net, self.a, self.x, self.chain[index], self.batch_size)
            self._targets[index] = f.to(torch.float64) @ out_samples(w).to(f.device, torch.float64).T
        return self._targets[index]

    def _adjust(self, index: int, theta: Mapping[str, Tensor]) -> Tensor:
        """WA of layer ``index``: net 1's weight re-expressed on the features of ``theta`` at that layer."""
        if self.x is None:
            raise ValueError("Weight adjustment needs training inputs: pass data to connector_path.")
        w = self.a[self.chain[index].weight]
        f = layer_features(self.net, theta, self.x, self.chain[index], self.batch_size)
        x = solve_wa(f, self._target(index), self.solver)
        return x.T.to(dtype=w.dtype, device=w.device).reshape(w.shape)

    def weights_at(self, t: float) -> WeightDict:
        t = self.check_t(t)
        if t == 0:  # net 1 itself (a WA re-fit there reproduces it on the data, not necessarily in dead columns)
            return dict(self.a)
        n, chain = len(self.chain), self.chain
        steps = n - 1 if self.kind == "butterfly" else n
        layer = min(int(math.floor(t)), steps - 1)
        s = t - layer
        out = dict(self.a)
        for k in range(layer):
            out[chain[k].weight] = self.b[chain[k].weight]
            out.update(_bias(self.b, chain[k]))
        cur = chain[layer]
        out[cur.weight] = connect(self.w_hat[layer], self.b[cur.weight], s, self.method)
        if cur.bias is not None:
            out[cur.bias] = connect(self.a[cur.bias], self.b[cur.bias], s, self.method)
        if layer + 1 < n:
            nxt = chain[layer + 1]
            if self.kind == "butterfly":
                w1 = in_samples(self.a[nxt.weight], cur.out)
                w2 = in_samples(self.w_hat[layer + 1], cur.out)
                out[nxt.weight] = from_in_samples(connect(w1, w2, s, self.method), self.a[nxt.weight])
                if layer + 1 == n - 1 and nxt.bias is not None:  # the output bias reaches net 2's at the end
                    out[nxt.bias] = connect(self.a[nxt.bias], self.b[nxt.bias], s, self.method)
            else:
                out[nxt.weight] = self._adjust(layer + 1, out)
        return out


def _samples_center(theta_a: Mapping[str, Tensor], theta_b: Mapping[str, Tensor], chain: Sequence[Layer]
                    ) -> WeightDict:
    """The arc centre of the one-hidden-layer samples ``[W0 row, b0, W1 column]`` as weight tensors."""
    s = sample_center(butterfly_samples(theta_a, chain, 0), butterfly_samples(theta_b, chain, 0))
    l0, l1 = chain
    w0, w1 = theta_a[l0.weight], theta_a[l1.weight]
    d0 = out_samples(w0).shape[1]
    center = dict(theta_a)
    center[l0.weight] = s[:, :d0].expand(l0.out, -1).reshape(w0.shape).clone()
    off = d0
    if l0.bias is not None:
        center[l0.bias] = s[:, off].expand(l0.out).clone()
        off += 1
    center[l1.weight] = from_in_samples(s[:, off:].expand(l0.out, -1), w1).clone()
    if l1.bias is not None:
        center[l1.bias] = (theta_a[l1.bias] + theta_b[l1.bias]) / 2
    return center


def _ot_chain(theta_a: Mapping[str, Tensor], theta_b: Mapping[str, Tensor], chain: Sequence[Layer]) -> WeightDict:
    """Net 2 with each hidden layer's units OT-matched to net 1's on ``[W row, b]`` (layer by layer, inputs first
    permuted by the previous layer's match)."""
    b = dict(theta_b)
    for index in range(len(chain) - 1):
        perm = match_samples(butterfly_samples(theta_a, chain[: index + 1], index),
                             butterfly_samples(b, chain[: index + 1], index))
        b = permute_units(b, chain, index, perm)
    return b


def check_options(finder: str, method: str, match: str) -> None:
    """Raise a ``ValueError`` naming the bad option unless ``finder``, ``method`` and ``match`` are known."""
    if finder not in FINDERS:
        raise ValueError(f"finder must be one of {FINDERS}, got {finder!r}.")
    if method not in ("lin", "arc"):
        raise ValueError(f"method must be 'lin' or 'arc', got {method!r}.")
    if match not in ("none", "ot"):
        raise ValueError(f"match must be 'none' or 'ot', got {match!r}.")


def connector_path(
    net: nn.Module,
    theta_a: Mapping[str, Tensor],
    theta_b: Mapping[str, Tensor],
    finder: str = "stepwise_wa",
    method: Method = "lin",
    match: Match = "none",
    data: Tensor | None = None,
    solver: Solver = "lstsq",
    batch_size: int = 1000,
) -> Path | NonlinearPath:
    """A distribution-based connection of two nets (see the module docstring for the finders).

    Args:
        net: The architecture (its module structure defines the layers; weights come from the dicts).
        theta_a: Net 1 (``t = 0``).
        theta_b: Net 2 (``t = end_time``; with ``match="ot"`` its units permuted, the same function).
        finder: One of :data:`FINDERS`.
        method: ``"lin"`` or ``"arc"`` (centred, :func:`connect`).
        match: ``"none"`` or ``"ot"``.
        data: Training inputs for WA (the seed uses the whole training set, test transform), on the device where the
            weights are; needed by ``with_bias_wa``, ``stepwise_butterfly`` (for ``L > 2``) and ``stepwise_wa``.
        solver: WA solver (:func:`solve_wa`).
        batch_size: Samples per forward pass when computing features.

    Returns:
        ``with_bias`` and ``simultaneous`` are :class:`~lmc_lightning.weights.paths.Linear` or centred
        :class:`~lmc_lightning.weights.paths.Arc` paths (linear in their control points, so the evaluator batches
        them); the others are :class:`StepwisePath` (a :class:`~lmc_lightning.weights.paths.NonlinearPath`).
    """
    check_options(finder, method, match)
    check_compatible(theta_a, theta_b, names=["theta_a", "theta_b"], devices=True)
    keys = list(net.state_dict())
    theta_a, theta_b = {k: theta_a[k] for k in keys}, {k: theta_b[k] for k in keys}
    if finder == "simultaneous":
        if match == "ot":
            theta_b = _ot_chain(theta_a, theta_b, layer_chain(net))
        return Linear(theta_a, theta_b) if method == "lin" else Arc(theta_a, theta_b, centered=True)
    chain = layer_chain(net)
    if finder in ("with_bias", "with_bias_wa"):
        if len(chain) != 2 or any(layer.bias is None for layer in chain):
            raise ValueError(f"finder={finder!r} connects one-hidden-layer nets with biases (2 layers with bias); "
                             f"this net has {len(chain)} layers"
                             f"{'' if all(la.bias for la in chain) else ', some without bias'}. Use 'simultaneous', "
                             "'stepwise_butterfly' or 'stepwise_wa'.")
    if finder == "with_bias":
        if match == "ot":
            perm = match_samples(butterfly_samples(theta_a, chain, 0), butterfly_samples(theta_b, chain, 0))
            theta_b = permute_units(theta_b, chain, 0, perm)
        if method == "lin":
            return Linear(theta_a, theta_b)
        return Arc(theta_a, theta_b, center=_samples_center(theta_a, theta_b, chain))
    if data is None and (finder != "stepwise_butterfly" or len(chain) > 2):
        raise ValueError(f"finder={finder!r} re-fits layers by weight adjustment: pass the training inputs as data.")
    if data is not None:
        data = data.to(theta_a[chain[0].weight].device)
    kind = "butterfly" if finder == "stepwise_butterfly" else "wa"
    return StepwisePath(net, theta_a, theta_b, chain, data, kind, method, match, solver, batch_size,
                        ot_bias=finder != "with_bias_wa")


def end_time(net: nn.Module, finder: str) -> float:
    """The ``end_time`` of a finder on ``net`` (``L`` = number of Linear/Conv2d layers)."""
    if finder not in FINDERS:
        raise ValueError(f"finder must be one of {FINDERS}, got {finder!r}.")
    n = len(layer_chain(net)) if finder != "simultaneous" else 1
    return float(END_TIMES[finder](n))


def describe(path: Any) -> str:
    """A one-line description of a connector path."""
    return f"{type(path).__name__} on [0, {getattr(path, 'end_time', 1.0):g}]"
