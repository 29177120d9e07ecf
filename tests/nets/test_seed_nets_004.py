"""The rethink-re-basin seed's nets: VGG head, channel LayerNorm, fixup and bias-free ResNet-20, lecun_normal init."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from lmc_lightning.nets import get_net
from lmc_lightning.nets.layers import ChannelLayerNorm
from lmc_lightning.weights import renorm
from lmc_lightning.weights.permutation import align_weights

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(("size", "channels"), [(28, 1), (32, 3)])
def test_vgg_seed_head_four_pools_avgpool2_one_linear(size, channels):
    net = get_net("vgg16_seed", num_classes=10, in_channels=channels, input_size=size, width=0.125)
    assert sum(isinstance(m, nn.MaxPool2d) for m in net.modules()) == 4
    assert isinstance(net.pool, nn.AvgPool2d) and net.pool.kernel_size == 2
    assert [n for n, m in net.named_modules() if isinstance(m, nn.Linear)] == ["classifier"]
    assert net.classifier.in_features == 64  # 512 * 0.125 channels on a 1x1 map
    assert net(torch.randn(2, channels, size, size)).shape == (2, 10)
    big = get_net("vgg11_seed", num_classes=10, in_channels=1, input_size=64, width=0.125)
    assert big.classifier.in_features == 256  # 64 channels on a 2x2 map


def test_channel_layer_norm_normalises_each_pixel_over_channels():
    torch.manual_seed(0)
    ln = ChannelLayerNorm(6)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.normal_()
    x = torch.randn(3, 6, 5, 4) * 3 + 1
    mu = x.mean(1, keepdim=True)
    var = x.var(1, unbiased=False, keepdim=True)
    ref = (x - mu) / torch.sqrt(var + ln.eps) * ln.weight.view(1, -1, 1, 1) + ln.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(ln(x), ref, rtol=1e-5, atol=1e-5)
    net = get_net("vgg11_ln_seed", num_classes=10, in_channels=1, input_size=28, width=0.125)
    assert sum(isinstance(m, ChannelLayerNorm) for m in net.modules()) == 8


@pytest.mark.parametrize("name", ["vgg11_ln_seed", "resnet20_cln", "resnet20_nobias", "vgg11_nobias_seed"])
def test_weight_matching_keeps_the_function_of_the_seed_nets(name):
    torch.manual_seed(0)
    a = get_net(name, num_classes=10, in_channels=1, input_size=28, width=0.25).eval()
    torch.manual_seed(1)
    b = get_net(name, num_classes=10, in_channels=1, input_size=28, width=0.25).eval()
    with torch.no_grad():
        for m in b.modules():
            if isinstance(m, ChannelLayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
    x = torch.randn(4, 1, 28, 28)
    aligned, perm = align_weights(a, a.state_dict(), b.state_dict(), method="weight")
    torch.testing.assert_close(functional_call(a, aligned, (x,)), b(x), rtol=1e-4, atol=1e-5)
    assert any(not torch.equal(p, torch.arange(len(p))) for p in perm.values())


def test_resnet20_fixup_and_nobias():
    torch.manual_seed(0)
    net = get_net("resnet20_fixup", num_classes=10, in_channels=1, input_size=28)
    assert not any(isinstance(m, nn.BatchNorm2d | nn.GroupNorm | nn.LayerNorm) for m in net.modules())
    x = torch.randn(8, 1, 28, 28)
    out = net(x)
    assert torch.equal(out, torch.zeros_like(out))  # fixup: zero classifier, zero-initialised second convs
    torch.nn.functional.cross_entropy(out, torch.arange(8) % 10).backward()
    assert net.classifier.weight.grad.abs().sum() > 0
    std = net.stages[0][0].conv1.weight.std().item()
    assert std == pytest.approx((2 / (16 * 9)) ** 0.5 * 9**-0.5, rel=0.15)  # He normal x L^-1/2, L = 9 blocks
    assert [s.name for s in renorm.find_sites(net, x[:2], rule="auto")] == [
        f"stages.{i}.{j}.conv{k}" for i in range(3) for j in range(3) for k in (1, 2)]
    plain = get_net("resnet20_nobias", num_classes=10, in_channels=1, input_size=28)
    assert not any("bias" in k for k in plain.state_dict())
    assert all(m.bias is not None for m in get_net("resnet20_plain").modules() if isinstance(m, nn.Conv2d))


def test_lecun_normal_init():
    torch.manual_seed(0)
    net = get_net("resnet20_plain", num_classes=10, in_channels=3, input_size=32, width=2, init="lecun_normal")
    conv = net.stages[2][1].residual[0]
    assert conv.weight.std().item() == pytest.approx((128 * 9) ** -0.5, rel=0.05)
    assert torch.equal(conv.bias, torch.zeros_like(conv.bias))
    vgg = get_net("vgg11", num_classes=10, init="lecun_normal", width=0.5)
    assert vgg.features[-3].weight.std().item() == pytest.approx((256 * 9) ** -0.5, rel=0.05)
    with pytest.raises(ValueError, match="init must be"):
        get_net("resnet20", init="xavier")
