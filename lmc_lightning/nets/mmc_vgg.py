"""MMC's "VGG-13" (Lubana et al., ICML 2023): ten bias-free conv+BN+ReLU blocks, stride-2 downsampling, no max-pool.

As in seed 000 (upstream ``VGGmodel``): channel plan ``[64, (64, s2), 128, (128, s2), 256, (256, s2), 512, (512, s2),
512, 512]`` of 3x3 convs without bias, each followed by an affine BatchNorm2d and a ReLU; a 32x32 input ends as a
2x2 map, then global average pooling and one ``Linear`` (with bias). It differs from ``vgg13_bn`` (5 max-pools, a
1x1 final map, conv biases before BN), which is this library's own VGG-13-BN.
"""

from __future__ import annotations

from torch import Tensor, nn

from lmc_lightning.nets.layers import check_common, check_width, scaled
from lmc_lightning.nets.registry import register

PLAN: tuple[tuple[int, int], ...] = ((64, 1), (64, 2), (128, 1), (128, 2), (256, 1), (256, 2), (512, 1), (512, 2),
                                     (512, 1), (512, 1))
"""``(channels, stride)`` of the ten conv blocks."""


class MMCVGG(nn.Module):
    """MMC's VGG-13: ``features`` (10 conv-BN-ReLU blocks), ``pool`` (global average), ``flatten``, ``classifier``.

    Args:
        num_classes: Output size.
        in_channels: Input image channels.
        input_size: Input image side (unused: the net is size-agnostic; accepted for a uniform registry).
        width: Multiplier of the channel counts (1.0 = the seed's net).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, input_size: int = 32, width: float = 1.0) -> None:
        super().__init__()
        check_common(num_classes, in_channels, input_size)
        width = check_width(width)
        layers: list[nn.Module] = []
        channels = in_channels
        for out, stride in PLAN:
            out = scaled(out, width)
            layers += [nn.Conv2d(channels, out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(out),
                       nn.ReLU(inplace=False)]
            channels = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[B, num_classes]`` of images ``[B, C, H, W]``."""
        return self.classifier(self.flatten(self.pool(self.features(x))))


register("vgg13_mmc")(MMCVGG)
