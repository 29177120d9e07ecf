"""A MobileNetV2-style net for small images: inverted residual blocks with depthwise 3x3 convs."""

from __future__ import annotations

from torch import Tensor, nn

from lmc_lightning.nets.layers import check_common, check_int, check_width, scaled
from lmc_lightning.nets.registry import register

#: (expansion, output channels, blocks, first stride) per stage, scaled down from MobileNetV2 for 32x32 inputs.
STAGES = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 2, 2), (6, 64, 2, 2), (6, 96, 1, 1))


def conv_bn(c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True) -> list[nn.Module]:
    """Conv (no bias), BatchNorm and (optionally) ReLU6."""
    layers = [nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(c_out)]
    return layers + ([nn.ReLU6()] if act else [])


class InvertedResidual(nn.Module):
    """1x1 expansion, 3x3 depthwise conv, linear 1x1 projection; ``x +`` the block where shapes allow.

    ``groups`` > 1 makes the two pointwise convs grouped convs (channel counts are rounded up to multiples of it).
    """

    def __init__(self, c_in: int, c_out: int, stride: int, expansion: int, groups: int = 1) -> None:
        super().__init__()
        hidden = c_in * expansion
        layers = conv_bn(c_in, hidden, 1, groups=groups) if expansion != 1 else []
        layers += conv_bn(hidden, hidden, 3, stride, groups=hidden)
        layers += conv_bn(hidden, c_out, 1, groups=groups, act=False)
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: Tensor) -> Tensor:
        """Block output; spatial size divided by the stride."""
        return x + self.block(x) if self.residual else self.block(x)


class MobileNetV2(nn.Module):
    """Stem conv, inverted residual stages (``STAGES``), 1x1 head conv, global average pooling, linear classifier.

    Args:
        num_classes: Output size.
        in_channels: Input image channels.
        input_size: Input image height (= width); unused (global pooling), kept for the registry.
        width: Channel multiplier.
        groups: Groups of the pointwise convs inside the blocks (1: plain MobileNetV2).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, input_size: int = 32, width: float = 1.0,
                 groups: int = 1) -> None:
        super().__init__()
        check_common(num_classes, in_channels, input_size)
        check_width(width)
        check_int("groups", groups, 1)

        def ch(c: int) -> int:
            return -(-scaled(c, width) // groups) * groups

        c_in = ch(32)
        layers: list[nn.Module] = [*conv_bn(in_channels, c_in, 3)]
        for expansion, c, n, stride in STAGES:
            for i in range(n):
                layers.append(InvertedResidual(c_in, ch(c), stride if i == 0 else 1, expansion, groups))
                c_in = ch(c)
        head = ch(320)
        self.features = nn.Sequential(*layers, *conv_bn(c_in, head, 1))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(head, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[B, num_classes]`` of images ``[B, C, H, W]``."""
        return self.classifier(self.flatten(self.pool(self.features(x))))


register("mobilenetv2")(MobileNetV2)
register("mobilenetv2_grouped", groups=2)(MobileNetV2)
