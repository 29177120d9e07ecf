"""Tiny registry nets that look trained: randomised norm parameters and BN running statistics from a real pass."""

from __future__ import annotations

import copy

import torch
from torch import nn

from lmc_lightning.nets import get_net


def trained_like(name: str, seed: int, num_classes: int = 5, stats_samples: int = 256, **kwargs) -> nn.Module:
    """A registry net on 1x8x8 inputs, norm weights in [0.5, 1.5], biases N(0, 0.3), BN statistics exact over
    ``stats_samples`` N(0, 1) inputs; returned in eval mode."""
    torch.manual_seed(seed)
    net = get_net(name, num_classes=num_classes, in_channels=1, input_size=8, **kwargs)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.3)
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None
        net.train()
        net(torch.randn(stats_samples, 1, 8, 8))
    return net.eval()


def manual_reset(net: nn.Module, x: torch.Tensor, weights: dict | None = None) -> dict:
    """Reference BN reset: a copy of ``net`` (with ``weights`` loaded), running statistics from one train-mode pass
    with ``momentum=None`` over ``x``; returns its state dict."""
    ref = copy.deepcopy(net)
    if weights is not None:
        ref.load_state_dict(weights)
    for m in ref.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    ref.train()
    with torch.no_grad():
        ref(x)
    return ref.eval().state_dict()
