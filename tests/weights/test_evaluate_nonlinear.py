"""Nonlinear paths in evaluate_path (function of t, precomputed points), path length, integrals, [0, end_time]."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmc_lightning.nets import get_net
from lmc_lightning.weights.connect import connector_path
from lmc_lightning.weights.evaluate import evaluate_path
from lmc_lightning.weights.paths import FunctionPath, Linear, PointsPath
from lmc_lightning.weights.result import PathResult


def _setup(widths=(12, 10), bias=False):
    nets = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        nets.append(get_net("mlp", num_classes=4, in_channels=1, input_size=4, widths=list(widths), bias=bias))
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(300, 1, 4, 4, generator=g), torch.randint(0, 4, (300,), generator=g)
    return nets[0], dict(nets[0].state_dict()), dict(nets[1].state_dict()), x, y


def _loop(net, path, ts, x, y):
    out = []
    for t in ts:
        logits = torch.func.functional_call(net, path(float(t)), (x,))
        out.append((F.cross_entropy(logits, y).item(), (logits.argmax(-1) == y).double().mean().item()))
    return np.array(out)


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_nonlinear_path_equals_a_per_point_loop(strategy):
    net, a, b, x, y = _setup()
    path = connector_path(net, a, b, "stepwise_wa", "arc", "ot", data=x[:200])
    result = evaluate_path(path, net, (x[200:], y[200:]), num_points=13, device="cpu", precision="32",
                           strategy=strategy)
    assert result.end_time == 3 and result.ts[-1] == 3
    ref = _loop(net, path, result.ts, x[200:], y[200:])
    assert np.abs(result.loss - ref[:, 0]).max() < 1e-5
    assert np.abs(result.accuracy - ref[:, 1]).max() < 1e-9
    # path length: distances between consecutive points over the parameters
    pts = [path(float(t)) for t in result.ts]
    dl = [0.0] + [sum(((p[k] - q[k]).double() ** 2).sum().item() for k in p) ** 0.5
                  for q, p in zip(pts[:-1], pts[1:], strict=True)]
    assert np.allclose(result.length, np.cumsum(dl), rtol=1e-6)
    # precomputed points give the same numbers
    again = evaluate_path(path.precompute(result.ts), net, (x[200:], y[200:]), coords=result.ts, device="cpu",
                          precision="32", strategy=strategy)
    assert np.abs(again.loss - result.loss).max() < 1e-6


def test_linear_paths_keep_their_fast_path_and_get_lengths():
    net, a, b, x, y = _setup()
    line = Linear(a, b)
    res = evaluate_path(line, net, (x, y), num_points=5, device="cpu", precision="32")
    total = sum(((b[k] - a[k]).double() ** 2).sum().item() for k in a) ** 0.5
    assert np.allclose(res.length, np.linspace(0, total, 5), rtol=1e-6)
    same = evaluate_path(FunctionPath(line.forward), net, (x, y), num_points=5, device="cpu", precision="32")
    assert np.abs(same.loss - res.loss).max() < 1e-6 and np.allclose(same.length, res.length, rtol=1e-6)


def test_train_and_test_sets_with_summary():
    net, a, b, x, y = _setup((16,), bias=True)
    path = connector_path(net, a, b, "with_bias_wa", "lin", data=x[:200])
    res = evaluate_path(path, net, {"test": (x[200:], y[200:]), "train": (x[:200], y[:200])}, num_points=9,
                        device="cpu", precision="32")
    assert set(res.sets) == {"test", "train"} and res.sets["train"].end_time == 2
    summary = res.summary()
    acc = res.sets["test"].accuracy
    dl = np.diff(res.length)
    assert summary["test"]["accuracy"]["int"] == pytest.approx(((acc[1:] + acc[:-1]) / 2 * dl).sum() / dl.sum())
    assert summary["train"]["loss"]["max"] == pytest.approx(res.sets["train"].loss.max())
    assert summary["test"]["accuracy"]["start"] == acc[0] and summary["test"]["length"] == pytest.approx(res.length[-1])
    back = PathResult.from_dict(res.to_dict())
    assert back.end_time == 2 and np.allclose(back.length, res.length)


def test_barriers_on_zero_to_end_time():
    t = np.linspace(0, 2, 5)
    loss = np.array([1.0, 1.5, 3.0, 2.0, 2.0])
    res = PathResult(t, loss, 1 - loss / 4, end_time=2.0)
    line = 1.0 + (2.0 - 1.0) * t / 2
    assert res.loss_barrier == pytest.approx((loss - line).max())
    with pytest.raises(ValueError, match="end_time must be positive"):
        PathResult(t, loss, loss, end_time=0)


def test_points_path_is_exact_at_its_points_and_linear_between():
    _, a, b, _, _ = _setup()
    pts = PointsPath([0.0, 1.0, 2.0], [a, b, a])
    assert torch.equal(pts(1.0)["classifier.weight"], b["classifier.weight"])
    assert torch.allclose(pts(1.5)["classifier.weight"], (a["classifier.weight"] + b["classifier.weight"]) / 2)
    with pytest.raises(ValueError, match="outside"):
        pts(2.5)
    with pytest.raises(ValueError, match="start at 0"):
        PointsPath([0.5, 1.0], [a, b])
