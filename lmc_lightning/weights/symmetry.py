"""Intertwiner-group maps folded into a layer (the modelsym seed's "sanity test", Godfrey et al., 2022, A1.4).

``transform_layer(net, "2", group="grelu")`` returns a copy of ``net`` whose layer ``"2"`` (a Conv2d or Linear)
outputs ``M y`` instead of ``y``, with ``M`` a random orthogonal matrix or a random G_ReLU map
``P diag(exp(sigma z) / exp(sigma^2 / 2))``. Freezing the layers up to it and retraining the rest (``EndpointModule``
with ``init`` and ``freeze``) measures how much accuracy the map costs: G_ReLU maps commute with ReLU (and max-pool),
so folding ``M^-1`` into the next layer (``compensate=True``) gives back the same function; orthogonal maps do not.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
from torch import Tensor, nn

from lmc_lightning.nets.order import execution_order

Group = Literal["orthogonal", "grelu"]


def random_map(channels: int, group: Group, sigma: float = 1.0, seed: int = 0) -> Tensor:
    """A random element of the group, as a ``[C, C]`` float64 matrix.

    ``"orthogonal"``: ``nn.init.orthogonal_`` of a Gaussian matrix. ``"grelu"``: ``P diag(exp(sigma z) /
    exp(sigma^2 / 2))`` with ``P`` a uniform random permutation and ``z ~ N(0, 1)`` (the seed's form).
    """
    gen = torch.Generator().manual_seed(seed)
    if group == "orthogonal":
        q, r = torch.linalg.qr(torch.randn(channels, channels, generator=gen, dtype=torch.float64))
        return q * torch.sign(torch.diagonal(r))  # Haar-distributed
    if group == "grelu":
        perm = torch.eye(channels, dtype=torch.float64)[torch.randperm(channels, generator=gen)]
        z = torch.randn(channels, generator=gen, dtype=torch.float64)
        return perm * (torch.exp(sigma * z) / torch.exp(torch.tensor(sigma**2 / 2, dtype=torch.float64)))
    raise ValueError(f"group must be 'orthogonal' or 'grelu', got {group!r}.")


def _next_weighted(net: nn.Module, layer: str, input_shape: tuple[int, ...]) -> str:
    order = execution_order(net, input_shape)
    modules = dict(net.named_modules())
    after = order[order.index(layer) + 1:]
    for name in after:
        if isinstance(modules[name], nn.Conv2d | nn.Linear):
            return name
        if isinstance(modules[name], nn.modules.batchnorm._NormBase | nn.GroupNorm):
            raise ValueError(f"A norm layer ({name}) follows {layer}: the map cannot be compensated across it; "
                             "use a net without norm layers (the seed uses mcnn_k).")
    raise ValueError(f"No Conv2d or Linear layer runs after {layer!r}; nothing to fold the inverse into.")


def transform_layer(net: nn.Module, layer: str, group: Group = "grelu", sigma: float = 1.0, seed: int = 0,
                    compensate: bool = False, input_shape: tuple[int, ...] = (3, 32, 32)) -> nn.Module:
    """A copy of ``net`` with a random group element ``M`` folded into ``layer``'s output channels.

    Args:
        net: The network (not modified).
        layer: Name of a ``Conv2d`` or ``Linear`` module; its weight and bias become ``M W`` and ``M b``.
        group: ``"orthogonal"`` or ``"grelu"`` (see :func:`random_map`).
        sigma: Spread of the G_ReLU scalings.
        seed: Seed of the random map.
        compensate: Also fold ``M^-1`` into the input channels of the next Conv2d/Linear (found by a forward pass),
            which preserves the function for G_ReLU maps across ReLU/max-pool, and not for orthogonal ones.
        input_shape: ``(C, H, W)`` of one input, for finding the next layer.

    Returns:
        The transformed copy (plain ``nn.Module`` of the same architecture, so ``save_net``/``EndpointModule(init=)``
        take it).

    Raises:
        ValueError: ``layer`` is not a Conv2d/Linear of ``net``, or (with ``compensate``) nothing to fold into.
    """
    out = copy.deepcopy(net)
    modules = dict(out.named_modules())
    target = modules.get(layer)
    if not isinstance(target, nn.Conv2d | nn.Linear):
        convs = [n for n, m in modules.items() if isinstance(m, nn.Conv2d | nn.Linear)]
        raise ValueError(f"layer={layer!r} is not a Conv2d or Linear module of the net; those are {convs}.")
    channels = target.weight.shape[0]
    m = random_map(channels, group, sigma, seed)
    with torch.no_grad():
        w = target.weight.double()
        target.weight.copy_(torch.einsum("oc,c...->o...", m, w).to(target.weight.dtype))
        if target.bias is not None:
            target.bias.copy_((m @ target.bias.double()).to(target.bias.dtype))
        if compensate:
            nxt = modules[_next_weighted(out, layer, input_shape)]
            inv = torch.linalg.inv(m)
            w = nxt.weight.double()
            if w.shape[1] % channels:
                raise ValueError(f"The next layer takes {w.shape[1]} inputs, not a multiple of {channels} channels.")
            folded = w.reshape(w.shape[0], channels, w.shape[1] // channels, *w.shape[2:])
            folded = torch.einsum("ock...,cd->odk...", folded, inv).reshape(w.shape)
            nxt.weight.copy_(folded.to(nxt.weight.dtype))
    return out
