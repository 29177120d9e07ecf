"""Fitting the free control points of a path: sample coordinates, run the net at theta(coords), step.

Pure torch, no Lightning: :func:`path_loss` is the per-batch objective a Lightning module calls in
``training_step``; :func:`fit_path` is a plain training loop over tensors built on it (tests, scripts, benchmarks).

BatchNorm: the net runs in train mode, so each sampled point normalises with its own batch statistics. The running
statistics passed to the net are throw-away copies, so the path's stored buffers never change; evaluation points get
their statistics recomputed afterwards (BN reset).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Collection

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from lmc_lightning.weights.curves import ControlPath
from lmc_lightning.weights.paths import Path, WeightDict, _slot

LossFn = Callable[[Tensor, Tensor], Tensor]


def sample_uniform(num: int, dim: int = 1, generator: torch.Generator | None = None) -> Tensor:
    """``[num, dim]`` coordinates drawn uniformly from ``[0, 1]^dim`` (float64, CPU)."""
    return torch.rand(num, dim, generator=generator, dtype=torch.float64)


def sample_boundary(num: int, generator: torch.Generator | None = None) -> Tensor:
    """``[num, 2]`` points drawn uniformly from the boundary of the unit square (each edge equally likely)."""
    s = torch.rand(num, generator=generator, dtype=torch.float64)
    edge = torch.randint(0, 4, (num,), generator=generator)
    side = (edge % 2).to(torch.float64)
    along_u = edge < 2
    return torch.stack([torch.where(along_u, s, side), torch.where(along_u, side, s)], dim=1)


def parameter_keys(net: nn.Module) -> list[str]:
    """State-dict keys of ``net`` that are parameters (the rest are buffers)."""
    return [name for name, _ in net.named_parameters()]


def freeze_buffer_points(path: Path, net: nn.Module) -> list[nn.Parameter]:
    """Stop gradients to the free control points of ``net``'s buffers (BN statistics); return the trainable ones.

    Buffers are not trained (BN statistics are recomputed at evaluation), so their free points need no gradient or
    optimiser state.

    Returns:
        The free-point parameters of ``net``'s parameters, for the optimiser.
    """
    params = set(parameter_keys(net))
    missing = [k for k in params if k not in path.keys_]
    if missing:
        raise ValueError(f"The path has no control points for parameter '{missing[0]}' of the net; build the path "
                         "from state dicts of this architecture.")
    out = []
    for key in path.float_keys:
        p = getattr(path.free_store, _slot(key))
        p.requires_grad_(key in params and path.num_free > 0)
        if p.requires_grad:
            out.append(p)
    return out


def training_weights(path: Path, coords: Tensor, buffer_keys: Collection[str] = ()) -> WeightDict:
    """Weights at one point for a training forward pass: buffers detached and copied so the net may update them.

    Args:
        path: The path.
        coords: ``[dim]`` coordinates of the point.
        buffer_keys: Keys of the net's buffers (BN running statistics, counters).
    """
    if isinstance(path, ControlPath):
        return path._point(coords.tolist(), frozenset(buffer_keys))
    w = path(*coords.tolist())
    for key in buffer_keys:
        w[key] = w[key].detach().clone()
    return w


class _Slots:
    """Where each state-dict key of a net lives (``module._parameters`` or ``module._buffers``), to swap tensors in.

    A cheaper :func:`torch.func.functional_call` for the training loop (a dict assignment per key). Built once per
    net and key list; checked on every call against the module tree, so a replaced submodule rebuilds it.
    """

    def __init__(self, net: nn.Module, keys: tuple[str, ...]) -> None:
        self.keys = keys
        modules = dict(net.named_modules(remove_duplicate=False))
        self.tree = [(parent, name, child) for parent in modules.values() for name, child in parent._modules.items()]
        self.slots: list[dict[str, Tensor]] | None = []
        for key in keys:
            prefix, _, name = key.rpartition(".")
            module = modules.get(prefix)
            where = None if module is None else (
                module._parameters if name in module._parameters else module._buffers if name in module._buffers
                else None)
            if where is None:
                self.slots = None  # not a plain parameter or buffer: leave it to functional_call
                return
            self.slots.append(where)
        tensors = [slot[key.rpartition(".")[2]] for slot, key in zip(self.slots, keys, strict=True)]
        if len({id(t) for t in tensors if t is not None}) < sum(t is not None for t in tensors):
            self.slots = None  # tied weights: functional_call resolves them

    def current(self) -> bool:
        return all(parent._modules.get(name) is child for parent, name, child in self.tree)


_SLOTS: weakref.WeakKeyDictionary[nn.Module, _Slots] = weakref.WeakKeyDictionary()


def _call(net: nn.Module, weights: WeightDict, x: Tensor) -> Tensor:
    """``functional_call(net, weights, (x,))`` with the tensors swapped straight into the module dicts."""
    keys = tuple(weights)
    slots = _SLOTS.get(net)
    if slots is None or slots.keys != keys or not slots.current():
        slots = _SLOTS[net] = _Slots(net, keys)
    if slots.slots is None:
        return functional_call(net, weights, (x,))
    names = [key.rpartition(".")[2] for key in keys]
    saved = [slot[name] for slot, name in zip(slots.slots, names, strict=True)]
    try:
        for slot, name, key in zip(slots.slots, names, keys, strict=True):
            slot[name] = weights[key]
        return net(x)
    finally:
        for slot, name, tensor in zip(slots.slots, names, saved, strict=True):
            slot[name] = tensor


def path_loss(
    path: Path,
    net: nn.Module,
    x: Tensor,
    y: Tensor,
    coords: Tensor,
    reg: float = 0.0,
    loss_fn: LossFn = F.cross_entropy,
    param_keys: Collection[str] | None = None,
) -> Tensor:
    """Mean loss of one batch over the sampled points, plus ``reg`` times the squared distance to the linear path.

    Args:
        path: The path (its free control points are what gets trained).
        net: Any net with the path's state-dict keys; its mode (train/eval) decides BN behaviour.
        x: Input batch.
        y: Targets.
        coords: ``[S, dim]`` sampled coordinates; the loss is averaged over them (same batch at each point).
        reg: Weight of :meth:`ControlPath.distance_to_linear` (parameters only).
        loss_fn: ``loss_fn(logits, y) -> scalar``.
        param_keys: The net's parameter keys (default: from ``net.named_parameters()``); the other keys are buffers.
    """
    param_keys = set(parameter_keys(net) if param_keys is None else param_keys)
    buffer_keys = [k for k in path.keys_ if k not in param_keys]
    losses = [loss_fn(_call(net, training_weights(path, c, buffer_keys), x), y) for c in coords]
    loss = losses[0] if len(losses) == 1 else sum(losses[1:], losses[0]) / len(losses)
    if reg:
        if not isinstance(path, ControlPath):
            raise TypeError(f"reg needs a path with a linear reference (ControlPath), got {type(path).__name__}.")
        loss = loss + reg * path.distance_to_linear([k for k in path.float_keys if k in param_keys])
    return loss


def fit_path(
    path: Path,
    net: nn.Module,
    x: Tensor,
    y: Tensor,
    epochs: int = 1,
    lr: float = 0.05,
    batch_size: int = 128,
    num_samples: int = 1,
    reg: float = 0.0,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    seed: int = 0,
    loss_fn: LossFn = F.cross_entropy,
    sampler: Callable[[int, torch.Generator], Tensor] | None = None,
) -> list[float]:
    """Train the free control points of ``path`` with SGD on tensors ``x, y`` (already on the path's device).

    Each batch samples ``num_samples`` coordinates (uniform in ``[0, 1]^dim`` unless ``sampler`` is given) and
    minimises :func:`path_loss`. The net runs in train mode (BN uses batch statistics); its own weights are unused.

    Args:
        path: Path to train in place.
        net: Net of the path's architecture.
        x: Training inputs.
        y: Training targets.
        epochs: Passes over the data.
        lr: SGD learning rate (cosine-annealed to 0 over all steps).
        batch_size: Batch size.
        num_samples: Points sampled per batch.
        reg: L2 weight toward the linear path.
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        seed: Seeds data order and coordinate sampling.
        loss_fn: Training loss.
        sampler: ``sampler(num_samples, generator) -> [num_samples, dim]`` coordinates.

    Returns:
        Mean training loss of each epoch.
    """
    if epochs < 1 or num_samples < 1 or batch_size < 1:
        raise ValueError(f"epochs, num_samples and batch_size must be >= 1, got {epochs}, {num_samples}, {batch_size}.")
    params = freeze_buffer_points(path, net)
    if not params:
        raise ValueError(f"{type(path).__name__} has no free control points to train (num_bends=0?).")
    param_keys = parameter_keys(net)
    gen = torch.Generator().manual_seed(seed)
    sampler = sampler or (lambda n, g: sample_uniform(n, path.dim, g))
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    steps = epochs * -(-len(x) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    was_training = net.training
    net.train()
    history = []
    for _ in range(epochs):
        total, count = 0.0, 0
        for idx in torch.randperm(len(x), generator=gen).split(batch_size):
            idx = idx.to(x.device)
            loss = path_loss(path, net, x[idx], y[idx], sampler(num_samples, gen), reg, loss_fn, param_keys)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.detach() * len(idx)
            count += len(idx)
        history.append(float(total) / count)
    net.train(was_training)
    return history
