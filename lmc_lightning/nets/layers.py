"""Small building blocks shared by the architectures: argument checks, width scaling, norm layers."""

from __future__ import annotations

from numbers import Real

from torch import nn

NORMS = ("bn", "ln", "none")


def check_int(name: str, value: object, minimum: int) -> int:
    """Return ``value`` if it is an int >= ``minimum``, else raise a ValueError naming the argument."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return value


def check_common(num_classes: int, in_channels: int, input_size: int) -> None:
    """Validate the arguments every net receives."""
    check_int("num_classes", num_classes, 1)
    check_int("in_channels", in_channels, 1)
    check_int("input_size", input_size, 1)


def check_width(width: object) -> float:
    """Return the width multiplier if it is a positive number, else raise a ValueError."""
    if isinstance(width, bool) or not isinstance(width, Real) or not width > 0:
        raise ValueError(f"width must be a positive number (a multiplier of the channel counts), got {width!r}.")
    return float(width)


def check_norm(norm: object) -> str:
    """Return ``norm`` if it is one of ``NORMS``, else raise a ValueError listing them."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS} ('none' = plain net without normalisation), got {norm!r}.")
    return norm  # type: ignore[return-value]


def scaled(channels: int, width: float) -> int:
    """Channel count ``channels * width`` rounded to the nearest integer, at least 1."""
    return max(1, round(channels * width))


def norm2d(norm: str, channels: int) -> list[nn.Module]:
    """Normalisation for a ``[B, C, H, W]`` map, as a list (empty for ``"none"``) to splice into a Sequential.

    ``"bn"`` is ``BatchNorm2d``. ``"ln"`` is ``GroupNorm(1, C)``: layer normalisation over the whole ``(C, H, W)``
    map of each sample, with a per-channel affine weight and bias. It is a standard module, invariant to permuting
    channels, and its parameters permute with the channels like BatchNorm's, which keeps permutation alignment simple.
    """
    if norm == "bn":
        return [nn.BatchNorm2d(channels)]
    if norm == "ln":
        return [nn.GroupNorm(1, channels)]
    return []
