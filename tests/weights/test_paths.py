"""Path base, Linear and Arc: endpoints, coefficients, stacked evaluation, compatibility errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

from lmc_lightning.nets import get_net
from lmc_lightning.weights.paths import Arc, Linear, Path, check_compatible

pytestmark = pytest.mark.usefixtures("one_thread")


def bn_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    net = get_net("resnet20", num_classes=4, in_channels=1, input_size=8, width=0.25)
    net.train()
    with torch.no_grad():
        net(torch.randn(16, 1, 8, 8))
    return net.eval()


class Bilinear(Path):
    """The bilinear patch spanned by four corners: the trivial surface."""

    dim = 2

    def coefficients(self, coords):
        u, v = coords[:, 0], coords[:, 1]
        return torch.stack([(1 - u) * (1 - v), u * (1 - v), (1 - u) * v, u * v], dim=1)


def test_linear_endpoints_are_exact_and_midpoint_is_the_average():
    a, b = bn_net(0).state_dict(), bn_net(1).state_dict()
    path = Linear(a, b)
    for t, ref in ((0.0, a), (1.0, b)):
        w = path(t)
        assert list(w) == list(ref)
        assert all(torch.equal(w[k], ref[k]) for k in ref)
    mid = path(0.5)
    key = "stem.0.weight"
    torch.testing.assert_close(mid[key], (a[key] + b[key]) / 2)
    # integer buffers are carried from the first endpoint, not interpolated
    assert mid["stem.1.num_batches_tracked"].dtype == torch.long
    assert torch.equal(mid["stem.1.num_batches_tracked"], a["stem.1.num_batches_tracked"])


def test_stacked_equals_pointwise_and_runs_the_net():
    net = bn_net(0)
    path = Linear(net.state_dict(), bn_net(1).state_dict())
    ts = [0.0, 0.3, 1.0]
    stacked = path.stacked(ts)
    x = torch.randn(3, 1, 8, 8)
    for i, t in enumerate(ts):
        w = path(t)
        for k in w:
            torch.testing.assert_close(stacked[k][i], w[k], rtol=0, atol=1e-7)
        torch.testing.assert_close(functional_call(net, {k: v[i] for k, v in stacked.items()}, (x,)),
                                   functional_call(net, w, (x,)), rtol=0, atol=1e-6)


def test_arc_coefficients():
    a, b = {"w": torch.ones(3)}, {"w": 2 * torch.ones(3)}
    arc = Arc(a, b)
    assert torch.equal(arc(0.0)["w"], a["w"])
    torch.testing.assert_close(arc(1.0)["w"], b["w"])
    c = math.cos(math.pi / 6)
    s = math.sin(math.pi / 6)
    torch.testing.assert_close(arc(1 / 3)["w"], (c + 2 * s) * torch.ones(3))


def test_mismatched_endpoints_name_the_key():
    a = bn_net(0).state_dict()
    missing = {k: v for k, v in a.items() if k != "classifier.bias"}
    with pytest.raises(ValueError, match="classifier.bias"):
        Linear(a, missing)
    wrong = dict(a)
    wrong["stem.0.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"stem\.0\.weight.*shape"):
        Linear(a, wrong)
    with pytest.raises(ValueError, match="dtype"):
        check_compatible({"w": torch.zeros(2)}, {"w": torch.zeros(2, dtype=torch.float64)})


def test_wrong_number_of_coordinates():
    path = Linear({"w": torch.zeros(2)}, {"w": torch.ones(2)})
    with pytest.raises(ValueError, match="1 coordinate"):
        path(0.1, 0.2)


def test_bilinear_surface_corners_and_grid():
    corners = [{"w": torch.full((2,), float(i))} for i in range(4)]
    surf = Bilinear(corners)
    for (u, v), i in (((0, 0), 0), ((1, 0), 1), ((0, 1), 2), ((1, 1), 3)):
        assert torch.equal(surf(u, v)["w"], corners[i]["w"])
    grid = torch.cartesian_prod(torch.linspace(0, 1, 3), torch.linspace(0, 1, 3))
    stacked = surf.stacked(grid)["w"]
    expected = grid[:, 0] * 1 + grid[:, 1] * 2  # bilinear in the corner values 0, 1, 2, 3
    torch.testing.assert_close(stacked[:, 0], expected.float())


def test_endpoints_on_different_devices_are_a_named_error() -> None:
    a = {"w": torch.zeros(2)}
    b = {"w": torch.zeros(2, device="meta")}
    with pytest.raises(ValueError, match="different devices at 'w'"):
        Linear(a, b)
    from lmc_lightning.weights.curves import Bezier

    with pytest.raises(ValueError, match="different devices at 'w'"):
        Bezier([a, b], num_bends=1)
