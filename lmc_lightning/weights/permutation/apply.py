"""Apply a permutation to a weight dict."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from lmc_lightning.weights.permutation.spec import AxisLike, PermutationSpec

Permutation = dict[str, Tensor]


def expand(index: Tensor, block: int) -> Tensor:
    """Index of an axis whose units span ``block`` consecutive entries each."""
    if block == 1:
        return index
    return (index[:, None] * block + torch.arange(block, device=index.device)).reshape(-1)


def axis_index(entries: list[tuple[str, AxisLike]], perm: Mapping[str, Tensor], length: int,
               device: torch.device | str = "cpu") -> Tensor:
    """Index of one tensor axis of ``length`` entries moved by ``entries`` (``(group, axis)`` pairs of that axis).

    Each entry's segment is permuted by its group's permutation; entries outside every segment stay in place.
    """
    if len(entries) == 1 and entries[0][1].offset == 0 and entries[0][1].length is None:
        group, ax = entries[0]
        return expand(torch.as_tensor(perm[group]).to(device, torch.long), ax.block)
    index = torch.arange(length, device=device)
    for group, ax in entries:
        moved = expand(torch.as_tensor(perm[group]).to(device, torch.long), ax.block)
        index[ax.offset:ax.offset + len(moved)] = ax.offset + moved
    return index


def by_axis(spec: PermutationSpec) -> dict[tuple[str, int], list[tuple[str, AxisLike]]]:
    """``(key, axis)`` -> the ``(group, axis)`` entries that move it (several for a concatenated input)."""
    out: dict[tuple[str, int], list[tuple[str, AxisLike]]] = {}
    for group, axes in spec.groups.items():
        for ax in axes:
            out.setdefault((ax.key, ax.axis), []).append((group, ax))
    return out


def random_permutation(spec: PermutationSpec, theta: Mapping[str, Tensor],
                       generator: torch.Generator | None = None) -> Permutation:
    """A uniformly random permutation of every group that respects the spec's head ties.

    Tied groups share one random permutation of their heads; within a head, units are shuffled where allowed.
    """
    sizes = spec.sizes(theta)
    out: Permutation = {}
    for members in spec.units():
        head = spec.heads.get(members[0])
        if head is None:
            out[members[0]] = torch.randperm(sizes[members[0]], generator=generator)
            continue
        order = torch.randperm(head.n_heads, generator=generator)
        for group in members:
            h = spec.heads[group]
            d = sizes[group] // h.n_heads
            within = [torch.randperm(d, generator=generator) if h.within else torch.arange(d) for _ in order]
            out[group] = torch.cat([order[i] * d + within[i] for i in range(h.n_heads)])
    return out


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
    for (key, axis), entries in by_axis(spec).items():
        tensor = out[key]
        out[key] = tensor.index_select(axis, axis_index(entries, perm, tensor.shape[axis], tensor.device))
    return out


def invert(perm: Mapping[str, Tensor]) -> Permutation:
    """Inverse permutation of every group: ``apply(apply(theta, p), invert(p)) == theta``."""
    return {name: torch.argsort(torch.as_tensor(p)) for name, p in perm.items()}
