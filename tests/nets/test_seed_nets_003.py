"""The modelsym seed's nets: layouts, shapes, BN/bias choices."""

from __future__ import annotations

import torch
from torch import nn

from lmc_lightning.nets import get_net


def test_myrtle_layouts_and_shapes() -> None:
    x = torch.randn(2, 3, 32, 32)
    mcnn = get_net("mcnn")
    convs = [m for m in mcnn if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 512] and all(c.bias is None for c in convs)
    assert isinstance(mcnn[1], nn.BatchNorm2d) and mcnn(x).shape == (2, 10)
    assert {m.out_channels for m in get_net("cwcnn") if isinstance(m, nn.Conv2d)} == {512}
    k = get_net("mcnn_k")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in k) and all(
        m.bias is not None for m in k if isinstance(m, nn.Conv2d))
    assert [i for i, m in enumerate(k) if isinstance(m, nn.Conv2d)] == [0, 2, 5, 8]  # seed: layers 0, 2, 5 (+ last)
    assert isinstance(get_net("mcnn_k_sigmoid")[1], nn.Sigmoid)
    assert get_net("mcnn", in_channels=1, input_size=28, width=0.25)(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_option_a_resnet20() -> None:
    net = get_net("resnet20_a")
    assert sum(isinstance(m, nn.ReLU) for m in net.modules()) == 19
    assert not any(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) for m in net.modules())  # no 1x1 shortcuts
    assert sum(p.numel() for p in net.parameters()) == 269722  # He et al.'s 0.27M
    x = torch.randn(2, 16, 8, 8)
    short = net.block_seq[3].shortcut(x)
    assert short.shape == (2, 32, 4, 4) and torch.equal(short[:, 8:24], x[:, :, ::2, ::2])
    assert short[:, :8].abs().sum() == 0 and short[:, 24:].abs().sum() == 0
