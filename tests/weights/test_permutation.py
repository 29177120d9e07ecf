"""Permutation specs (derived by tracing), apply, weight/activation/STE matching: fast tests on tiny random nets."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmc_lightning.nets import available, get_net
from lmc_lightning.weights.permutation import (
    PermutationSpec,
    SpecDerivationError,
    activation_matching,
    align,
    align_weights,
    apply_permutation,
    derive_spec,
    invert,
    ste_matching,
    weight_matching,
)
from lmc_lightning.weights.permutation.activation_matching import CorrelationStats
from lmc_lightning.weights.permutation.apply import random_permutation
from lmc_lightning.weights.permutation.batches import capture_module, run_with

SMALL = {"mlp": {"width": 16, "depth": 3}, "resnet18": {"width": 0.0625}, "preresnet": {"depth": 8, "width": 0.25}}


pytestmark = pytest.mark.usefixtures("one_thread")


def small_net(name: str, seed: int = 0, **kwargs) -> nn.Module:
    """A tiny float64 instance of a registry net in eval mode, with random norm parameters and running stats."""
    torch.manual_seed(seed)
    defaults = SMALL.get(name, {"width": 0.0625} if name.startswith("vgg") else {"width": 0.25})
    net = get_net(name, num_classes=5, in_channels=3, input_size=16 if name != "mlp" else 8,
                  **{**defaults, **kwargs}).double().eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    return net


def random_perm(spec: PermutationSpec, theta: dict[str, Tensor], seed: int = 0) -> dict[str, Tensor]:
    return random_permutation(spec, theta, torch.Generator().manual_seed(seed))


def outputs_close(net: nn.Module, theta: dict[str, Tensor], other: dict[str, Tensor], x: Tensor) -> float:
    ref = torch.func.functional_call(net, theta, (x,))
    return (torch.func.functional_call(net, other, (x,)) - ref).abs().max().item()


# The seeds' full-size torchvision/timm nets (nets/seeds.py) have no width argument; they are tested in test_seed_nets.
@pytest.mark.parametrize("name", [n for n in available() if not n.startswith(("tv_", "timm_"))])
def test_registry_nets_keep_their_function_under_any_permutation(name: str) -> None:
    net = small_net(name)
    theta = net.state_dict()
    if name == "resnet20_a":  # option-A shortcut zero-pads channels (F.pad): refused, naming the node
        with pytest.raises(SpecDerivationError, match="'pad'"):
            derive_spec(net)
        return
    spec = derive_spec(net)
    perm = random_perm(spec, theta)
    assert all(len(p) > 1 and not torch.equal(p, torch.arange(len(p))) for g, p in perm.items()
               if g not in spec.heads or spec.heads[g].within)
    permuted = apply_permutation(theta, spec, perm)
    assert any(not torch.equal(permuted[k], theta[k]) for k in theta)
    x = torch.randn(3, 3, *(2 * (8 if name == "mlp" else 16,)), dtype=torch.float64)
    assert outputs_close(net, theta, permuted, x) < 1e-10
    back = apply_permutation(permuted, spec, invert(perm))
    assert all(torch.equal(back[k], theta[k]) for k in theta)


@pytest.mark.parametrize("name", ["mlp", "vgg11_bn", "resnet20_ln", "preresnet"])
def test_align_weight_matching_keeps_function_float32(name: str) -> None:
    net_a, net_b = small_net(name, 0).float(), small_net(name, 1).float()
    aligned, perm = align(net_a, net_b, method="weight")
    x = torch.randn(4, 3, *(2 * (8 if name == "mlp" else 16,)))
    assert (aligned(x) - net_b(x)).abs().max().item() < 1e-5
    assert aligned is not net_b and set(perm) == set(derive_spec(net_a).groups)


def test_mlp_spec_structure() -> None:
    spec = derive_spec(small_net("mlp"))
    assert list(spec.groups) == ["P_hidden.0", "P_hidden.2", "P_hidden.4"]
    assert spec.groups["P_hidden.4"] == [("hidden.4.weight", 0, 1), ("hidden.4.bias", 0, 1),
                                         ("classifier.weight", 1, 1)]
    axes = {(a.key, a.axis) for g in spec.groups.values() for a in g}
    assert ("hidden.0.weight", 1) not in axes  # the input is never permuted
    assert ("classifier.weight", 0) not in axes and ("classifier.bias", 0) not in axes  # nor the output
    assert spec.activations["P_hidden.0"] == ["hidden.1"]
    assert "P_hidden.2: hidden.2.weight[0], hidden.2.bias[0], hidden.4.weight[1]" in str(spec)


def test_resnet20_residual_streams_share_one_permutation() -> None:
    spec = derive_spec(small_net("resnet20"))
    streams = [g for g in spec.groups if g.startswith("P_res_")]
    assert len(streams) == 3 and len(spec.groups) == 3 + 9  # one stream per stage + one group per block
    stem = spec.groups["P_res_stem.0"]
    for key in ("stem.0.weight", "stem.1.running_mean", "stages.0.1.residual.3.weight", "stages.0.2.residual.4.bias"):
        assert (key, 0, 1) in stem
    assert ("stages.1.0.shortcut.0.weight", 1, 1) in stem
    assert ("classifier.weight", 1, 1) in spec.groups[streams[-1]]
    assert len(spec.activations["P_res_stem.0"]) == 4  # the stream is read after the stem and after each block
    assert "stem.1.running_var" in spec.buffers and "stem.1.weight" not in spec.buffers


class FlatHead(nn.Module):
    """Conv map flattened straight into a Linear, so each channel spans H*W classifier inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)
        self.fc1 = nn.Linear(4 * 5 * 5, 6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.relu(self.fc1(torch.flatten(F.relu(self.conv(x)), 1))))


def test_flatten_of_spatial_map_permutes_channel_blocks() -> None:
    net = FlatHead().double()
    spec = derive_spec(net)
    assert ("fc1.weight", 1, 25) in spec.groups["P_conv"]
    theta = net.state_dict()
    x = torch.randn(2, 2, 7, 7, dtype=torch.float64)
    assert outputs_close(net, theta, apply_permutation(theta, spec, random_perm(spec, theta)), x) < 1e-10


class UserNet(nn.Module):
    """Functional ops, in-place residual add, depthwise conv, spatial mean, LayerNorm, a Linear used twice."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.conv2 = nn.Conv2d(8, 8, 1, bias=False)
        self.gn = nn.GroupNorm(8, 8)
        self.fc = nn.Linear(8 * 4, 6)
        self.skip = nn.Linear(8, 6)
        self.ln = nn.LayerNorm(6)
        self.shared = nn.Linear(6, 6)
        self.out = nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        r = self.gn(self.conv2(torch.sigmoid(self.dw(h))))
        r += h
        h = F.max_pool2d(r * 0.5, 2)
        h = h.view(h.size(0), -1)
        h = self.ln(F.gelu(self.fc(h) + self.skip(r.mean(dim=(-2, -1)))))
        return self.out(self.shared(torch.tanh(self.shared(h))))


def test_user_module_from_the_same_ops() -> None:
    net = UserNet().double().eval()
    with torch.no_grad():
        net.bn1.running_mean.normal_()
        net.bn1.running_var.uniform_(0.5, 2)
    spec = derive_spec(net)
    assert ("fc.weight", 1, 4) in spec.groups["P_res_conv1"] and ("dw.weight", 0, 1) in spec.groups["P_res_conv1"]
    assert ("shared.weight", 0, 1) in spec.groups["P_res_fc"] and ("shared.weight", 1, 1) in spec.groups["P_res_fc"]
    theta = net.state_dict()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    assert outputs_close(net, theta, apply_permutation(theta, spec, random_perm(spec, theta)), x) < 1e-10
    other = {k: v + 0.1 * torch.randn_like(v) if v.is_floating_point() else v for k, v in theta.items()}
    aligned, _ = align_weights(net, theta, other, method="weight")
    assert outputs_close(net, other, aligned, x) < 1e-10  # a group permuting both axes of one weight


class Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.out = nn.Linear(4, 3), nn.Linear(4, 3), nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.stack([self.a(x), self.b(x)], dim=1).flatten(1))


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x) if x.sum() > 0 else -self.fc(x)


@pytest.mark.parametrize(("net", "words"), [
    (Concat(), ["'stack'", "unsupported operation"]),
    (nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.Conv2d(8, 2, 1)), ["module '1'", "GroupNorm"]),
    (nn.Sequential(nn.Conv2d(3, 8, 3), nn.Linear(8, 2)), ["module '1'", "Linear layer applied to a 4-d"]),
    (nn.Sequential(nn.Linear(3, 8), nn.Softmax(dim=1), nn.Linear(8, 2)), ["module '1'", "Softmax"]),
    (Branchy(), ["could not trace Branchy"]),
])
def test_unsupported_ops_raise_naming_the_node(net: nn.Module, words: list[str]) -> None:
    with pytest.raises(SpecDerivationError) as info:
        derive_spec(net)
    assert all(w in str(info.value) for w in words) and "spec=" in str(info.value)


def test_hand_written_spec_matches_derived_and_is_checked() -> None:
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2)).double()
    hand = PermutationSpec({"h1": [("0.weight", 0), ("0.bias", 0), ("2.weight", 1)],
                            "h2": [("2.weight", 0), ("2.bias", 0), ("4.weight", 1)]}, activations={"h1": ["1"]})
    assert list(derive_spec(net).groups.values()) == list(hand.groups.values())
    assert str(hand).splitlines()[1] == "  h1: 0.weight[0], 0.bias[0], 2.weight[1]"
    theta = net.state_dict()
    assert hand.sizes(theta) == {"h1": 6, "h2": 5}
    with pytest.raises(ValueError, match="listed twice"):
        PermutationSpec({"a": [("0.weight", 0)], "b": [("0.weight", 0)]})
    with pytest.raises(ValueError, match="not in the weight dict"):
        PermutationSpec({"a": [("9.weight", 0)]}).sizes(theta)
    with pytest.raises(ValueError, match="h2' has 5 units but axis 1 of '0.weight' holds 4"):
        PermutationSpec({"h2": [("2.weight", 0), ("0.weight", 1)]}).sizes(theta)
    with pytest.raises(ValueError, match=r"perm\['h1'\] must be a permutation"):
        apply_permutation(theta, hand, {"h1": torch.zeros(6, dtype=torch.long), "h2": torch.arange(5)})
    with pytest.raises(ValueError, match="activation points for groups \\['h2'\\]"):
        activation_matching(net, hand, theta, theta, torch.randn(8, 4, dtype=torch.float64))


@pytest.mark.parametrize("name", ["mlp", "resnet20", "vgg11_bn"])
def test_weight_matching_recovers_a_hidden_permutation(name: str) -> None:
    net = small_net(name)
    theta_a = net.state_dict()
    spec = derive_spec(net)
    theta_b = apply_permutation(theta_a, spec, random_perm(spec, theta_a, seed=3))
    result = weight_matching(spec, theta_a, theta_b, seed=1)
    aligned = apply_permutation(theta_b, spec, result.perm)
    assert result.converged and all(torch.equal(aligned[k], theta_a[k]) for k in theta_a)
    identity = weight_matching(spec, theta_a, theta_b, max_iter=1).objective
    assert result.objective > identity


@pytest.mark.parametrize("name", ["mlp", "resnet20_ln", "vgg11_bn"])
def test_activation_matching_recovers_a_hidden_permutation(name: str) -> None:
    net = small_net(name)
    theta_a = net.state_dict()
    spec = derive_spec(net)
    perm = random_perm(spec, theta_a, seed=4)
    theta_b = apply_permutation(theta_a, spec, perm)
    x = torch.randn(64, 3, *(2 * (8 if name == "mlp" else 16,)), dtype=torch.float64)
    found = activation_matching(net, spec, theta_a, theta_b, x, batch_size=16)
    aligned = apply_permutation(theta_b, spec, found)
    points = sorted({p for g in spec.groups for p in spec.activations[g]})
    capture = capture_module(net, points)
    outs = [run_with(capture, theta, x) for theta in (theta_a, theta_b, aligned)]
    for p, fa, fb, fc in zip(points, *outs, strict=True):
        assert not torch.allclose(fa, fb), p
        assert torch.allclose(fa, fc, atol=1e-12), p  # every live unit found its twin (dead ones are all zero)


def test_activation_matching_data_forms_agree() -> None:
    net_a, net_b = small_net("mlp", 0), small_net("mlp", 1)
    x, y = torch.randn(40, 3, 8, 8, dtype=torch.float64), torch.randint(0, 5, (40,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=7)
    perms = [align(net_a, net_b, "activation", data=d, batch_size=9)[1] for d in (x, (x, y), loader, [x[:20], x[20:]])]
    assert all(torch.equal(p[g], perms[0][g]) for p in perms[1:] for g in p)
    with pytest.raises(ValueError, match="needs data"):
        align(net_a, net_b, "activation")
    with pytest.raises(ValueError, match="Unknown alignment method"):
        align(net_a, net_b, "procrustes")


def test_correlation_sums_combine_exactly_across_shares() -> None:
    x, y = torch.randn(100, 5, dtype=torch.float64), torch.randn(100, 5, dtype=torch.float64)
    y[:, 1] = 2 * x[:, 3] + 1
    whole, shares = CorrelationStats(5), [CorrelationStats(5), CorrelationStats(5)]
    whole.update(x, y)
    shares[0].update(x[:30], y[:30])
    shares[1].update(x[30:], y[30:])
    for key in whole.sums:  # what all_reduce(SUM) does across two ranks
        shares[0].sums[key] += shares[1].sums[key]
    assert torch.allclose(shares[0].correlation(), whole.correlation(), atol=1e-12)
    expected = torch.corrcoef(torch.cat([x, y], 1).T)[:5, 5:]
    assert torch.allclose(whole.correlation(), expected, atol=1e-9)
    assert whole.correlation()[3, 1].item() == pytest.approx(1.0)


def test_ste_matching_lowers_midpoint_loss() -> None:
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    x = torch.randn(256, 1, 4, 4)
    y = teacher(x).argmax(1).detach()
    nets = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        net = get_net("mlp", num_classes=3, in_channels=1, input_size=4, depth=2, width=12)
        opt = torch.optim.Adam(net.parameters(), 0.02)
        for _ in range(60):
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
        nets.append(net.eval())
    theta_a, theta_b = nets[0].state_dict(), nets[1].state_dict()
    spec = derive_spec(nets[0])
    perm = ste_matching(nets[0], spec, theta_a, theta_b, (x, y), epochs=3, lr=0.01, batch_size=64, eval_batches=4)

    def mid_loss(theta: dict[str, Tensor]) -> float:
        mid = {k: (theta_a[k] + theta[k]) / 2 for k in theta_a}
        return F.cross_entropy(torch.func.functional_call(nets[0], mid, (x,)), y).item()

    aligned = apply_permutation(theta_b, spec, perm)
    assert outputs_close(nets[1], theta_b, aligned, x) < 1e-5
    assert mid_loss(aligned) < mid_loss(theta_b)
    with pytest.raises(ValueError, match="needs labels"):
        ste_matching(nets[0], spec, theta_a, theta_b, x)


def test_progress_ticks_once_per_round_and_per_batch() -> None:
    """``progress`` is advanced once per weight-matching round and once per activation-matching batch."""
    net = small_net("mlp")
    theta_a = net.state_dict()
    spec = derive_spec(net)
    theta_b = apply_permutation(theta_a, spec, random_perm(spec, theta_a, seed=3))
    ticks: list[int] = []
    result = weight_matching(spec, theta_a, theta_b, seed=1, progress=ticks.append)
    assert result.rounds >= 2 and ticks == [1] * result.rounds
    ticks.clear()
    x = torch.randn(40, 3, 8, 8, dtype=torch.float64)
    align_weights(net, theta_a, theta_b, method="activation", data=x, batch_size=16, progress=ticks.append)
    assert ticks == [1] * 3  # batches of 16, 16 and 8
