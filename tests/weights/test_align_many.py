"""N-way alignment (reference / sequential / iterative) and the built-in equivalence check."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import lmc_lightning
from lmc_lightning.nets import get_net
from lmc_lightning.weights.permutation import (
    EquivalenceError,
    PermutationSpec,
    align_many,
    align_many_weights,
    align_weights,
    apply_permutation,
    check_equivalence,
    derive_spec,
    identity,
)

pytestmark = pytest.mark.usefixtures("one_thread")

KWARGS = {"mlp": {"width": 24, "depth": 3, "input_size": 4}, "vgg11_bn": {"width": 0.0625, "input_size": 16},
          "resnet20": {"width": 0.5, "input_size": 8}}


def make(name: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    kwargs = dict(KWARGS[name])
    net = get_net(name, num_classes=5, in_channels=3, **kwargs).double().eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    return net


def probe(name: str) -> Tensor:
    side = KWARGS[name]["input_size"]
    return torch.randn(4, 3, side, side, dtype=torch.float64, generator=torch.Generator().manual_seed(9))


def hidden_copies(name: str, n: int, noise: float = 0.01) -> tuple[nn.Module, list[dict[str, Tensor]], PermutationSpec]:
    """Model 0 and n-1 randomly permuted, slightly perturbed copies of it."""
    net = make(name, 0)
    spec = derive_spec(net)
    theta = net.state_dict()
    gen = torch.Generator().manual_seed(1)
    out = [theta]
    for _ in range(n - 1):
        noisy = {k: v + noise * torch.randn(v.shape, generator=gen, dtype=v.dtype) if v.is_floating_point() else v
                 for k, v in theta.items()}
        perm = {g: torch.randperm(s, generator=gen) for g, s in spec.sizes(theta).items()}
        out.append(apply_permutation(noisy, spec, perm))
    return net, out, spec


def spread(thetas: list[dict[str, Tensor]], spec: PermutationSpec) -> float:
    """Mean squared distance of the matched weights from their average."""
    keys = sorted(spec.keys - spec.buffers)
    mean = {k: torch.stack([t[k] for t in thetas]).mean(0) for k in keys}
    return sum(float((t[k] - mean[k]).square().sum()) for t in thetas for k in keys) / len(thetas)


@pytest.mark.parametrize("order", ["reference", "sequential", "iterative"])
@pytest.mark.parametrize(("name", "n"), [("mlp", 4), ("vgg11_bn", 3)])
def test_each_order_recovers_hidden_permutations_and_keeps_functions(order: str, name: str, n: int) -> None:
    net, thetas, spec = hidden_copies(name, n)
    result = align_many_weights(net, thetas, order=order, probe=probe(name))
    assert spread(result.weights, spec) < 0.01 * spread(thetas, spec)  # all in one basin again
    x = probe(name)
    for theta, aligned in zip(thetas, result.weights, strict=True):
        ref = torch.func.functional_call(net, theta, (x,))
        assert (torch.func.functional_call(net, aligned, (x,)) - ref).abs().max().item() < 1e-10
    if order != "iterative":
        assert all(torch.equal(p, torch.arange(len(p))) for p in result.perms[0].values())  # model 0 stays


@pytest.mark.parametrize("order", ["reference", "sequential"])
def test_orders_on_independent_cnns_lower_the_spread(order: str) -> None:
    nets = [make("resnet20", s) for s in range(3)]
    spec = derive_spec(nets[0])
    aligned, perms = lmc_lightning.align_many(nets, order=order, probe=probe("resnet20"))
    before = spread([n.state_dict() for n in nets], spec)
    after = spread([n.state_dict() for n in aligned], spec)
    assert after < 0.97 * before and len(perms) == 3
    x = probe("resnet20")
    assert all((a(x) - b(x)).abs().max().item() < 1e-10 for a, b in zip(aligned, nets, strict=True))


def test_iterative_reaches_a_fixed_point() -> None:
    nets = [make("mlp", s) for s in range(4)]
    net = nets[0]
    thetas = [n.state_dict() for n in nets]
    result = align_many_weights(net, thetas, order="iterative", probe=probe("mlp"))
    assert result.converged and result.rounds >= 2
    again = align_many_weights(net, result.weights, order="iterative", probe=probe("mlp"))
    assert again.rounds == 1 and all(torch.equal(p, torch.arange(len(p))) for perm in again.perms
                                     for p in perm.values())
    spec = derive_spec(net)
    assert spread(result.weights, spec) < 0.95 * spread(thetas, spec)


@pytest.mark.parametrize("order", ["reference", "iterative"])
def test_permuting_model_0_changes_nothing(order: str) -> None:
    net, thetas, spec = hidden_copies("mlp", 3)
    gen = torch.Generator().manual_seed(5)
    p0 = {g: torch.randperm(s, generator=gen) for g, s in spec.sizes(thetas[0]).items()}
    moved = [apply_permutation(thetas[0], spec, p0), *thetas[1:]]
    x = probe("mlp")
    merged = []
    for group in (thetas, moved):
        aligned = align_many_weights(net, group, order=order, probe=x).weights
        mean = {k: torch.stack([t[k] for t in aligned]).mean(0) for k in aligned[0]}
        merged.append(torch.func.functional_call(net, mean, (x,)))
    assert (merged[0] - merged[1]).abs().max().item() < 1e-10


def test_equivalence_check_catches_a_broken_spec() -> None:
    net_a, net_b = make("mlp", 0), make("mlp", 1)
    spec = derive_spec(net_a)
    broken = PermutationSpec({g: [a for a in axes if a.key != "hidden.2.bias"] for g, axes in spec.groups.items()})
    with pytest.raises(EquivalenceError) as info:
        align_weights(net_a, net_a.state_dict(), net_b.state_dict(), spec=broken, probe=probe("mlp"))
    msg = str(info.value)
    assert "P_hidden.2" in msg and "P_hidden.0" not in msg and "module 'hidden.2'" in msg and "check=False" in msg
    theta, perm = align_weights(net_a, net_a.state_dict(), net_b.state_dict(), spec=broken, check=False)
    assert any(not torch.equal(p, torch.arange(len(p))) for p in perm.values())
    with pytest.raises(EquivalenceError):  # the N-way path runs the same check
        align_many([net_a, net_b], spec=broken, probe=probe("mlp"))


def test_check_passes_and_guesses_a_probe() -> None:
    net_a, net_b = make("vgg11_bn", 0), make("vgg11_bn", 1)
    spec = derive_spec(net_a)
    theta, perm = align_weights(net_a, net_a.state_dict(), net_b.state_dict())  # probe guessed: 3x16x16
    assert check_equivalence(net_a, net_b.state_dict(), spec, perm, probe("vgg11_bn")) < 1e-10
    assert not all(torch.equal(p, q) for p, q in zip(perm.values(), identity(spec, theta).values(), strict=True))


def test_bad_arguments_are_named() -> None:
    nets = [make("mlp", 0), make("mlp", 1)]
    with pytest.raises(ValueError, match="order"):
        align_many(nets, order="circular")
    with pytest.raises(ValueError, match="method='weight'"):
        align_many(nets, method="activation", order="iterative", data=probe("mlp"))
    with pytest.raises(ValueError, match="at least 2"):
        align_many(nets[:1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_probe_is_guessed_on_the_nets_device() -> None:
    net_a, net_b = make("vgg11_bn", 0).cuda(), make("vgg11_bn", 1).cuda()
    theta, _ = align_weights(net_a, net_a.state_dict(), net_b.state_dict())  # probe guessed on the GPU
    assert theta[next(iter(theta))].is_cuda


def test_diverged_weights_are_named_before_matching() -> None:
    net_a, net_b = make("mlp", 0), make("mlp", 1)
    theta_b = net_b.state_dict()
    key = next(iter(theta_b))
    theta_b[key] = theta_b[key].clone().fill_(float("nan"))
    with pytest.raises(ValueError, match=f"theta_b has non-finite weights \\(NaN\\) in '{key}'"):
        align_weights(net_a, net_a.state_dict(), theta_b)
