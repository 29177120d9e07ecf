"""Stitching: points, layers (Sinkhorn, Hungarian rounding, penalties), stitched forwards."""

from __future__ import annotations

import copy

import pytest
import torch

from lmc_lightning.nets import get_net
from lmc_lightning.stitching import (
    Birkhoff,
    Lasso,
    LowRank,
    SoftSort,
    hungarian,
    make_layer,
    point_shapes,
    sinkhorn,
    stitch,
    stitch_points,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _net(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    kwargs = {"depth": 2, "width": 16} if name == "mlp" else {"width": 0.125}
    return get_net(name, in_channels=1, input_size=28, **kwargs).eval()


def test_points_in_execution_order() -> None:
    assert stitch_points(_net("mcnn")) == ["2", "5", "9", "13"]  # the seed's indices 3, 6, 10, 14 minus the root
    points = stitch_points(_net("resnet20_a"))
    assert len(points) == 19 and points[:3] == ["r1", "block_seq.0.r1", "block_seq.0.r2"]
    assert len(stitch_points(_net("resnet20"))) == 19
    assert point_shapes(_net("mcnn"), (1, 28, 28))["13"] == (64, 7, 7)


def test_sinkhorn_is_doubly_stochastic_and_hungarian_returns_permutations() -> None:
    w = sinkhorn(torch.rand(7, 7), 100)
    torch.testing.assert_close(w.sum(0), torch.ones(7), atol=1e-4, rtol=0)
    torch.testing.assert_close(w.sum(1), torch.ones(7), atol=1e-4, rtol=0)
    p = torch.eye(7)[torch.randperm(7)]
    assert torch.equal(hungarian(p), p)
    assert torch.equal(hungarian(0.9 * p + 0.1 * sinkhorn(torch.rand(7, 7))), p)


@pytest.mark.parametrize("name", ["mcnn", "resnet20_a", "resnet20", "mlp"])
def test_identity_stitch_of_a_net_with_itself_reproduces_it(name: str) -> None:
    net, x = _net(name), torch.randn(3, 1, 28, 28)
    points = stitch_points(net)
    for point in points if len(points) < 5 else points[::6]:  # first, in-block and stream points, last
        assert torch.equal(stitch(net, net, point, "identity", input_shape=(1, 28, 28))(x), net(x)), point


def test_stitched_net_runs_a_before_and_b_after_the_point() -> None:
    a, b, x = _net("mcnn", 0), _net("mcnn", 1), torch.randn(3, 1, 28, 28)
    s = stitch(a, b, "5", "identity", input_shape=(1, 28, 28))
    want = torch.nn.Sequential(*list(b)[6:])(torch.nn.Sequential(*list(a)[:6])(x))
    torch.testing.assert_close(s(x), want)
    # inside a residual block the skip path carries A's stream: equal to B when the block's input is A's
    ra, rb = _net("resnet20_a", 0), _net("resnet20_a", 1)
    s = stitch(ra, rb, "block_seq.3.r1", "identity", input_shape=(1, 28, 28))
    stream = ra.block_seq[:3](ra.r1(ra.bn1(ra.conv1(x))))
    blk_a, blk_b = ra.block_seq[3], rb.block_seq[3]
    inner = blk_b.bn2(blk_b.conv2(blk_a.r1(blk_a.bn1(blk_a.conv1(stream)))))
    out = rb.block_seq[4:](blk_b.r2(inner + blk_b.shortcut(stream)))
    torch.testing.assert_close(s(x), rb.linear(rb.flatten(rb.pool(out))))


def test_layers_maps_and_penalties() -> None:
    x = torch.randn(5, 6, 3, 3)
    low = LowRank(6, rank=2)
    assert torch.linalg.matrix_rank(low.matrix()) == 2
    torch.testing.assert_close(low(x), torch.einsum("oc,nchw->nohw", low.matrix(), x))
    lasso = Lasso(6, lam=0.01)
    torch.testing.assert_close(lasso.penalty(), 0.01 * lasso.weight.abs().sum())
    with torch.no_grad():
        lasso.weight[0, 0] = 5e-5
    assert lasso.eval().matrix()[0, 0] == 0 and lasso.train().matrix()[0, 0] != 0
    bk = Birkhoff(6, alpha=0.1)
    torch.testing.assert_close(bk.penalty(), -0.1 * bk.weight.norm())
    with torch.no_grad():
        bk.weight.add_(torch.randn(6, 6))
        bk.weight_scalars.copy_(torch.linspace(-1, 2, 6))
    bk.project()
    torch.testing.assert_close(bk.weight.sum(0), torch.ones(6), atol=1e-4, rtol=0)
    assert (bk.weight >= 0).all() and (bk.weight_scalars >= 0).all()
    bk.scalars_on = True
    torch.testing.assert_close(bk.train().matrix(), bk.weight * bk.weight_scalars)
    p = hungarian(bk.weight.detach())
    torch.testing.assert_close(bk.eval().matrix(), p * bk.weight_scalars)
    assert 0 < bk.distance_to_permutation()["distance"] < 1
    ss = SoftSort(6, tau=0.01)
    assert ss.soft().sum(1).sub(1).abs().max() < 1e-5
    torch.testing.assert_close(ss.eval().matrix(), hungarian(ss.soft().detach()) * ss.log_scalars.exp())


def test_make_layer_errors() -> None:
    with pytest.raises(ValueError, match="Unknown stitching layer"):
        make_layer("nope", 4)
    with pytest.raises(ValueError, match="rank must be"):
        make_layer("lowrank", 4, rank=9)
    with pytest.raises(ValueError, match="Unknown stitch point"):
        stitch(_net("mcnn"), _net("mcnn"), "99", "affine", input_shape=(1, 28, 28))
    with pytest.raises(ValueError, match="different graphs"):
        stitch(_net("mcnn"), _net("mcnn_k"), "2", "affine", input_shape=(1, 28, 28))
    with pytest.raises(ValueError, match="needs input_shape"):
        stitch(_net("mcnn"), _net("mcnn"), "2", "affine")


def test_birkhoff_stitch_gradients_reach_only_the_stitcher() -> None:
    a, b = _net("mcnn", 0), copy.deepcopy(_net("mcnn", 1))
    s = stitch(a, b, "5", "birkhoff", input_shape=(1, 28, 28)).train()
    for p in [*a.parameters(), *b.parameters()]:
        p.requires_grad_(False)
    loss = s(torch.randn(4, 1, 28, 28)).sum() + s.stitcher.penalty()
    loss.backward()
    assert s.stitcher.weight.grad is not None and s.stitcher.weight.grad.abs().sum() > 0


def _seed_projection(w: torch.Tensor, s: torch.Tensor, iters: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """The seed's projection written out plainly: relu, then ``iters`` out-of-place row / column normalisations."""
    w = w.clamp_min(0)
    for _ in range(iters):
        rows = w.sum(1, keepdim=True)
        w = w / torch.where(rows > 0, rows, torch.ones_like(rows))
        cols = w.sum(0, keepdim=True)
        w = w / torch.where(cols > 0, cols, torch.ones_like(cols))
    return w, s.clamp_min(0)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA (the CUDA-graph projection)"))])
def test_fast_projection_equals_the_plain_one(device: str) -> None:
    torch.manual_seed(0)
    bk = Birkhoff(64).to(device)
    gen = torch.Generator(device="cpu").manual_seed(1)
    for _ in range(5):  # several "optimiser steps": on CUDA the first is eager + capture, the rest replay
        with torch.no_grad():
            bk.weight.add_(0.05 * torch.randn(64, 64, generator=gen).to(device))
            bk.weight[3] = -1.0  # an all-negative row: relu zeroes it and it stays zero (the seed's zero-sum rule)
            bk.weight_scalars.add_(torch.randn(64, generator=gen).to(device))
        want_w, want_s = _seed_projection(bk.weight.detach().clone(), bk.weight_scalars.detach().clone())
        ptr = bk.weight.data_ptr()
        bk.project()
        assert bk.weight.data_ptr() == ptr  # in place: optimiser state and graph keep pointing at W
        torch.testing.assert_close(bk.weight.detach(), want_w, atol=1e-6, rtol=0)
        torch.testing.assert_close(bk.weight_scalars.detach(), want_s, atol=0, rtol=0)
        assert bk.weight[3].abs().sum() == 0
    if device == "cuda":
        assert bk._graph is not None  # the projection ran as a captured graph
        moved = copy.deepcopy(bk)  # the graph is not copied; the copy captures its own on its own storage
        assert moved._graph is None
        moved.project()
        assert moved._graph is not None and moved._graph[0][0] == moved.weight.data_ptr()
