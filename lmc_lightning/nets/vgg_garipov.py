"""Garipov et al.'s VGG16 (as in Anokhin & Yarotsky's ``models/vgg.py``): no normalisation, conv bias, 3-layer head."""

from __future__ import annotations

import math

from torch import Tensor, nn

from lmc_lightning.nets.layers import check_common, check_width, scaled
from lmc_lightning.nets.registry import register
from lmc_lightning.nets.vgg import CONFIGS


class GaripovVGG(nn.Module):
    """``features`` (13 conv3x3+bias -> ReLU, 5 max-pools) -> ``classifier`` (Dropout, Linear(512, 512), ReLU,
    Dropout, Linear(512, 512), ReLU, Linear(512, num_classes)).

    Conv weights are drawn from ``N(0, sqrt(2 / (9 * out_channels)))`` with zero bias, as in the seed. Max-pools use
    ``ceil_mode=True`` so that 28x28 inputs reach 1x1 (on 32x32 inputs this is the seed's pooling); the classifier
    takes ``512 * s * s`` features, ``s`` the final side (1 on 28x28 and 32x32).

    Args:
        num_classes: Output size.
        in_channels: Input channels.
        input_size: Input side.
        depth: 11, 13, 16 or 19 conv+linear layers of the VGG config (16: the seed's VGG16).
        dropout: Dropout probability in the classifier (0.5 in torch's default, as in the seed).
        width: Multiplier of every channel count and of the 512-unit classifier layers (1: the seed's net).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, input_size: int = 32, depth: int = 16,
                 dropout: float = 0.5, width: float = 1.0) -> None:
        super().__init__()
        check_common(num_classes, in_channels, input_size)
        if depth not in CONFIGS:
            raise ValueError(f"depth must be one of {sorted(CONFIGS)}, got {depth!r}.")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}.")
        width = check_width(width)
        hidden = scaled(512, width)
        layers: list[nn.Module] = []
        channels, side = in_channels, input_size
        for item in CONFIGS[depth]:
            if item == "M":
                layers.append(nn.MaxPool2d(2, stride=2, ceil_mode=True))
                side = math.ceil(side / 2)
                continue
            out = scaled(int(item), width)
            conv = nn.Conv2d(channels, out, 3, padding=1)
            nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / (9 * out)))
            nn.init.zeros_(conv.bias)
            layers += [conv, nn.ReLU(inplace=False)]
            channels = out
        self.features = nn.Sequential(*layers)
        self.flatten = nn.Flatten()
        self.classifier = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(channels * side * side, hidden), nn.ReLU(inplace=False),
            nn.Dropout(dropout), nn.Linear(hidden, hidden), nn.ReLU(inplace=False), nn.Linear(hidden, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[B, num_classes]`` of images ``[B, C, H, W]``."""
        return self.classifier(self.flatten(self.features(x)))


register("vgg16_garipov", depth=16)(GaripovVGG)
register("vgg_garipov")(GaripovVGG)
