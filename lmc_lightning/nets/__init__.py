"""Plain ``nn.Module`` architectures and a name registry.

``get_net("vgg16_bn", num_classes=10, width=2)`` builds a net; ``available()`` lists the names; ``register`` adds
your own. Nets are built only from standard modules (Conv2d incl. grouped/depthwise, Linear, BatchNorm2d, GroupNorm,
LayerNorm, ReLU/GELU, pooling, Flatten), residual ``+``, ``torch.cat`` and ``F.scaled_dot_product_attention``, so
``torch.fx.symbolic_trace`` and ``torch.func.functional_call`` work on all of them.
"""

from lmc_lightning.nets import (  # noqa: F401  (registers the built-in nets)
    fixup,
    mlp,
    mmc_vgg,
    mobilenet,
    myrtle,
    preresnet,
    resnet,
    seeds,
    vgg,
    vgg_garipov,
    vit,
)
from lmc_lightning.nets.mlp import MLP
from lmc_lightning.nets.mmc_vgg import MMCVGG
from lmc_lightning.nets.mobilenet import MobileNetV2
from lmc_lightning.nets.myrtle import MyrtleCNN, ResNetA
from lmc_lightning.nets.preresnet import PreResNet
from lmc_lightning.nets.registry import available, get_net, register
from lmc_lightning.nets.resnet import ResNet, resnet18, resnet20
from lmc_lightning.nets.vgg import VGG
from lmc_lightning.nets.vgg_garipov import GaripovVGG
from lmc_lightning.nets.vit import ViT

__all__ = ["GaripovVGG", "MLP", "MMCVGG", "MobileNetV2", "MyrtleCNN", "PreResNet", "ResNet", "ResNetA", "VGG", "ViT",
           "available", "get_net", "register", "resnet18", "resnet20"]
