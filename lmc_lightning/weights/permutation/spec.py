"""Permutation specs: which weight axes share one permutation of hidden units."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from torch import Tensor


class Axis(NamedTuple):
    """One tensor axis moved by a permutation group.

    The axis has ``size * block`` entries laid out as ``[size, block]``: unit ``i`` of the group owns the ``block``
    consecutive entries ``i * block ... (i + 1) * block - 1``. ``block`` is 1 except for a classifier that reads a
    flattened ``[C, H, W]`` map, where each channel spans ``H * W`` features.
    """

    key: str
    axis: int
    block: int = 1


def _as_axis(entry: Axis | tuple) -> Axis:
    if isinstance(entry, Axis):
        return entry
    if not isinstance(entry, tuple | list) or len(entry) not in (2, 3):
        raise TypeError(f"A permutation spec entry must be (key, axis) or (key, axis, block), got {entry!r}.")
    return Axis(str(entry[0]), int(entry[1]), int(entry[2]) if len(entry) == 3 else 1)


@dataclass
class PermutationSpec:
    """Permutation groups of a network: group name -> the weight axes it permutes.

    Build one by hand (``PermutationSpec({"h1": [("fc1.weight", 0), ("fc1.bias", 0), ("fc2.weight", 1)]})``) or
    derive it from a network with :func:`~lmc_lightning.weights.permutation.derive_spec`.

    Args:
        groups: Group name -> list of ``(key, axis)`` or ``(key, axis, block)`` (see :class:`Axis`).
        activations: Group name -> points whose outputs carry the group's features (fx node names or module names),
            used by activation matching. Derived specs fill it; hand-written ones need it only for that method.
        buffers: Keys that are permuted but are not evidence for weight matching (BatchNorm running statistics).
    """

    groups: dict[str, list[Axis]]
    activations: dict[str, list[str]] = field(default_factory=dict)
    buffers: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        self.groups = {str(name): [_as_axis(e) for e in entries] for name, entries in self.groups.items()}
        self.activations = {str(k): list(v) for k, v in self.activations.items()}
        self.buffers = frozenset(self.buffers)
        seen: dict[tuple[str, int], str] = {}
        for name, entries in self.groups.items():
            if not entries:
                raise ValueError(f"Permutation group '{name}' has no axes; drop it or list its (key, axis) pairs.")
            for e in entries:
                if e.block < 1:
                    raise ValueError(f"Group '{name}': block of {e.key}[{e.axis}] must be >= 1, got {e.block}.")
                if (e.key, e.axis) in seen:
                    raise ValueError(f"Axis {e.axis} of '{e.key}' is listed twice (groups '{seen[(e.key, e.axis)]}' "
                                     f"and '{name}'); an axis can follow only one permutation.")
                seen[(e.key, e.axis)] = name
        unknown = sorted(set(self.activations) - set(self.groups))
        if unknown:
            raise ValueError(f"activations name groups {unknown} that are not in the spec.")

    @property
    def keys(self) -> set[str]:
        """All state-dict keys that some group permutes."""
        return {e.key for entries in self.groups.values() for e in entries}

    def by_key(self) -> dict[str, list[tuple[str, Axis]]]:
        """Key -> list of ``(group, axis)`` that permute it."""
        out: dict[str, list[tuple[str, Axis]]] = {}
        for name, entries in self.groups.items():
            for e in entries:
                out.setdefault(e.key, []).append((name, e))
        return out

    def sizes(self, theta: Mapping[str, Tensor]) -> dict[str, int]:
        """Number of units of each group in weight dict ``theta``, checking every axis agrees.

        Raises:
            ValueError: A key is missing, an axis is out of range or its length does not match the group.
        """
        sizes: dict[str, int] = {}
        for name, entries in self.groups.items():
            for e in entries:
                if e.key not in theta:
                    raise ValueError(f"Permutation group '{name}' names '{e.key}', which is not in the weight dict. "
                                     "Check that the spec was made for this architecture.")
                shape = theta[e.key].shape
                if not -len(shape) <= e.axis < len(shape):
                    raise ValueError(f"Group '{name}': '{e.key}' has shape {tuple(shape)}, no axis {e.axis}.")
                length = shape[e.axis]
                if length % e.block:
                    raise ValueError(f"Group '{name}': axis {e.axis} of '{e.key}' has {length} entries, not a "
                                     f"multiple of block {e.block}.")
                n = sizes.setdefault(name, length // e.block)
                if n != length // e.block:
                    raise ValueError(f"Group '{name}' has {n} units but axis {e.axis} of '{e.key}' holds "
                                     f"{length // e.block} (shape {tuple(shape)}, block {e.block}).")
        return sizes

    def __str__(self) -> str:
        lines = [f"PermutationSpec with {len(self.groups)} group(s):"]
        for name, entries in self.groups.items():
            axes = ", ".join(f"{e.key}[{e.axis}]" + (f"x{e.block}" if e.block > 1 else "") for e in entries)
            lines.append(f"  {name}: {axes}")
            if self.activations.get(name):
                lines.append(f"    activations at: {', '.join(self.activations[name])}")
        return "\n".join(lines)

