"""The zoo's wide forward pass (convolutions grouped by member) against vmap and against the members run alone."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lmc_lightning.nets import get_net
from lmc_lightning.weights.grouped import unsupported
from lmc_lightning.weights.stacked import StackedNets

NETS = [("resnet20", {"width": 0.5}), ("preresnet", {"width": 0.5}), ("vgg11_bn", {"width": 0.25}),
        ("resnet20_ln", {"width": 0.5}), ("mobilenetv2", {"width": 0.25}), ("mcnn", {}),
        ("resnet20_a", {"width": 0.5}),  # option-A shortcut: a tensor-free leaf run with the members in the batch
        ("resnet20_cln", {"width": 0.5}), ("vgg11_ln_seed", {"width": 0.25})]  # channel LayerNorm per member


def _members(name: str, kwargs: dict, k: int = 3) -> list[nn.Module]:
    torch.manual_seed(0)
    nets = [get_net(name, num_classes=10, in_channels=1, input_size=28, **kwargs) for _ in range(k)]
    for net in nets:  # non-trivial BN statistics and affine parameters, as after some training
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.uniform_(-0.2, 0.2)
    return nets


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize(("name", "kwargs"), NETS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_wide_forward_equals_the_members_and_vmap(name: str, kwargs: dict, channels_last: bool) -> None:
    """In float64, train mode: logits, gradients and updated BN statistics equal each member run alone; eval-mode
    and shared-batch logits equal vmap's. (Float64: float32 gradients through train-mode BatchNorm on 4 samples and
    through max pooling are ill-conditioned, for a member alone as for the zoo.)"""
    nets = [net.double() for net in _members(name, kwargs)]
    x = torch.randn(3, 4, 1, 28, 28, dtype=torch.float64)
    zoo, ref = StackedNets(nets), StackedNets(nets)
    zoo.channels_last, ref.wide = channels_last, False
    out = zoo(x)
    out.square().sum().backward()
    torch.testing.assert_close(out, ref(x), atol=1e-9, rtol=1e-9)  # (also updates ref's BN statistics)
    assert zoo.path == "wide" and ref.path == "vmap"
    grads = {n.replace(":", "."): p.grad for n, p in zoo.named_parameters()}
    for k, net in enumerate(nets):
        alone = net.train()(x[k])
        alone.square().sum().backward()
        torch.testing.assert_close(out[k], alone, atol=1e-9, rtol=1e-9)
        for key, p in net.named_parameters():
            torch.testing.assert_close(grads[key][k], p.grad, atol=1e-9, rtol=1e-7)
        for key, value in net.state_dict().items():
            torch.testing.assert_close(zoo.member_state(k)[key], value, atol=1e-12, rtol=1e-12)
    zoo.eval(), ref.eval()
    torch.testing.assert_close(zoo(x), ref(x), atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(zoo(x[0], shared=True), ref(x[0], shared=True), atol=1e-9, rtol=1e-9)
    assert zoo.path == "wide"


def test_wide_forward_in_float32_matches_vmap() -> None:
    """The float32 check that picks the wide forward passes, and its logits equal vmap's (1e-5)."""
    nets = _members("resnet20", {"width": 0.5})
    x = torch.randn(3, 4, 1, 28, 28)
    zoo, ref = StackedNets(nets), StackedNets(nets)
    ref.wide = False
    torch.testing.assert_close(zoo(x), ref(x), atol=1e-5, rtol=1e-5)
    assert zoo.path == "wide"


def test_wide_batchnorm_cumulative_average_and_no_running_stats() -> None:
    """BatchNorm with momentum=None (cumulative average over steps) and without running statistics."""
    def make() -> nn.Module:
        return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, momentum=None), nn.ReLU(),
                             nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4, track_running_stats=False),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))

    torch.manual_seed(1)
    nets = [make() for _ in range(2)]
    zoo = StackedNets(nets)
    xs = [torch.randn(2, 5, 1, 9, 9) for _ in range(3)]
    for x in xs:
        out = zoo(x)
        for k, net in enumerate(nets):
            torch.testing.assert_close(out[k], net(x[k]), atol=1e-5, rtol=1e-5)
    assert zoo.path == "wide"
    for k, net in enumerate(nets):
        for key, value in net.state_dict().items():
            torch.testing.assert_close(zoo.member_state(k)[key], value, atol=1e-6, rtol=1e-6)
    assert int(zoo.member_state(1)["1.num_batches_tracked"]) == 3


class ChannelFlip(nn.Module):
    """A forward pass that mixes channels (reverses them): right for one net, wrong on the wide layout."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).flip(1).mean((2, 3)))


def test_check_catches_a_forward_the_wide_layout_breaks() -> None:
    """Only layer types are screened; a forward that mixes channels is caught by the check against vmap."""
    torch.manual_seed(2)
    nets = [ChannelFlip() for _ in range(3)]
    zoo = StackedNets(nets)
    assert zoo.twin is not None and zoo.path == "wide?"
    x = torch.randn(3, 4, 1, 8, 8)
    out = zoo(x)
    assert zoo.path == "vmap"  # the wide twin gave other logits: vmap from now on
    wrong = zoo._wide_forward(x, shared=False)
    assert (wrong - out).abs().max() > 1e-3
    for k, net in enumerate(nets):
        torch.testing.assert_close(out[k], net(x[k]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("name", "reason"), [("resnet20_fixup", "FixupResNet) holds tensors of its own"),
                                              ("vit", "ViT) holds tensors of its own")])
def test_unsupported_nets_run_through_vmap(name: str, reason: str) -> None:
    net = get_net(name, num_classes=10, in_channels=1, input_size=28)
    assert reason in unsupported(net)
    zoo = StackedNets([net, get_net(name, num_classes=10, in_channels=1, input_size=28)])
    assert zoo.twin is None and zoo.path == "vmap"


def test_wide_forward_under_bf16_autocast() -> None:
    """bf16 autocast (CPU here; on CUDA vmap's BatchNorm rejects bf16 inputs): close to float32 logits."""
    nets = _members("resnet20", {"width": 0.5}, k=2)
    zoo = StackedNets(nets).eval()
    x = torch.randn(2, 4, 1, 28, 28)
    ref = zoo(x)
    with torch.autocast("cpu", torch.bfloat16):
        out = zoo(x)
    assert zoo.path == "wide"
    torch.testing.assert_close(out.float(), ref, atol=0.1, rtol=0.05)


class BatchRoll(nn.Module):
    """A tensor-free layer that mixes samples: with the members folded into the batch it would mix members too."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.roll(1, 0)


def test_tensor_free_layer_that_mixes_samples_is_caught() -> None:
    """Tensor-free leaf layers run with the members in the batch; one that mixes samples fails the check -> vmap."""
    torch.manual_seed(3)
    nets = [nn.Sequential(nn.Conv2d(1, 4, 3), BatchRoll(), nn.Flatten(), nn.Linear(4 * 36, 3)) for _ in range(2)]
    zoo = StackedNets(nets)
    assert unsupported(nets[0]) is None and zoo.path == "wide?"
    x = torch.randn(2, 5, 1, 8, 8)
    out = zoo(x)
    assert zoo.path == "vmap"
    for k, net in enumerate(nets):
        torch.testing.assert_close(out[k], net(x[k]), atol=1e-5, rtol=1e-5)
