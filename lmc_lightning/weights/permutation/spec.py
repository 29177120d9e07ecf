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

    @property
    def offset(self) -> int:
        """First entry moved (0: the whole axis)."""
        return 0

    @property
    def length(self) -> int | None:
        """Entries moved (None: to the end of the axis)."""
        return None


class Segment(NamedTuple):
    """A segment of a tensor axis moved by a permutation group: entries ``offset ... offset + length - 1``.

    Laid out like :class:`Axis` within the segment. A layer reading ``torch.cat([a, b], dim=1)`` has one segment of
    its input axis in ``a``'s group and the next in ``b``'s.
    """

    key: str
    axis: int
    block: int
    offset: int
    length: int


AxisLike = Axis | Segment


def _as_axis(entry: AxisLike | tuple) -> AxisLike:
    if isinstance(entry, Axis | Segment):
        return entry
    if not isinstance(entry, tuple | list) or len(entry) not in (2, 3, 5):
        raise TypeError(f"A permutation spec entry must be (key, axis), (key, axis, block) or "
                        f"(key, axis, block, offset, length), got {entry!r}.")
    if len(entry) == 5:
        return Segment(str(entry[0]), *(int(e) for e in entry[1:]))
    return Axis(str(entry[0]), int(entry[1]), int(entry[2]) if len(entry) == 3 else 1)


class Heads(NamedTuple):
    """Head structure of a group: its units form ``n_heads`` heads of equal size, permuted as blocks.

    Groups with the same ``tie`` must move their heads by one shared head permutation (the query/key and the
    value/output groups of one attention layer; the input and output channels of a grouped conv). Within a head the
    units are permuted freely (``within=True``) or kept in order (``within=False``: the input of a grouped conv).
    """

    tie: str
    n_heads: int
    within: bool = True


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
        heads: Group name -> :class:`Heads` (or ``(tie, n_heads, within)``) for groups whose permutations are
            constrained to move whole heads, tied across groups.
    """

    groups: dict[str, list[AxisLike]]
    activations: dict[str, list[str]] = field(default_factory=dict)
    buffers: frozenset[str] = frozenset()
    heads: dict[str, Heads] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.groups = {str(name): [_as_axis(e) for e in entries] for name, entries in self.groups.items()}
        self.activations = {str(k): list(v) for k, v in self.activations.items()}
        self.buffers = frozenset(self.buffers)
        self.heads = {str(k): Heads(*v) for k, v in self.heads.items()}
        seen: dict[tuple[str, int, int], str] = {}
        for name, entries in self.groups.items():
            if not entries:
                raise ValueError(f"Permutation group '{name}' has no axes; drop it or list its (key, axis) pairs.")
            for e in entries:
                if e.block < 1 or e.offset < 0 or (e.length is not None and e.length < 1):
                    raise ValueError(f"Group '{name}': {e.key}[{e.axis}] needs block >= 1, offset >= 0 and length "
                                     f">= 1 (or None), got block {e.block}, offset {e.offset}, length {e.length}.")
                if (e.key, e.axis, e.offset) in seen:
                    raise ValueError(f"Axis {e.axis} of '{e.key}' is listed twice (groups "
                                     f"'{seen[(e.key, e.axis, e.offset)]}' and '{name}'); an axis can follow only "
                                     "one permutation.")
                seen[(e.key, e.axis, e.offset)] = name
        unknown = sorted((set(self.activations) | set(self.heads)) - set(self.groups))
        if unknown:
            raise ValueError(f"activations or heads name groups {unknown} that are not in the spec.")

    def ties(self) -> dict[str, list[str]]:
        """Tie name -> the groups whose heads move together (groups without heads are not listed)."""
        out: dict[str, list[str]] = {}
        for group, h in self.heads.items():
            out.setdefault(h.tie, []).append(group)
        return out

    def units(self) -> list[list[str]]:
        """The steps of a matcher: each untied group alone, each tie's groups together (spec order)."""
        ties = self.ties()
        out, done = [], set()
        for group in self.groups:
            if group in done:
                continue
            members = ties[self.heads[group].tie] if group in self.heads else [group]
            done.update(members)
            out.append(members)
        return out

    @property
    def keys(self) -> set[str]:
        """All state-dict keys that some group permutes."""
        return {e.key for entries in self.groups.values() for e in entries}

    def by_key(self) -> dict[str, list[tuple[str, AxisLike]]]:
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
                length = e.length if e.length is not None else shape[e.axis] - e.offset
                if e.offset + length > shape[e.axis] or length < 1:
                    raise ValueError(f"Group '{name}': segment [{e.offset}, {e.offset + length}) of axis {e.axis} "
                                     f"of '{e.key}' lies outside its shape {tuple(shape)}.")
                if length % e.block:
                    raise ValueError(f"Group '{name}': axis {e.axis} of '{e.key}' has {length} entries, not a "
                                     f"multiple of block {e.block}.")
                n = sizes.setdefault(name, length // e.block)
                if n != length // e.block:
                    raise ValueError(f"Group '{name}' has {n} units but axis {e.axis} of '{e.key}' holds "
                                     f"{length // e.block} (shape {tuple(shape)}, block {e.block}).")
        for name, h in self.heads.items():
            if sizes[name] % h.n_heads:
                raise ValueError(f"Group '{name}' has {sizes[name]} units, not a multiple of its {h.n_heads} heads.")
        return sizes

    def __str__(self) -> str:
        lines = [f"PermutationSpec with {len(self.groups)} group(s):"]
        for name, entries in self.groups.items():
            axes = ", ".join(f"{e.key}[{e.axis}]" + (f"x{e.block}" if e.block > 1 else "")
                             + (f"@{e.offset}" if e.offset or e.length is not None else "") for e in entries)
            heads = self.heads.get(name)
            lines.append(f"  {name}: {axes}" + (f"  (heads: {heads.n_heads}, tie {heads.tie}"
                                                 + ("" if heads.within else ", in order within heads") + ")"
                                                 if heads else ""))
            if self.activations.get(name):
                lines.append(f"    activations at: {', '.join(self.activations[name])}")
        return "\n".join(lines)

