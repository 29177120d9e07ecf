"""Fixup ResNet-20 (Zhang et al., 2019): a residual net trained without normalisation layers."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lmc_lightning.nets.layers import check_common, check_width, scaled
from lmc_lightning.nets.registry import register


class FixupBlock(nn.Module):
    """``relu(scale * conv2(relu(conv1(x + b1a) + b1b) + b2a) + b2b + shortcut(x + b1a))``, with scalar biases.

    The shortcut is the identity, or a strided 1x1 conv (no bias) where the block changes resolution or channels (as
    in the library's other ResNets, so permutation specs stay simple).
    """

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.bias1a = nn.Parameter(torch.zeros(1))
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bias1b = nn.Parameter(torch.zeros(1))
        self.relu = nn.ReLU(inplace=False)
        self.bias2a = nn.Parameter(torch.zeros(1))
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.scale = nn.Parameter(torch.ones(1))
        self.bias2b = nn.Parameter(torch.zeros(1))
        downsample = stride != 1 or c_in != c_out
        self.shortcut = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False) if downsample else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """Block output."""
        x = x + self.bias1a
        out = self.relu(self.conv1(x) + self.bias1b)
        out = self.conv2(out + self.bias2a) * self.scale + self.bias2b
        return self.relu(out + self.shortcut(x))


class FixupResNet(nn.Module):
    """Fixup ResNet: stem conv, three stages of :class:`FixupBlock`, global average pooling, linear classifier.

    Fixup initialisation: each block's ``conv1`` He-normal scaled by ``L ** -0.5`` (``L`` blocks, two layers per
    branch), ``conv2`` and the classifier zero, scalar biases 0 and scales 1.

    Args:
        num_classes: Output size.
        in_channels: Input image channels.
        channels: Output channels of the three stages.
        blocks: Blocks per stage.
    """

    renorm_rule = "pre_norm"
    renorm_skip: tuple[str, ...] = ("stem.*", "*.shortcut")

    def __init__(self, num_classes: int, in_channels: int, channels: tuple[int, int, int], blocks: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, channels[0], 3, padding=1, bias=False), nn.ReLU())
        self.bias1 = nn.Parameter(torch.zeros(1))
        stages, c_in = [], channels[0]
        for i, c_out in enumerate(channels):
            stages.append(nn.Sequential(*(FixupBlock(c_in if j == 0 else c_out, c_out, 2 if (i and not j) else 1)
                                          for j in range(blocks))))
            c_in = c_out
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.bias2 = nn.Parameter(torch.zeros(1))
        self.classifier = nn.Linear(c_in, num_classes)
        num_blocks = 3 * blocks
        for m in self.modules():
            if isinstance(m, FixupBlock):
                w = m.conv1.weight
                nn.init.normal_(w, 0, math.sqrt(2 / (w.shape[0] * w[0, 0].numel())) * num_blocks ** -0.5)
                nn.init.zeros_(m.conv2.weight)
        nn.init.zeros_(self.classifier.weight)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[B, num_classes]``."""
        x = self.stages(self.stem(x) + self.bias1)
        return self.classifier(self.flatten(self.pool(x)) + self.bias2)


def resnet20_fixup(num_classes: int = 10, in_channels: int = 3, input_size: int = 32, width: float = 1.0
                   ) -> FixupResNet:
    """Fixup ResNet-20: 3 stages of 3 blocks with ``16/32/64 * width`` channels, no normalisation."""
    check_common(num_classes, in_channels, input_size)
    width = check_width(width)
    return FixupResNet(num_classes, in_channels, tuple(scaled(c, width) for c in (16, 32, 64)), 3)


register("resnet20_fixup")(resnet20_fixup)
