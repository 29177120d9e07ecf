"""Fully connected ReLU network on flattened images."""

from __future__ import annotations

from torch import Tensor, nn

from lmc_lightning.nets.layers import check_common, check_int
from lmc_lightning.nets.registry import register


class MLP(nn.Module):
    """``Flatten -> [Linear(width) -> ReLU] * depth -> Linear(num_classes)``, or hidden sizes from ``widths``.

    ``widths`` gives non-uniform nets, e.g. Anokhin & Yarotsky's ``Linear3NoBias`` (3072-6144-2000-10) is
    ``get_net("mlp", widths=[6144, 2000], bias=False)`` and ``LinearOneLayer100`` is ``widths=[100]``.

    Args:
        num_classes: Output size.
        in_channels: Input image channels.
        input_size: Input image height (= width); the first layer takes ``in_channels * input_size**2`` features.
        depth: Number of hidden layers (0 gives a linear classifier).
        width: Units per hidden layer.
        bias: Give every Linear layer a bias (False: a bias-free net).
        widths: Hidden layer sizes, one per hidden layer; when given, ``depth`` and ``width`` are ignored.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, input_size: int = 32, depth: int = 3,
                 width: int = 512, bias: bool = True, widths: list[int] | None = None) -> None:
        super().__init__()
        check_common(num_classes, in_channels, input_size)
        if widths is None:
            check_int("depth", depth, 0)
            check_int("width", width, 1)
            widths = [width] * depth
        for w in widths:
            check_int("widths entries", w, 1)
        layers: list[nn.Module] = []
        fan_in = in_channels * input_size**2
        for width in widths:
            layers += [nn.Linear(fan_in, width, bias=bias), nn.ReLU(inplace=False)]
            fan_in = width
        self.flatten = nn.Flatten()
        self.hidden = nn.Sequential(*layers)
        self.classifier = nn.Linear(fan_in, num_classes, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[B, num_classes]`` of images ``[B, C, H, W]``."""
        return self.classifier(self.hidden(self.flatten(x)))


register("mlp")(MLP)
