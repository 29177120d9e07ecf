"""Pre-activation ResNet for CIFAR-sized images (He et al., "Identity Mappings in Deep Residual Networks")."""

from __future__ import annotations

from torch import Tensor, nn

from lmc_lightning.nets.layers import check_common, check_int, check_norm, check_width, norm2d, scaled
from lmc_lightning.nets.registry import register

BLOCKS = {"basic": (6, 1), "bottleneck": (9, 4)}  # layers per block group (depth = k * n + 2), channel expansion


def _act_conv(c_in: int, c_out: int, kernel: int, stride: int, norm: str) -> list[nn.Module]:
    """``norm -> relu -> conv``; the conv has a bias only when there is no norm."""
    conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=norm == "none")
    return [*norm2d(norm, c_in), nn.ReLU(inplace=False), conv]


class PreActBlock(nn.Module):
    """``residual(x) + shortcut(x)``, the residual branch starting with norm and ReLU and ending with a conv.

    ``basic``: two 3x3 convs. ``bottleneck``: 1x1 (to ``planes``), 3x3 (strided), 1x1 (to ``4 * planes``). The
    shortcut is the identity, or a strided 1x1 conv of the block input where the shape changes.
    """

    def __init__(self, c_in: int, planes: int, stride: int, norm: str, block: str) -> None:
        super().__init__()
        c_out = planes * BLOCKS[block][1]
        if block == "basic":
            layers = [*_act_conv(c_in, planes, 3, stride, norm), *_act_conv(planes, planes, 3, 1, norm)]
        else:
            layers = [*_act_conv(c_in, planes, 1, 1, norm), *_act_conv(planes, planes, 3, stride, norm),
                      *_act_conv(planes, c_out, 1, 1, norm)]
        self.residual = nn.Sequential(*layers)
        downsample = stride != 1 or c_in != c_out
        self.shortcut = (nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=norm == "none"))
                         if downsample else nn.Sequential())

    def forward(self, x: Tensor) -> Tensor:
        """Block output, same batch size; spatial size divided by the stride."""
        return self.residual(x) + self.shortcut(x)


class PreResNet(nn.Module):
    """CIFAR pre-activation ResNet: 3x3 stem conv, 3 stages of ``n`` blocks with ``16/32/64 * width`` planes,
    a final norm + ReLU, global average pooling and a linear classifier.

    Args:
        num_classes: Output size.
        in_channels: Input image channels.
        input_size: Input image side (unused; the net is size-agnostic).
        depth: Weight layers: ``6n + 2`` for basic blocks (20, 56, 110, ...), ``9n + 2`` for bottlenecks
            (164 is He et al.'s PreResNet-164).
        width: Multiplier of the 16/32/64 planes.
        norm: ``"bn"``, ``"ln"`` (GroupNorm(1, C)) or ``"none"`` (convs then carry biases).
        block: ``"basic"`` or ``"bottleneck"`` (expansion 4).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, input_size: int = 32, depth: int = 110,
                 width: float = 1.0, norm: str = "bn", block: str = "basic") -> None:
        super().__init__()
        check_common(num_classes, in_channels, input_size)
        width = check_width(width)
        check_norm(norm)
        if block not in BLOCKS:
            raise ValueError(f"block must be one of {sorted(BLOCKS)}, got {block!r}.")
        per_block, expansion = BLOCKS[block]
        check_int("depth", depth, per_block + 2)
        if (depth - 2) % per_block:
            raise ValueError(f"PreResNet with {block} blocks needs depth = {per_block}n + 2 (e.g. "
                             f"{per_block * 3 + 2}, {per_block * 18 + 2}), got {depth}.")
        n = (depth - 2) // per_block
        stem = scaled(16, width)
        self.stem = nn.Conv2d(in_channels, stem, 3, padding=1, bias=norm == "none")
        stages, c_in = [], stem
        for i, planes in enumerate(scaled(c, width) for c in (16, 32, 64)):
            blocks = []
            for j in range(n):
                blocks.append(PreActBlock(c_in, planes, 2 if i > 0 and j == 0 else 1, norm, block))
                c_in = planes * expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(*norm2d(norm, c_in), nn.ReLU(inplace=False), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(c_in, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[B, num_classes]`` of images ``[B, C, H, W]``."""
        return self.classifier(self.head(self.stages(self.stem(x))))


register("preresnet")(PreResNet)
