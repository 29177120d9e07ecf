"""Bezier curves, polygonal chains, Bezier surfaces and their fitting (lmc_lightning.weights.curves / fit)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from lmc_lightning.weights.curves import CORNERS, Bezier, BezierSurface, MidpointQuadratic, PolyChain, bernstein
from lmc_lightning.weights.fit import fit_path, freeze_buffer_points, path_loss, sample_boundary, sample_uniform
from lmc_lightning.weights.paths import Linear


def bn_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def thetas(n: int) -> list[dict[str, Tensor]]:
    """``n`` state dicts of a small BN net, with distinct running statistics and counters."""
    out = []
    for seed in range(n):
        sd = bn_net(seed).state_dict()
        sd["1.running_mean"].normal_()
        sd["1.running_var"].uniform_(0.5, 2)
        sd["1.num_batches_tracked"].fill_(seed + 7)
        out.append(sd)
    return out


def max_diff(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def floats(theta: dict[str, Tensor]) -> dict[str, Tensor]:
    """Floating entries only (integer buffers come from the first endpoint everywhere on a path)."""
    return {k: v for k, v in theta.items() if v.is_floating_point()}


def mix(weights: list[float], ths: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    return {k: sum(w * t[k] for w, t in zip(weights, ths, strict=True)) if t0.is_floating_point() else t0
            for k, t0 in ths[0].items()}


def perturb_(path: torch.nn.Module, scale: float = 1.0, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in path.free_store.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))


# --- bases and coefficients -------------------------------------------------------------------------------------


def test_bernstein_matches_explicit_quadratic_and_sums_to_one() -> None:
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    b = bernstein(t, 2)
    torch.testing.assert_close(b, torch.stack([(1 - t) ** 2, 2 * t * (1 - t), t**2], 1))
    for degree in range(6):
        torch.testing.assert_close(bernstein(t, degree).sum(1), torch.ones_like(t))


@pytest.mark.parametrize("cls", [Bezier, PolyChain])
@pytest.mark.parametrize("num_bends", [0, 1, 3])
def test_curve_coefficients_sum_to_one_and_endpoints_exact(cls: type, num_bends: int) -> None:
    a, b = thetas(2)
    path = cls([a, b], num_bends)
    perturb_(path)
    coef = path.coefficients(torch.rand(50, 1, dtype=torch.float64))
    assert coef.shape == (50, num_bends + 2)
    torch.testing.assert_close(coef.sum(1), torch.ones(50, dtype=torch.float64))
    assert max_diff(path(0.0), a) == 0.0
    assert max_diff(floats(path(1.0)), floats(b)) == 0.0


@pytest.mark.parametrize("cls", [Bezier, PolyChain])
@pytest.mark.parametrize("num_bends", [1, 2, 5])
def test_linear_init_gives_the_linear_path(cls: type, num_bends: int) -> None:
    a, b = thetas(2)
    path, line = cls([a, b], num_bends), Linear(a, b)
    for t in torch.linspace(0, 1, 9).tolist():
        assert max_diff(path(t), line(t)) < 1e-6
    assert path.distance_to_linear().item() < 1e-10


def test_quadratic_bezier_midpoint_formula() -> None:
    a, b = thetas(2)
    path = Bezier([a, b], 1)
    perturb_(path)
    c = {k: path.control_points(k)[1].detach() for k in path.float_keys}
    expected = {k: (a[k] + 2 * c[k] + b[k]) / 4 if k in c else a[k] for k in a}
    assert max_diff(path(0.5), expected) < 1e-6


def test_through_midpoint_passes_through_m_and_matches_midpoint_quadratic() -> None:
    a, b, m = thetas(3)
    curve = Bezier.through_midpoint(a, b, m)
    assert max_diff(floats(curve(0.5)), floats(m)) < 1e-5
    quad = MidpointQuadratic([a, b], init=[m])
    for t in (0.0, 0.2, 0.5, 0.9, 1.0):
        assert max_diff(quad(t), curve(t)) < 1e-5
    assert max_diff(quad.to_bezier()(0.3), curve(0.3)) < 1e-5
    # The midpoint's default is the middle of the line, where the curve is the line.
    assert max_diff(MidpointQuadratic([a, b])(0.3), Linear(a, b)(0.3)) < 1e-6


def test_polychain_is_piecewise_linear_through_its_bends() -> None:
    a, b = thetas(2)
    path = PolyChain([a, b], 3)
    perturb_(path, seed=3)
    knots = [path(i / 4) for i in range(5)]
    for i in range(1, 4):
        bend = {k: path.control_points(k)[i] for k in path.float_keys}
        assert max(float((knots[i][k] - bend[k]).abs().max()) for k in bend) == pytest.approx(0, abs=1e-6)
    for i in range(4):
        for s in (0.25, 0.6):
            t = (i + s) / 4
            expected = mix([1 - s, s], [knots[i], knots[i + 1]])
            assert max_diff(path(t), expected) < 1e-5


def test_stacked_matches_single_points() -> None:
    a, b = thetas(2)
    path = Bezier([a, b], 2)
    perturb_(path)
    ts = [0.0, 0.3, 0.71, 1.0]
    stacked = path.stacked(ts)
    for i, t in enumerate(ts):
        assert max_diff({k: v[i] for k, v in stacked.items()}, path(t)) < 1e-6


# --- surfaces -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_bends", [0, 1, 2])
def test_surface_corners_exact_and_coefficients_sum_to_one(num_bends: int) -> None:
    corners = thetas(4)
    surf = BezierSurface(corners, num_bends)
    perturb_(surf)
    assert surf.num_free == (num_bends + 2) ** 2 - 4
    for (u, v), theta in zip(CORNERS, corners, strict=True):
        assert max_diff(floats(surf(u, v)), floats(theta)) == 0.0
    coef = surf.coefficients(torch.rand(40, 2, dtype=torch.float64))
    torch.testing.assert_close(coef.sum(1), torch.ones(40, dtype=torch.float64))


def test_surface_bilinear_init_is_the_bilinear_patch() -> None:
    corners = thetas(4)
    surf = BezierSurface(corners, 2)
    for u, v in [(0.3, 0.8), (0.5, 0.5), (0.1, 0.0), (0.77, 0.21)]:
        expected = mix([(1 - u) * (1 - v), u * (1 - v), (1 - u) * v, u * v], corners)
        assert max_diff(surf(u, v), expected) < 1e-6


def test_surface_edges_are_bezier_curves_between_corners() -> None:
    corners = thetas(4)
    surf = BezierSurface(corners, 2)
    perturb_(surf, seed=1)
    m = surf.grid_size - 1
    for axis, side, (ci, cj) in [("v", 0, (0, 1)), ("v", 1, (2, 3)), ("u", 0, (0, 2)), ("u", 1, (1, 3))]:
        # An independently built curve from the edge's grid points (row-major: i along u, j along v).
        line = m * side
        cells = [(line, k) if axis == "u" else (k, line) for k in range(1, m)]
        bends = [{**corners[0], **{key: surf.grid_point(key, i, j).detach() for key in surf.float_keys}}
                 for i, j in cells]
        curve = Bezier([corners[ci], corners[cj]], 2, init=bends)
        for s in (0.0, 0.35, 0.8, 1.0):
            point = surf(side, s) if axis == "u" else surf(s, side)
            assert max_diff(floats(point), floats(curve(s))) < 1e-5
            assert max_diff(point, surf.edge(axis, side)(s)) < 1e-5


def test_fill_interior_from_edges_keeps_edges_and_reproduces_bilinear() -> None:
    corners = thetas(4)
    surf = BezierSurface(corners, 2)
    before = {k: p.detach().clone() for k, p in surf.free_store.named_parameters()}
    perturb_(surf, seed=2)
    with torch.no_grad():  # straighten the edges again; only the interior stays perturbed
        for key, p in surf.free_store.named_parameters():
            for n, edge in enumerate(surf.on_edge):
                if edge:
                    p[n].copy_(before[key][n])
    assert surf.distance_to_linear().item() > 1.0
    surf.fill_interior_from_edges()
    assert surf.distance_to_linear().item() < 1e-10
    # With bent edges, the fill changes interior points only.
    perturb_(surf, seed=4)
    edges = {k: p.detach()[torch.tensor(surf.on_edge)].clone() for k, p in surf.free_store.named_parameters()}
    surf.fill_interior_from_edges()
    for k, p in surf.free_store.named_parameters():
        torch.testing.assert_close(p.detach()[torch.tensor(surf.on_edge)], edges[k])


# --- buffers, init, validation -------------------------------------------------------------------------------------


def test_integer_buffers_carried_and_endpoints_frozen() -> None:
    a, b = thetas(2)
    path = Bezier([a, b], 2)
    w = path(0.4)
    assert w["1.num_batches_tracked"].dtype == torch.long and int(w["1.num_batches_tracked"]) == 7
    assert all(name.startswith("free_store.") for name, _ in path.named_parameters())
    assert sum(p.numel() for p in path.parameters()) == 2 * sum(v.numel() for v in a.values() if v.is_floating_point())


def test_init_from_weights_and_state_dict_round_trip() -> None:
    a, b, c, d = thetas(4)
    path = Bezier([a, b], 2, init=[c, d])
    assert max_diff({k: path.control_points(k)[1] for k in path.float_keys},
                    {k: c[k] for k in path.float_keys}) == 0.0
    other = Bezier([a, b], 2)
    other.load_state_dict(path.state_dict())
    assert max_diff(other(0.37), path(0.37)) == 0.0


def test_bad_input_names_the_problem() -> None:
    a, b, c = thetas(3)
    with pytest.raises(ValueError, match="expected 2 weight dicts"):
        Bezier([a, b, c], 1)
    with pytest.raises(ValueError, match="init has 1 weight dicts but the path has 2"):
        Bezier([a, b], 2, init=[c])
    with pytest.raises(ValueError, match="num_bends"):
        PolyChain([a, b], -1)
    with pytest.raises(ValueError, match="corners"):
        BezierSurface([a, b, c], 1)
    bad = {**b, "0.weight": torch.zeros(3, 3)}
    with pytest.raises(ValueError, match="0.weight"):
        Bezier([a, bad], 1)


def test_distance_to_linear_and_reset() -> None:
    a, b = thetas(2)
    path = Bezier([a, b], 2)
    with torch.no_grad():
        path.free_store.get_parameter("0__weight")[0].add_(0.5)
    assert path.distance_to_linear().item() == pytest.approx(0.25 * a["0.weight"].numel(), rel=1e-5)
    assert path.distance_to_linear(["0.bias"]).item() == pytest.approx(0.0, abs=1e-10)
    path.reset_to_linear()
    assert path.distance_to_linear().item() < 1e-10


def test_sample_boundary_lies_on_the_square_boundary() -> None:
    pts = sample_boundary(400, torch.Generator().manual_seed(0))
    on_edge = (pts == 0) | (pts == 1)
    assert bool(on_edge.any(1).all())
    assert {int(e) for e in (pts[:, 0] == 0).long() + 2 * (pts[:, 0] == 1).long()} >= {0, 1, 2}
    u = sample_uniform(1000, 2, torch.Generator().manual_seed(0))
    assert u.min() >= 0 and u.max() <= 1 and abs(u.mean().item() - 0.5) < 0.05


# --- fitting --------------------------------------------------------------------------------------------------------


def test_path_loss_averages_points_and_adds_reg() -> None:
    a, b = thetas(2)
    net = bn_net(0).train()
    path = Bezier([a, b], 1)
    perturb_(path, 0.1)
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    coords = torch.tensor([[0.2], [0.7]], dtype=torch.float64)
    single = [path_loss(path, net, x, y, c[None]) for c in coords]
    torch.testing.assert_close(path_loss(path, net, x, y, coords), (single[0] + single[1]) / 2)
    params = [k for k, _ in net.named_parameters()]
    dist = path.distance_to_linear(params)
    torch.testing.assert_close(path_loss(path, net, x, y, coords, reg=0.3),
                               (single[0] + single[1]) / 2 + 0.3 * dist)


def test_fit_trains_bends_only_and_leaves_buffers_untouched() -> None:
    a, b = thetas(2)
    net = bn_net(5)
    net_before = {k: v.clone() for k, v in net.state_dict().items()}
    path = Bezier([a, b], 1)
    buffers = {k: v.clone() for k, v in path.named_buffers()}
    bn_points = path.free_store.get_parameter("1__running_mean").detach().clone()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 6, generator=gen)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    midpoint = torch.tensor([[0.5]], dtype=torch.float64)
    before = path_loss(path, net.train(), x, y, midpoint).item()
    history = fit_path(path, net.eval(), x, y, epochs=10, lr=0.2, batch_size=64, num_samples=2)
    assert not net.training  # mode restored
    assert history[-1] < history[0]
    assert path_loss(path, net.train(), x, y, midpoint).item() < 0.6 * before
    for k, v in path.named_buffers():
        assert torch.equal(v, buffers[k]), k
    assert torch.equal(path.free_store.get_parameter("1__running_mean"), bn_points)
    assert not path.free_store.get_parameter("1__running_mean").requires_grad
    assert max_diff(net.state_dict(), net_before) == 0.0
    assert path.distance_to_linear().item() > 0


def test_fit_with_reg_stays_closer_to_the_line() -> None:
    a, b = thetas(2)
    x = torch.randn(256, 6, generator=torch.Generator().manual_seed(1))
    y = (x[:, 0] > 0).long()
    dist = []
    for reg in (0.0, 1.0):
        path = Bezier([a, b], 1)
        fit_path(path, bn_net(0), x, y, epochs=4, lr=0.1, batch_size=64, reg=reg)
        dist.append(path.distance_to_linear().item())
    assert dist[1] < 0.5 * dist[0]


def test_freeze_buffer_points_rejects_foreign_nets() -> None:
    a, b = thetas(2)
    with pytest.raises(ValueError, match="no control points for parameter"):
        freeze_buffer_points(Bezier([a, b], 1), nn.Linear(4, 2))


# --- quality on real Fashion-MNIST -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fmnist_modes(fmnist: dict[str, Tensor], train_classifier) -> list[nn.Module]:
    """Four small MLPs (2 hidden layers of 64) trained 2 epochs on real Fashion-MNIST from seeds 0..3."""
    from lmc_lightning.nets import get_net

    nets = []
    for seed in range(4):
        torch.manual_seed(seed)
        net = get_net("mlp", num_classes=10, in_channels=1, input_size=28, depth=2, width=64)
        nets.append(train_classifier(net, fmnist["x_train"], fmnist["y_train"], epochs=2, lr=0.05, seed=seed))
    return nets


@torch.no_grad()
def eval_losses(path, net: nn.Module, fmnist: dict[str, Tensor], coords: list[tuple[float, ...]]) -> list[float]:
    net.eval()
    return [F.cross_entropy(functional_call(net, path(*c), (fmnist["x_test"],)), fmnist["y_test"]).item()
            for c in coords]


def barrier(losses: list[float]) -> float:
    n = len(losses) - 1
    return max(loss - (1 - i / n) * losses[0] - i / n * losses[-1] for i, loss in enumerate(losses))


@pytest.mark.slow
def test_bezier_curve_removes_most_of_the_linear_barrier(fmnist, fmnist_modes) -> None:
    a, b = (n.state_dict() for n in fmnist_modes[:2])
    net = fmnist_modes[0]
    ts = [(i / 10,) for i in range(11)]
    linear = barrier(eval_losses(Linear(a, b), net, fmnist, ts))
    assert linear > 0.3, f"endpoints should have a real barrier, got {linear:.3f}"
    curve = Bezier([a, b], 1)
    fit_path(curve, net, fmnist["x_train"], fmnist["y_train"], epochs=2, lr=0.05)
    losses = eval_losses(curve, net, fmnist, ts)
    assert barrier(losses) <= 0.5 * linear, (losses, linear)


@pytest.mark.slow
def test_trained_surface_lowers_the_max_grid_loss(fmnist, fmnist_modes) -> None:
    net = fmnist_modes[0]
    surf = BezierSurface([n.state_dict() for n in fmnist_modes], 1)
    grid = [(i / 4, j / 4) for i in range(5) for j in range(5)]
    bilinear = max(eval_losses(surf, net, fmnist, grid))
    fit_path(surf, net, fmnist["x_train"], fmnist["y_train"], epochs=2, lr=0.05, num_samples=2)
    trained = eval_losses(surf, net, fmnist, grid)
    assert max(trained) < 0.6 * bilinear, (max(trained), bilinear)
    corner_mean = sum(trained[k] for k in (0, 4, 20, 24)) / 4
    assert max(trained) < corner_mean + 0.5 * (bilinear - corner_mean)
    assert math.isfinite(sum(trained))
