"""CIFAR-style VGG: conv stack, global average pooling, one linear classifier."""

from __future__ import annotations

from torch import Tensor, nn

from lmc_lightning.nets.layers import INITS, check_common, check_norm, check_width, init_weights, norm2d, scaled
from lmc_lightning.nets.registry import register

# Output channels of the 3x3 convs; "M" is a 2x2 max-pool.
CONFIGS: dict[int, list[int | str]] = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}
HEADS = ("global", "seed")


class VGG(nn.Module):
    """VGG-11/13/16/19 for small images.

    Max-pools use ``ceil_mode=True`` so that inputs whose side is not a power of two (28x28) never shrink to zero;
    on 32x32 and 64x64 inputs this is the usual 2x2 pooling. With ``head="global"`` all five max-pools are kept and
    an adaptive average pool before the classifier makes the net run on any input size. ``head="seed"`` is the
    rethink-re-basin seed's VGG: four max-pools (the last one dropped), then ``AvgPool2d(2)`` (``ceil_mode``, so that
    inputs of 16 pixels or fewer still give a 1x1 map) and one linear layer over the flattened map (1x1 for 28x28 and
    32x32 inputs; ``input_size`` sets the classifier's width).

    Args:
        num_classes: Output size.
        in_channels: Input image channels.
        input_size: Input image side (unused: the net is size-agnostic; accepted for a uniform registry).
        depth: 11, 13, 16 or 19 weight layers.
        width: Multiplier of the 64/128/256/512 channel counts.
        norm: ``"bn"`` (BatchNorm2d), ``"ln"`` (GroupNorm(1, C), see ``layers.norm2d``), ``"cln"`` (the seed's
            channel LayerNorm at each pixel) or ``"none"``, after each conv.
        bias: Give convs and the classifier biases; False needs ``norm="none"`` (a net without any bias).
        init: ``"default"`` (PyTorch's), ``"kaiming_normal"`` (the seed's ``vgg_init``: convs ~ Kaiming normal
            fan-out, classifier ~ N(0, 0.01), biases 0, norm weights 1) or ``"lecun_normal"`` (N(0, 1/fan_in)).
        head: ``"global"`` (five max-pools, global average pool) or ``"seed"`` (four max-pools, ``AvgPool2d(2)``).

    Re-normalisation (:mod:`lmc_lightning.weights.renorm`) corrects every conv's output before its norm by default
    (``renorm_rule = "pre_norm"``), as the rethink-re-basin seed does for its VGGs.
    """

    renorm_rule = "pre_norm"
    renorm_skip: tuple[str, ...] = ()

    def __init__(self, num_classes: int = 10, in_channels: int = 3, input_size: int = 32, depth: int = 16,
                 width: float = 1.0, norm: str = "none", bias: bool = True, init: str = "default",
                 head: str = "global") -> None:
        super().__init__()
        check_common(num_classes, in_channels, input_size)
        if depth not in CONFIGS:
            raise ValueError(f"VGG depth must be one of {sorted(CONFIGS)}, got {depth!r}.")
        width = check_width(width)
        check_norm(norm)
        if not bias and norm != "none":
            raise ValueError(f"bias=False builds a net without any bias, but norm='{norm}' layers carry one; "
                             "use norm='none' with bias=False.")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}.")
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}.")
        config = CONFIGS[depth][:-1] if head == "seed" else CONFIGS[depth]
        side = input_size
        for _ in range(config.count("M")):
            side = -(-side // 2)
        layers: list[nn.Module] = []
        channels = in_channels
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(2, stride=2, ceil_mode=True))
                continue
            out = scaled(int(item), width)
            layers += [nn.Conv2d(channels, out, 3, padding=1, bias=bias), *norm2d(norm, out), nn.ReLU(inplace=False)]
            channels = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AvgPool2d(2, ceil_mode=True) if head == "seed" else nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(channels * (-(-side // 2)) ** 2 if head == "seed" else channels, num_classes,
                                    bias=bias)
        init_weights(self, init)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[B, num_classes]`` of images ``[B, C, H, W]``."""
        return self.classifier(self.flatten(self.pool(self.features(x))))


for _depth in CONFIGS:
    register(f"vgg{_depth}", depth=_depth)(VGG)
    register(f"vgg{_depth}_bn", depth=_depth, norm="bn")(VGG)
    register(f"vgg{_depth}_ln", depth=_depth, norm="ln")(VGG)
    register(f"vgg{_depth}_nobias", depth=_depth, bias=False)(VGG)
    register(f"vgg{_depth}_seed", depth=_depth, head="seed")(VGG)
    register(f"vgg{_depth}_bn_seed", depth=_depth, norm="bn", head="seed")(VGG)
    register(f"vgg{_depth}_ln_seed", depth=_depth, norm="cln", head="seed")(VGG)
    register(f"vgg{_depth}_nobias_seed", depth=_depth, bias=False, head="seed")(VGG)
