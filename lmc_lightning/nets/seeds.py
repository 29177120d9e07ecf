"""The seeds' ImageNet-style nets: torchvision ``vgg16`` / ``resnet18`` / ``mobilenet_v2`` and timm's ViT-S/16.

MCSurface (seed 001) trains torchvision's ``vgg16`` (no BN, ``AdaptiveAvgPool(7, 7)``, 4096-4096 classifier with
dropout), ``resnet18`` (ImageNet stem: 7x7 stride-2 conv and max-pool, also on 32x32 images), ImageNet-pretrained
``mobilenet_v2`` and timm's ``vit_small_patch16_224`` with inputs resized to 224. These factories build exactly those
modules, so their state-dict keys are torchvision's and timm's own (MCSurface's ``model_state_dict`` loads as is; for
the resized ViT, whose net sits under ``model.``, use the ``mcsurface_vit`` key map).

Pretrained weights cannot be downloaded here: pass ``weights=PATH`` to a torchvision/timm state dict file (for
example the ImageNet checkpoint, saved as a plain state dict); it is loaded into the net with its original head
before the classifier is replaced by a fresh one of ``num_classes`` outputs (as MCSurface does).

Names: ``tv_vgg16``, ``tv_resnet18``, ``tv_mobilenet_v2`` and, when ``timm`` is installed (``pip install
'lmc_lightning[timm]'``), ``timm_vit_small_patch16_224``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmc_lightning.nets.layers import check_common
from lmc_lightning.nets.registry import register

INITS = ("default", "kaiming_fan_out")


def kaiming_fan_out_(net: nn.Module) -> nn.Module:
    """MCSurface's init: Kaiming-normal (fan_out, ReLU gain) for every Conv2d **and** Linear weight, biases 0."""
    for module in net.modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    return net


class Resize(nn.Module):
    """Resize ``[B, C, H, W]`` to ``size x size`` (bilinear, antialiased, as ``transforms.Resize``); inputs of that
    size pass unchanged. It acts on the spatial axes only (``spatial_only``: the permutation tracer keeps it a leaf
    and passes the channels through)."""

    spatial_only = True

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = int(size)

    def forward(self, x: Tensor) -> Tensor:
        """The resized images."""
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        return x


class ResizeInput(nn.Module):
    """Resize ``[B, C, H, W]`` inputs to ``size x size`` (:class:`Resize`) before ``model``."""

    def __init__(self, model: nn.Module, size: int) -> None:
        super().__init__()
        self.size = int(size)
        self.resize = Resize(size)
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        """Logits of the resized images."""
        return self.model(self.resize(x))


def _load_pretrained(net: nn.Module, weights: str) -> None:
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"Pretrained weights not found: {path}. Pass the path of a state dict file saved "
                                "from torchvision/timm (weights cannot be downloaded here).")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"Pretrained weights {path} do not fit the net: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}; pass the state dict of the same architecture with its original head.")


def _first_conv(net: nn.Module, in_channels: int) -> None:
    """Replace the first Conv2d by one taking ``in_channels`` (same kernel, stride, padding; fresh weights)."""
    for parent in net.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                if child.in_channels != in_channels:
                    setattr(parent, name, nn.Conv2d(in_channels, child.out_channels, child.kernel_size, child.stride,
                                                    child.padding, bias=child.bias is not None))
                return


def _build(make: Callable[[int], nn.Module], set_head: Callable[[nn.Module, int], None], num_classes: int,
           in_channels: int, weights: str | None, init: str, head_classes: int = 1000) -> nn.Module:
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}.")
    if weights is not None and init != "default":
        raise ValueError("weights= loads pretrained weights; init='kaiming_fan_out' would overwrite them. Use one.")
    if weights is None:
        net = make(num_classes)
        if init == "kaiming_fan_out":
            kaiming_fan_out_(net)
    else:
        net = make(head_classes)
        _load_pretrained(net, weights)
        if num_classes != head_classes:
            set_head(net, num_classes)
    if in_channels != 3:
        _first_conv(net, in_channels)
    return net


def _linear_head(attr: str, index: int | None = None) -> Callable[[nn.Module, int], None]:
    def set_head(net: nn.Module, num_classes: int) -> None:
        holder = getattr(net, attr)
        old = holder[index] if index is not None else holder
        new = nn.Linear(old.in_features, num_classes)
        if index is not None:
            holder[index] = new
        else:
            setattr(net, attr, new)

    return set_head


@register("tv_vgg16")
def tv_vgg16(num_classes: int = 10, in_channels: int = 3, input_size: int = 32, weights: str | None = None,
             init: str = "default") -> nn.Module:
    """torchvision ``vgg16``: 13 convs without BN, ``AdaptiveAvgPool(7, 7)``, 25088-4096-4096-C with dropout 0.5.

    Args:
        num_classes: Output size.
        in_channels: Input channels (the first conv is rebuilt for other than 3).
        input_size: Input side (unused; the net is size-agnostic).
        weights: Pretrained state dict file (1000-class head; the head is replaced).
        init: ``"default"`` (torchvision's) or ``"kaiming_fan_out"`` (MCSurface: also the Linear layers).
    """
    from torchvision.models import vgg16

    check_common(num_classes, in_channels, input_size)
    return _build(lambda c: vgg16(weights=None, num_classes=c), _linear_head("classifier", 6), num_classes,
                  in_channels, weights, init)


@register("tv_resnet18")
def tv_resnet18(num_classes: int = 10, in_channels: int = 3, input_size: int = 32, weights: str | None = None,
                init: str = "default") -> nn.Module:
    """torchvision ``resnet18`` with its ImageNet stem (7x7/2 conv, 3x3/2 max-pool), also on small images.

    Args:
        num_classes: Output size.
        in_channels: Input channels (the stem conv is rebuilt for other than 3).
        input_size: Input side (unused).
        weights: Pretrained state dict file (1000-class head; the head is replaced).
        init: ``"default"`` (torchvision's) or ``"kaiming_fan_out"`` (MCSurface).
    """
    from torchvision.models import resnet18

    check_common(num_classes, in_channels, input_size)
    return _build(lambda c: resnet18(weights=None, num_classes=c), _linear_head("fc"), num_classes, in_channels,
                  weights, init)


@register("tv_mobilenet_v2")
def tv_mobilenet_v2(num_classes: int = 10, in_channels: int = 3, input_size: int = 32, weights: str | None = None,
                    init: str = "default") -> nn.Module:
    """torchvision ``mobilenet_v2`` (MCSurface starts it from ImageNet weights: pass ``weights=PATH``).

    Args:
        num_classes: Output size.
        in_channels: Input channels (the first conv is rebuilt for other than 3).
        input_size: Input side (unused).
        weights: Pretrained state dict file (1000-class head; the head is replaced).
        init: ``"default"`` (torchvision's) or ``"kaiming_fan_out"``.
    """
    from torchvision.models import mobilenet_v2

    check_common(num_classes, in_channels, input_size)
    return _build(lambda c: mobilenet_v2(weights=None, num_classes=c), _linear_head("classifier", 1), num_classes,
                  in_channels, weights, init)


def timm_vit_small_patch16_224(num_classes: int = 10, in_channels: int = 3, input_size: int = 32,
                               weights: str | None = None, init: str = "default", resize: int = 224) -> nn.Module:
    """timm ``vit_small_patch16_224`` behind a resize of the inputs to ``resize`` (MCSurface: 224).

    Args:
        num_classes: Output size.
        in_channels: Input channels.
        input_size: Input side (the inputs are resized to ``resize`` whatever it is).
        weights: Pretrained timm state dict file (its head is replaced when the class counts differ).
        init: ``"default"`` (timm's) or ``"kaiming_fan_out"`` (MCSurface: every Linear and the patch conv).
        resize: Side the inputs are resized to (the net's positional embedding fits 224).
    """
    import timm

    check_common(num_classes, in_channels, input_size)

    def make(c: int) -> nn.Module:
        return timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=c, in_chans=in_channels)

    def set_head(net: nn.Module, c: int) -> None:
        net.reset_classifier(c)

    net = _build(make, set_head, num_classes, 3, weights, init)
    return ResizeInput(net, resize)


if importlib.util.find_spec("timm") is not None:
    register("timm_vit_small_patch16_224")(timm_vit_small_patch16_224)
