"""The simplex path over N endpoints: corners, grid, barriers relative to the endpoints' plane, N-way averages."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from lmc_lightning.nets import get_net
from lmc_lightning.weights.evaluate import evaluate_path
from lmc_lightning.weights.paths import Linear
from lmc_lightning.weights.renorm import find_sites, site_statistics
from lmc_lightning.weights.result import PathResult
from lmc_lightning.weights.simplex import Simplex, average, renormalize_average, simplex_barrier, simplex_grid

pytestmark = pytest.mark.usefixtures("one_thread")


def nets(n: int, name: str = "mlp", **kwargs) -> list[nn.Module]:
    out = []
    for seed in range(n):
        torch.manual_seed(seed)
        out.append(get_net(name, num_classes=3, in_channels=1, input_size=4, **(kwargs or {"width": 8})).eval())
    return out


def test_corners_are_the_endpoints_and_two_endpoints_are_the_line() -> None:
    thetas = [n.state_dict() for n in nets(4)]
    path = Simplex(thetas)
    assert path.dim == 3
    for i in range(4):
        coords = [1.0 if j == i else 0.0 for j in range(1, 4)]
        point = path(*coords)
        assert all(torch.equal(point[k], thetas[i][k]) for k in thetas[0])
    line, two = Linear(thetas[0], thetas[1]), Simplex(thetas[:2])
    assert all(torch.allclose(line(0.3)[k], two(0.3)[k]) for k in thetas[0])
    w = [0.1, 0.2, 0.3, 0.4]
    merged = average(thetas, w)
    assert torch.allclose(merged["classifier.weight"],
                          sum(wi * t["classifier.weight"] for wi, t in zip(w, thetas, strict=True)))
    with pytest.raises(ValueError, match="sum to 1"):
        average(thetas, [0.5, 0.5, 0.5, -0.5])


def test_grid_counts_and_barrier_against_a_direct_computation() -> None:
    grid = simplex_grid(3, 5)
    assert len(grid) == 15 and (grid.sum(1) <= 1 + 1e-12).all() and (grid >= 0).all()
    assert torch.equal(simplex_grid(2, 3)[:, 0], torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64))
    lam = torch.cat([1 - grid.sum(1, keepdim=True), grid], 1).numpy()
    ends = np.array([1.0, 2.0, 4.0])
    values = lam @ ends + 27 * lam[:, 0] * lam[:, 1] * lam[:, 2]  # a bump of 1 at the centre, 0 on the edges
    direct = max(values[i] - lam[i] @ ends for i in range(len(values)))
    assert simplex_barrier(values, grid.numpy()) == pytest.approx(direct)
    assert simplex_barrier(lam @ ends, grid.numpy()) == pytest.approx(0.0, abs=1e-12)  # the plane has no barrier
    mean_ref = values.max() - ends.mean()
    assert simplex_barrier(values, grid.numpy(), reference="mean") == pytest.approx(mean_ref)


def test_evaluate_path_on_the_simplex(fmnist: dict) -> None:
    torch.manual_seed(0)
    three = [get_net("mlp", num_classes=10, in_channels=1, input_size=28, width=16, depth=1).eval()
             for _ in range(3)]
    thetas = [n.state_dict() for n in three]
    x, y = fmnist["x_test"][:500], fmnist["y_test"][:500]
    result = evaluate_path(Simplex(thetas), three[0], (x, y), num_points=4, device="cpu")
    assert result.simplex and result.coords.shape == (10, 2)
    for i, net in enumerate(three):
        corner = [j for j in range(10) if np.allclose(result.coords[j], np.eye(3)[i][1:])][0]
        with torch.no_grad():
            loss = nn.functional.cross_entropy(net(x), y).item()
        assert result.loss[corner] == pytest.approx(loss, abs=1e-5)
    assert result.loss_barrier == pytest.approx(simplex_barrier(result.loss, result.coords))
    again = PathResult.from_dict(result.to_dict())
    assert again.simplex and again.loss_barrier == pytest.approx(result.loss_barrier)


def corrected_average(mode: str, w: list[float], seed: int) -> tuple[list, dict, dict, dict, list]:
    """Three MLPs averaged with weights ``w`` and corrected by ``renormalize_average(mode)``: the sites, the
    statistics of the average before and after the correction, and the goal ``(sum_i w_i mu_i, sum_i w_i sigma_i)``
    of every site."""
    three = nets(3, width=16)
    thetas = [n.state_dict() for n in three]
    merged = average(thetas, w)
    x = torch.randn(512, 1, 4, 4, generator=torch.Generator().manual_seed(seed))
    fixed = renormalize_average(three[0], thetas, merged, [x], mode, w)
    sites = find_sites(three[0], x[:2], merged)
    stats = [site_statistics(three[0], [x], t, sites=sites) for t in thetas]
    before, after = (site_statistics(three[0], [x], th, sites=sites) for th in (merged, fixed))
    goal = {s.name: tuple(sum(wi * st[s.name][j] for wi, st in zip(w, stats, strict=True)) for j in (0, 1))
            for s in sites}
    return sites, before, after, goal, thetas


def test_repair_of_an_average_reaches_the_weighted_endpoint_statistics() -> None:
    sites, before, got, goal, _ = corrected_average("repair", [0.5, 0.3, 0.2], seed=0)
    name = sites[0].name
    goal_mean, goal_std = goal[name]
    assert torch.allclose(got[name][0], goal_mean, atol=1e-4) and torch.allclose(got[name][1], goal_std, atol=1e-3)
    assert (before[name][1] - goal_std).abs().mean() > 10 * (got[name][1] - goal_std).abs().mean()


def test_reshift_of_an_average_moves_every_mean_to_the_weighted_goal_and_keeps_the_first_std() -> None:
    sites, before, got, goal, thetas = corrected_average("reshift", [0.2, 0.2, 0.6], seed=1)
    for site in sites:
        assert torch.allclose(got[site.name][0], goal[site.name][0], atol=1e-4)
    first = sites[0].name
    assert torch.allclose(got[first][1], before[first][1], rtol=1e-4)
    with pytest.raises(ValueError, match="mode must be 'reset' or one of"):
        renormalize_average(nets(1)[0], thetas, average(thetas), torch.randn(8, 1, 4, 4), "center")
