"""Module order of a forward pass, and freezing a net up to a layer."""

from __future__ import annotations

import torch
from torch import nn


def execution_order(net: nn.Module, input_shape: tuple[int, ...]) -> list[str]:
    """Names of ``net``'s submodules in the order a forward pass first calls them (one no-grad pass in eval mode)."""
    order: list[str] = []
    names = {m: n for n, m in net.named_modules() if n}
    hooks = [m.register_forward_pre_hook(lambda mod, _: order.append(names[mod]) if names[mod] not in order else None)
             for m in names]
    modes = {m: m.training for m in net.modules()}
    try:
        p = next(net.parameters(), None)
        x = torch.zeros(2, *input_shape, device=p.device if p is not None else None)
        net.eval()
        with torch.no_grad():
            net(x)
    finally:
        for h in hooks:
            h.remove()
        for m, training in modes.items():
            m.train(training)
    return order


def freeze_until(net: nn.Module, layer: str, input_shape: tuple[int, ...]) -> list[str]:
    """Stop gradients to every parameter of the modules that run up to and including ``layer``.

    Each module's own parameters count at its first call; naming a container freezes all of it and what ran before.
    Frozen BatchNorm layers keep their train-mode behaviour (batch statistics; running statistics still update).

    Args:
        net: The network; modified in place (``requires_grad=False``).
        layer: Module name (``net.named_modules()``), e.g. ``"features.3"``.
        input_shape: ``(C, H, W)`` of one input, for the tracing pass.

    Returns:
        The names of the frozen parameters.

    Raises:
        ValueError: ``layer`` is not a module of ``net`` that the forward pass calls.
    """
    order = execution_order(net, input_shape)
    if layer not in order:
        raise ValueError(f"freeze={layer!r} is not a module that {type(net).__name__}'s forward calls; called modules "
                         f"in order: {order}.")
    modules = dict(net.named_modules())
    frozen: list[str] = []
    last = max(i for i, name in enumerate(order) if name == layer or name.startswith(layer + "."))
    for name in order[: last + 1]:
        for pname, param in modules[name].named_parameters(prefix=name, recurse=False):
            if param.requires_grad:
                param.requires_grad_(False)
                frozen.append(pname)
    return frozen
