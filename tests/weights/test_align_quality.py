"""Alignment quality on real Fashion-MNIST: permuting B into A's basin lowers the linear-interpolation loss barrier."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmc_lightning.nets import get_net
from lmc_lightning.weights.permutation import align_weights
from lmc_lightning.weights.renorm import renormalize, site_statistics

pytestmark = pytest.mark.slow

Correction = Callable[[dict[str, Tensor], float], dict[str, Tensor]]


pytestmark = pytest.mark.usefixtures("one_thread")


def loss_barrier(net: nn.Module, theta_a: dict[str, Tensor], theta_b: dict[str, Tensor], x: Tensor, y: Tensor,
                 points: int = 11, correct: Correction | None = None) -> float:
    """Largest excess of the test loss along ``(1 - t) A + t B`` over the straight line between the end losses."""
    ts = torch.linspace(0, 1, points)
    losses = []
    with torch.no_grad():
        for t in ts.tolist():
            theta = {k: (1 - t) * a + t * theta_b[k] if a.is_floating_point() else a for k, a in theta_a.items()}
            if correct is not None and 0 < t < 1:
                theta = correct(theta, t)
            logits = torch.cat([torch.func.functional_call(net, theta, (xb,)) for xb in x.split(1000)])
            losses.append(F.cross_entropy(logits, y).item())
    losses = torch.tensor(losses)
    return (losses - ((1 - ts) * losses[0] + ts * losses[-1])).max().item()


@pytest.fixture(scope="module")
def mlp_barrier(fmnist: dict[str, Tensor], fmnist_mlp_pair: tuple[nn.Module, nn.Module]) -> Callable[..., float]:
    """``barrier(theta_b)`` between the first MLP and ``theta_b`` on 5000 test images, 11 points."""
    net_a, _ = fmnist_mlp_pair
    theta_a = net_a.state_dict()
    x, y = fmnist["x_test"][:5000], fmnist["y_test"][:5000]
    return lambda theta_b: loss_barrier(net_a, theta_a, theta_b, x, y, points=11)


@pytest.fixture(scope="module")
def unaligned_mlp_barrier(fmnist_mlp_pair: tuple[nn.Module, nn.Module], mlp_barrier: Callable[..., float]) -> float:
    return mlp_barrier(fmnist_mlp_pair[1].state_dict())


@pytest.mark.parametrize(("method", "kwargs"), [
    ("weight", {}),
    ("activation", {}),
    ("ste", {"epochs": 1, "lr": 1e-3, "eval_batches": 2, "batch_size": 1000}),
])
def test_alignment_removes_most_of_the_mlp_barrier(method: str, kwargs: dict, fmnist: dict[str, Tensor],
                                                   fmnist_mlp_pair: tuple[nn.Module, nn.Module],
                                                   mlp_barrier: Callable[..., float],
                                                   unaligned_mlp_barrier: float) -> None:
    net_a, net_b = fmnist_mlp_pair
    theta_b = net_b.state_dict()
    data = (fmnist["x_train"][:5000], fmnist["y_train"][:5000])
    aligned, _ = align_weights(net_a, net_a.state_dict(), theta_b, method=method,
                               data=None if method == "weight" else data, **{"batch_size": 500, **kwargs})
    before, after = unaligned_mlp_barrier, mlp_barrier(aligned)
    assert before > 0.1, f"the unaligned MLPs should be separated by a barrier, got {before:.3f}"
    assert after <= 0.25 * before, f"{method} matching: barrier {after:.3f} vs {before:.3f} unaligned"


@pytest.fixture(scope="module")
def fmnist_vgg_pair(fmnist: dict[str, Tensor]) -> tuple[nn.Module, nn.Module]:
    """Two bias-free VGG-11 (width 0.125) trained with Adam for 2 epochs on 3000 Fashion-MNIST images (seeds 0, 1)."""
    x, y = fmnist["x_train"][:3000], fmnist["y_train"][:3000]
    nets = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        net = get_net("vgg11_nobias", num_classes=10, in_channels=1, input_size=28, width=0.125)
        opt = torch.optim.Adam(net.parameters(), lr=3e-3)
        gen = torch.Generator().manual_seed(seed)
        for _ in range(2):
            for idx in torch.randperm(len(x), generator=gen).split(128):
                opt.zero_grad()
                F.cross_entropy(net(x[idx]), y[idx]).backward()
                opt.step()
        nets.append(net.eval())
    return nets[0], nets[1]


def test_repair_lowers_the_barrier_after_weight_matching(fmnist: dict[str, Tensor],
                                                         fmnist_vgg_pair: tuple[nn.Module, nn.Module]) -> None:
    net_a, net_b = fmnist_vgg_pair
    theta_a = net_a.state_dict()
    aligned, _ = align_weights(net_a, theta_a, net_b.state_dict(), method="weight")
    x, y = fmnist["x_test"][:1000], fmnist["y_test"][:1000]
    stats_batches = [fmnist["x_train"][i:i + 500] for i in range(0, 1000, 500)]

    ends = tuple(site_statistics(net_a, stats_batches, theta) for theta in (theta_a, aligned))

    def repair(theta: dict[str, Tensor], t: float) -> dict[str, Tensor]:
        return renormalize(net_a, None, None, theta, t, stats_batches, mode="repair", endpoint_stats=ends)

    plain = loss_barrier(net_a, theta_a, aligned, x, y, points=5)
    repaired = loss_barrier(net_a, theta_a, aligned, x, y, points=5, correct=repair)
    assert repaired < plain, f"REPAIR barrier {repaired:.3f} vs weight matching alone {plain:.3f}"
