"""BarrierMetric and the functional barrier: per-point sums, merging (as under DDP), barrier conventions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmc_lightning.metrics import BarrierMetric, barrier


def test_functional_barrier_conventions():
    ts = torch.tensor([0.0, 0.5, 1.0])
    loss = torch.tensor([1.0, 3.0, 2.0])
    assert barrier(loss, ts).item() == pytest.approx(3.0 - 1.5)
    assert barrier(loss, ts, reference="mean").item() == pytest.approx(3.0 - 1.5)
    acc = torch.tensor([0.9, 0.4, 0.7])
    assert barrier(acc, ts, higher_is_better=True).item() == pytest.approx(0.8 - 0.4)
    assert barrier(acc, ts, higher_is_better=True, reference="mean").item() == pytest.approx(0.8 - 0.4)
    # the two conventions differ when the maximum is off-centre
    ts5 = torch.linspace(0, 1, 5)
    skew = torch.tensor([0.0, 2.5, 1.0, 1.0, 2.0])
    assert barrier(skew, ts5).item() == pytest.approx(2.5 - 0.5)
    assert barrier(skew, ts5, reference="mean").item() == pytest.approx(2.5 - 1.0)
    assert barrier(torch.tensor([0.0, 0.5, 2.0]), ts).item() == 0.0  # convex: never above the line
    with pytest.raises(ValueError, match="t=1"):
        barrier([1.0, 2.0], [0.0, 0.5])
    with pytest.raises(ValueError, match="reference"):
        barrier(loss, ts, reference="max")


def test_metric_per_point_all_at_once_and_merged_states_agree():
    torch.manual_seed(0)
    p, n, k = 3, 40, 4
    logits, y = torch.randn(p, n, k), torch.randint(0, k, (n,))
    coords = [0.0, 0.5, 1.0]
    full = BarrierMetric(coords)
    full.update(logits, y)
    out = full.compute()
    expected = torch.stack([F.cross_entropy(logits[i], y) for i in range(p)]).double()
    torch.testing.assert_close(out["loss"], expected)
    acc = (logits.argmax(-1) == y).double().mean(1)
    torch.testing.assert_close(out["accuracy"], acc)
    assert out["loss_barrier"].item() == pytest.approx(barrier(expected, coords).item())
    assert out["accuracy_barrier"].item() == pytest.approx(barrier(acc, coords, higher_is_better=True).item())
    # two "ranks" with uneven shares, point by point, merged: the same numbers
    ranks = [BarrierMetric(coords), BarrierMetric(coords)]
    for i in range(p):
        ranks[0].update(logits[i, :13], y[:13], index=i)
        ranks[1].update(logits[i, 13:], y[13:], index=i)
    ranks[0].merge_state(ranks[1])
    merged = ranks[0].compute()
    for key in out:
        torch.testing.assert_close(merged[key], out[key])


def test_metric_errors():
    m = BarrierMetric([0.0, 1.0])
    with pytest.raises(ValueError, match=r"\[P=2, B, K\]"):
        m.update(torch.randn(5, 3), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="out of range"):
        m.update(torch.randn(5, 3), torch.zeros(5, dtype=torch.long), index=2)
    m.update(torch.randn(5, 3), torch.zeros(5, dtype=torch.long), index=0)
    with pytest.raises(RuntimeError, match=r"points \[1\]"):
        m.compute()
