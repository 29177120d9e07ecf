"""Post-activation ResNets for small images: CIFAR ResNet-20 and ResNet-18 with a 3x3 stem and no max-pool."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from lmc_lightning.nets.layers import check_common, check_norm, check_width, init_weights, norm2d, scaled
from lmc_lightning.nets.registry import register


def conv_norm(c_in: int, c_out: int, kernel: int, stride: int, norm: str, bias: bool = True) -> list[nn.Module]:
    """A conv followed by its norm layer; the conv has a bias only when there is no norm (and ``bias``)."""
    conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=norm == "none" and bias)
    return [conv, *norm2d(norm, c_out)]


class BasicBlock(nn.Module):
    """``relu(residual(x) + shortcut(x))`` with ``residual = conv-norm-relu-conv-norm``.

    The shortcut is the identity, or a strided 1x1 conv + norm where the block changes resolution or channels, so
    every addition joins two tensors of one well-defined residual stream.
    """

    def __init__(self, c_in: int, c_out: int, stride: int, norm: str, bias: bool = True) -> None:
        super().__init__()
        self.residual = nn.Sequential(*conv_norm(c_in, c_out, 3, stride, norm, bias), nn.ReLU(inplace=False),
                                      *conv_norm(c_out, c_out, 3, 1, norm, bias))
        downsample = stride != 1 or c_in != c_out
        self.shortcut = (nn.Sequential(*conv_norm(c_in, c_out, 1, stride, norm, bias)) if downsample
                         else nn.Sequential())
        self.relu = nn.ReLU(inplace=False)

    def forward(self, x: Tensor) -> Tensor:
        """Block output, same batch size; spatial size divided by the stride."""
        return self.relu(self.residual(x) + self.shortcut(x))


class ResNet(nn.Module):
    """Stem conv, stages of ``BasicBlock``s (the first of each stage after the first has stride 2), global average
    pooling and a linear classifier.

    Args:
        num_classes: Output size.
        in_channels: Input image channels.
        stem_channels: Output channels of the 3x3 stem conv.
        stage_channels: Output channels of each stage.
        blocks: Number of blocks per stage.
        norm: ``"bn"``, ``"ln"`` (GroupNorm(1, C)), ``"cln"`` (channel LN) or ``"none"`` (plain net; convs then
            carry biases unless ``bias=False``).
        bias: With ``norm="none"``: give convs and the classifier biases.
        init: ``"default"``, ``"kaiming_normal"`` or ``"lecun_normal"`` (see ``layers.init_weights``).

    Re-normalisation (:mod:`lmc_lightning.weights.renorm`) corrects each block's two convs before their norms by
    default (``renorm_rule = "pre_norm"``, skipping the stem and shortcut convs), as the rethink-re-basin seed does.
    """

    renorm_rule = "pre_norm"
    renorm_skip: tuple[str, ...] = ("stem.*", "*.shortcut.*")

    def __init__(self, num_classes: int, in_channels: int, stem_channels: int, stage_channels: Sequence[int],
                 blocks: Sequence[int], norm: str = "bn", bias: bool = True, init: str = "default") -> None:
        super().__init__()
        check_norm(norm)
        if not bias and norm != "none":
            raise ValueError(f"bias=False builds a net without any bias, but norm='{norm}' layers carry one; use "
                             "norm='none' with bias=False.")
        self.stem = nn.Sequential(*conv_norm(in_channels, stem_channels, 3, 1, norm, bias), nn.ReLU(inplace=False))
        stages, c_in = [], stem_channels
        for i, (c_out, n) in enumerate(zip(stage_channels, blocks, strict=True)):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(*(BasicBlock(c_in if j == 0 else c_out, c_out, stride if j == 0 else 1, norm,
                                                     bias) for j in range(n))))
            c_in = c_out
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(c_in, num_classes, bias=bias)
        init_weights(self, init)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[B, num_classes]`` of images ``[B, C, H, W]``."""
        return self.classifier(self.flatten(self.pool(self.stages(self.stem(x)))))


def resnet20(num_classes: int = 10, in_channels: int = 3, input_size: int = 32, width: float = 1.0,
             norm: str = "bn", bias: bool = True, init: str = "default") -> ResNet:
    """CIFAR ResNet-20: 3 stages of 3 basic blocks with ``16/32/64 * width`` channels.

    Args:
        num_classes: Output size.
        in_channels: Input image channels.
        input_size: Input image side (unused; the net is size-agnostic).
        width: Channel multiplier.
        norm: ``"bn"``, ``"ln"`` (GroupNorm(1, C)), ``"cln"`` (channel LN) or ``"none"`` (plain ResNet).
        bias: With ``norm="none"``: biases in convs and classifier (``resnet20_nobias``: without).
        init: ``"default"``, ``"kaiming_normal"`` or ``"lecun_normal"``.
    """
    check_common(num_classes, in_channels, input_size)
    width = check_width(width)
    channels = [scaled(c, width) for c in (16, 32, 64)]
    return ResNet(num_classes, in_channels, channels[0], channels, [3, 3, 3], norm, bias, init)


def resnet18(num_classes: int = 10, in_channels: int = 3, input_size: int = 32, width: float = 1.0,
             norm: str = "bn") -> ResNet:
    """ResNet-18 for small images: 3x3 stem conv without max-pool, 4 stages of 2 basic blocks with
    ``64/128/256/512 * width`` channels.

    Args:
        num_classes: Output size.
        in_channels: Input image channels.
        input_size: Input image side (unused; the net is size-agnostic).
        width: Channel multiplier.
        norm: ``"bn"``, ``"ln"`` (GroupNorm(1, C)) or ``"none"``.
    """
    check_common(num_classes, in_channels, input_size)
    width = check_width(width)
    channels = [scaled(c, width) for c in (64, 128, 256, 512)]
    return ResNet(num_classes, in_channels, channels[0], channels, [2, 2, 2, 2], norm)


register("resnet20")(resnet20)
register("resnet20_ln", norm="ln")(resnet20)
register("resnet20_plain", norm="none")(resnet20)
register("resnet20_nobias", norm="none", bias=False)(resnet20)
register("resnet20_cln", norm="cln")(resnet20)
register("resnet18")(resnet18)
