"""Small building blocks shared by the architectures: argument checks, width scaling, norm layers."""

from __future__ import annotations

from numbers import Real

from torch import Tensor, nn

NORMS = ("bn", "ln", "cln", "none")
INITS = ("default", "kaiming_normal", "lecun_normal")


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


class ChannelLayerNorm(nn.LayerNorm):
    """Layer normalisation over the channels at each pixel of a ``[B, C, H, W]`` map (the rethink-re-basin seed's
    LN), with a per-channel affine weight and bias; a ``LayerNorm(C)`` applied channels-last. ``channel_norm``
    tells permutation tracing that it acts per channel."""

    channel_norm = True

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__(channels, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        """Normalised map, same shape."""
        return super().forward(x.movedim(1, -1)).movedim(-1, 1)


def init_weights(net: nn.Module, init: str) -> None:
    """Re-initialise conv and linear layers: ``"default"`` (PyTorch's, unchanged); ``"kaiming_normal"`` (the seed's
    ``vgg_init``: convs Kaiming normal fan-out, linear N(0, 0.01), biases 0, norm weights 1); ``"lecun_normal"``
    (weights N(0, 1 / fan_in), biases 0, norm weights 1)."""
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}.")
    if init == "default":
        return
    for module in net.modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            if init == "lecun_normal":
                fan_in = module.weight[0].numel()
                nn.init.normal_(module.weight, 0.0, fan_in**-0.5)
            elif isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            else:
                nn.init.normal_(module.weight, 0.0, 0.01)
        elif isinstance(module, nn.BatchNorm2d | nn.GroupNorm | nn.LayerNorm) and module.weight is not None:
            nn.init.ones_(module.weight)
        if isinstance(module, nn.Conv2d | nn.Linear | nn.BatchNorm2d | nn.GroupNorm | nn.LayerNorm) and getattr(
                module, "bias", None) is not None:
            nn.init.zeros_(module.bias)


def norm2d(norm: str, channels: int) -> list[nn.Module]:
    """Normalisation for a ``[B, C, H, W]`` map, as a list (empty for ``"none"``) to splice into a Sequential.

    ``"bn"`` is ``BatchNorm2d``. ``"ln"`` is ``GroupNorm(1, C)``: layer normalisation over the whole ``(C, H, W)``
    map of each sample, with a per-channel affine weight and bias. It is a standard module, invariant to permuting
    channels, and its parameters permute with the channels like BatchNorm's, which keeps permutation alignment simple.
    ``"cln"`` is :class:`ChannelLayerNorm`, the seed's LN: over the channels at each pixel.
    """
    if norm == "bn":
        return [nn.BatchNorm2d(channels)]
    if norm == "ln":
        return [nn.GroupNorm(1, channels)]
    if norm == "cln":
        return [ChannelLayerNorm(channels)]
    return []
