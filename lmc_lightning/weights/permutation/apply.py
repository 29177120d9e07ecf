"""Apply a permutation to a weight dict."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from lmc_lightning.weights.permutation.spec import PermutationSpec

Permutation = dict[str, Tensor]


def expand(index: Tensor, block: int) -> Tensor:
    """Index of an axis whose units span ``block`` consecutive entries each."""
    if block == 1:
        return index
    return (index[:, None] * block + torch.arange(block, device=index.device)).reshape(-1)


def identity(spec: PermutationSpec, theta: Mapping[str, Tensor]) -> Permutation:
    """The identity permutation of every group (sizes read from ``theta``)."""
    return {name: torch.arange(n) for name, n in spec.sizes(theta).items()}


def check_permutation(spec: PermutationSpec, perm: Mapping[str, Tensor], theta: Mapping[str, Tensor]) -> None:
    """Check that ``perm`` holds one valid permutation of the right length for every group of ``spec``.

    Raises:
        ValueError: A group is missing or its index tensor is not a permutation of ``0..n-1``.
    """
    for name, n in spec.sizes(theta).items():
        if name not in perm:
            raise ValueError(f"Permutation has no entry for group '{name}'; groups are {list(spec.groups)}.")
        index = torch.as_tensor(perm[name])
        if index.shape != (n,) or not torch.equal(index.sort().values.cpu(), torch.arange(n)):
            raise ValueError(f"perm['{name}'] must be a permutation of 0..{n - 1} (shape ({n},)), got shape "
                             f"{tuple(index.shape)}.")


def apply_permutation(state_dict: Mapping[str, Tensor], spec: PermutationSpec,
                      perm: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Permute the units of a weight dict.

    Unit ``i`` of the result is unit ``perm[group][i]`` of the input along every axis of the group, so a network
    with the permuted weights computes the same function. Keys that no group touches are passed through (the same
    tensor objects).

    Args:
        state_dict: Weight dict (full state dict, parameters and buffers).
        spec: Which axes each group permutes.
        perm: Group name -> index tensor of shape ``[n]``.

    Returns:
        A new dict with permuted tensors.
    """
    check_permutation(spec, perm, state_dict)
    out = dict(state_dict)
    for name, axes in spec.groups.items():
        for ax in axes:
            tensor = out[ax.key]
            index = expand(torch.as_tensor(perm[name]).to(tensor.device, torch.long), ax.block)
            out[ax.key] = tensor.index_select(ax.axis, index)
    return out


def invert(perm: Mapping[str, Tensor]) -> Permutation:
    """Inverse permutation of every group: ``apply(apply(theta, p), invert(p)) == theta``."""
    return {name: torch.argsort(torch.as_tensor(p)) for name, p in perm.items()}
