"""The nets of the modelsym seed (Godfrey et al., 2022): Myrtle CNNs and the option-A CIFAR ResNet-20.

Module names follow the seed's layout so that stitch points and sanity-test layers read the same: the Myrtle CNNs
are one flat ``nn.Sequential`` (module ``"i"`` is the seed's ``named_modules()`` index ``i + 1``), the ResNet has
``conv1/bn1/r1``, ``block_seq.i.{conv1,bn1,r1,conv2,bn2,shortcut,r2}`` and ``linear``.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F

from lmc_lightning.nets.layers import check_common, check_width, scaled
from lmc_lightning.nets.registry import register

ACTIVATIONS = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid}


class MyrtleCNN(nn.Sequential):
    """Myrtle CNN: conv-[BN]-act, then three conv-[BN]-act-maxpool2 stages, a final max-pool and a linear layer.

    The 2x2 pools use ``ceil_mode=True`` and the final pool is ``AdaptiveMaxPool2d(1)``: on 32x32 inputs this is
    exactly the seed's MaxPool2d(2) x3 + MaxPool2d(4); on 28x28 Fashion-MNIST (28 -> 14 -> 7 -> 4) it still ends
    on a 4x4 map.

    Args:
        num_classes: Output size.
        in_channels: Input image channels.
        channels: Output channels of the four 3x3 convs.
        norm: BatchNorm after each conv (bias-free convs, ``mCNN``) or none (convs with biases, ``mCNN_k``).
        activation: ``"relu"`` or ``"sigmoid"``.
    """

    def __init__(self, num_classes: int, in_channels: int, channels: tuple[int, int, int, int], norm: bool = True,
                 activation: str = "relu") -> None:
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}.")
        layers: list[nn.Module] = []
        c_in = in_channels
        for i, c_out in enumerate(channels):
            layers.append(nn.Conv2d(c_in, c_out, 3, padding=1, bias=not norm))
            if norm:
                layers.append(nn.BatchNorm2d(c_out))
            layers.append(ACTIVATIONS[activation]())
            if i > 0:
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            c_in = c_out
        layers += [nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes)]
        super().__init__(*layers)


def _myrtle(num_classes: int, in_channels: int, input_size: int, width: float, base: tuple[int, ...], norm: bool,
            activation: str) -> MyrtleCNN:
    check_common(num_classes, in_channels, input_size)
    width = check_width(width)
    return MyrtleCNN(num_classes, in_channels, tuple(scaled(c, width) for c in base), norm, activation)


def mcnn(num_classes: int = 10, in_channels: int = 3, input_size: int = 32, width: float = 1.0) -> MyrtleCNN:
    """The seed's ``mCNN``: conv 64/128/256/512 (times ``width``), BatchNorm, ReLU, bias-free convs."""
    return _myrtle(num_classes, in_channels, input_size, width, (64, 128, 256, 512), True, "relu")


def cwcnn(num_classes: int = 10, in_channels: int = 3, input_size: int = 32, width: float = 1.0) -> MyrtleCNN:
    """The seed's ``cwCNN``: ``mCNN`` at constant width 512 (times ``width``)."""
    return _myrtle(num_classes, in_channels, input_size, width, (512, 512, 512, 512), True, "relu")


def mcnn_k(num_classes: int = 10, in_channels: int = 3, input_size: int = 32, width: float = 1.0,
           activation: str = "relu") -> MyrtleCNN:
    """The seed's ``mCNN_k``: ``mCNN`` without BatchNorm, convs with biases; ``activation="sigmoid"`` is
    ``mCNN_k_sigmoid``."""
    return _myrtle(num_classes, in_channels, input_size, width, (64, 128, 256, 512), False, activation)


class PadShortcut(nn.Module):
    """Option-A shortcut: the identity, subsampled by ``stride`` and zero-padded to ``c_out`` channels (no weights)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.stride, self.before, self.after = stride, (c_out - c_in) // 2, c_out - c_in - (c_out - c_in) // 2

    def forward(self, x: Tensor) -> Tensor:
        """``x[:, :, ::stride, ::stride]`` with zero channels on both sides."""
        return F.pad(x[:, :, :: self.stride, :: self.stride], (0, 0, 0, 0, self.before, self.after))


class BlockA(nn.Module):
    """``r2(bn2(conv2(r1(bn1(conv1(x))))) + shortcut(x))`` with an option-A (zero-padded identity) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.r1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = PadShortcut(c_in, c_out, stride) if stride != 1 or c_in != c_out else nn.Identity()
        self.r2 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        """Block output."""
        return self.r2(self.bn2(self.conv2(self.r1(self.bn1(self.conv1(x))))) + self.shortcut(x))


class ResNetA(nn.Module):
    """He et al.'s CIFAR ResNet with option-A shortcuts, as in the modelsym seed (``resnet20``).

    Args:
        num_classes: Output size.
        in_channels: Input image channels.
        channels: Channels of the three stages.
        blocks: Blocks per stage.
    """

    def __init__(self, num_classes: int, in_channels: int, channels: tuple[int, int, int], blocks: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels[0])
        self.r1 = nn.ReLU()
        seq, c_in = [], channels[0]
        for i, c_out in enumerate(channels):
            for j in range(blocks):
                seq.append(BlockA(c_in, c_out, 2 if i > 0 and j == 0 else 1))
                c_in = c_out
        self.block_seq = nn.Sequential(*seq)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(c_in, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits."""
        return self.linear(self.flatten(self.pool(self.block_seq(self.r1(self.bn1(self.conv1(x)))))))


def resnet20_a(num_classes: int = 10, in_channels: int = 3, input_size: int = 32, width: float = 1.0) -> ResNetA:
    """Option-A CIFAR ResNet-20 of the modelsym seed: 16/32/64 channels (times ``width``), 19 ReLUs (PyTorch's
    default initialisation)."""
    check_common(num_classes, in_channels, input_size)
    width = check_width(width)
    return ResNetA(num_classes, in_channels, tuple(scaled(c, width) for c in (16, 32, 64)))


register("mcnn")(mcnn)
register("cwcnn")(cwcnn)
register("mcnn_k")(mcnn_k)
register("mcnn_k_sigmoid", activation="sigmoid")(mcnn_k)
register("resnet20_a")(resnet20_a)
