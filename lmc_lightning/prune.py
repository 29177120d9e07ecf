"""One-shot pruning on weight dicts: global magnitude pruning, made permanent, and a hook for external pruners.

As in the rethink-re-basin seed's ``renormalize_pruned_model`` notebook, :func:`prune` by default removes the
``round(sparsity * n)`` smallest-magnitude entries among all ``n`` entries of every conv weight and every linear
weight together (``torch.nn.utils.prune.global_unstructured`` with ``L1Unstructured``, then ``prune.remove``): the
pruned entries are zeros in the returned weights, with no mask or re-parametrisation left behind. Biases and norm
parameters are never pruned. After pruning, :func:`lmc_lightning.weights.renorm.renormalize_to` (REPAIR/RESCALE
towards the dense model's own statistics) or :func:`lmc_lightning.weights.renorm.reset_bn` repair the activations.

An external pruner (e.g. WoodFisher) plugs in as a callable ``pruner(net, weights, keys, sparsity) -> masks`` or
under a name with :func:`register_pruner`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

WeightDict = dict[str, Tensor]
Masks = dict[str, Tensor]
Pruner = Callable[[nn.Module, Mapping[str, Tensor], Sequence[str], float], Masks]
"""``pruner(net, weights, keys, sparsity) -> {key: bool mask}`` (True keeps the entry) for every key in ``keys``."""

PRUNABLE_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def prunable_keys(net: nn.Module) -> list[str]:
    """The ``weight`` keys of every conv and linear layer, in state-dict order (the seed prunes every conv weight and
    the classifier weight)."""
    return [f"{name}.weight" for name, m in net.named_modules() if isinstance(m, PRUNABLE_TYPES)]


def _check_sparsity(sparsity: float) -> float:
    if isinstance(sparsity, bool) or not 0 <= float(sparsity) < 1:
        raise ValueError(f"sparsity must lie in [0, 1) (the fraction of weights set to zero), got {sparsity!r}.")
    return float(sparsity)


def magnitude_masks(net: nn.Module, weights: Mapping[str, Tensor], keys: Sequence[str], sparsity: float) -> Masks:
    """Global magnitude (L1 unstructured) masks: exactly ``round(sparsity * n)`` entries with the smallest ``|w|``
    over all ``keys`` together are pruned (ties broken by ``torch.topk``, as ``torch.nn.utils.prune`` does)."""
    del net  # part of the pruner signature; magnitude pruning needs the weights only
    sparsity = _check_sparsity(sparsity)
    flat = torch.cat([weights[k].detach().reshape(-1).abs().float() for k in keys])
    count = round(sparsity * flat.numel())
    keep = torch.ones(flat.numel(), dtype=torch.bool, device=flat.device)
    if count > 0:
        keep[torch.topk(flat, count, largest=False).indices] = False
    masks, start = {}, 0
    for k in keys:
        n = weights[k].numel()
        masks[k] = keep[start : start + n].view_as(weights[k])
        start += n
    return masks


_PRUNERS: dict[str, Pruner] = {"magnitude": magnitude_masks}


def register_pruner(name: str, pruner: Pruner, overwrite: bool = False) -> None:
    """Make ``pruner`` selectable by name (``prune(..., pruner=name)``, ``PruneModule(pruner=name)``)."""
    if name in _PRUNERS and not overwrite:
        raise ValueError(f"A pruner named '{name}' exists; pick another name or pass overwrite=True.")
    _PRUNERS[name] = pruner


def available_pruners() -> list[str]:
    """Names of the registered pruners."""
    return sorted(_PRUNERS)


def prune(
    net: nn.Module,
    sparsity: float,
    weights: Mapping[str, Tensor] | None = None,
    *,
    pruner: str | Pruner = "magnitude",
    keys: Sequence[str] | None = None,
) -> tuple[WeightDict, Masks]:
    """Prune ``weights`` (default: the net's own) to a global ``sparsity``, permanently.

    Args:
        net: The architecture (and the weights when ``weights`` is None). Not modified.
        sparsity: Fraction of the prunable entries set to zero, in ``[0, 1)``.
        weights: Weight dict to prune; not modified.
        pruner: ``"magnitude"`` (global L1, :func:`magnitude_masks`), another registered name, or a callable
            :data:`Pruner`.
        keys: Tensors to prune (default :func:`prunable_keys`).

    Returns:
        ``(pruned weights, masks)``: a new dict with the pruned entries zeroed, and the boolean keep-masks.

    Raises:
        ValueError: Unknown pruner, a key not in the weights, or a pruner returning masks of the wrong shape.
    """
    _check_sparsity(sparsity)
    weights = dict(net.state_dict()) if weights is None else dict(weights)
    keys = list(keys) if keys is not None else prunable_keys(net)
    missing = [k for k in keys if k not in weights]
    if missing or not keys:
        raise ValueError(f"Cannot prune {missing or 'nothing'}: keys must name weight tensors of the net.")
    if isinstance(pruner, str):
        if pruner not in _PRUNERS:
            raise ValueError(f"Unknown pruner {pruner!r}; registered: {available_pruners()} (add one with "
                             "lmc_lightning.prune.register_pruner).")
        pruner = _PRUNERS[pruner]
    masks = pruner(net, weights, keys, sparsity)
    for k in keys:
        if k not in masks or masks[k].shape != weights[k].shape:
            raise ValueError(f"The pruner returned no mask of shape {tuple(weights[k].shape)} for '{k}'.")
    out = dict(weights)
    for k in keys:
        out[k] = weights[k] * masks[k].to(device=weights[k].device, dtype=weights[k].dtype)
    return out, {k: masks[k].bool() for k in keys}


def sparsity_of(weights: Mapping[str, Tensor], keys: Sequence[str]) -> float:
    """Fraction of exactly-zero entries over ``keys``."""
    zeros = sum(int((weights[k] == 0).sum()) for k in keys)
    return zeros / max(1, sum(weights[k].numel() for k in keys))
