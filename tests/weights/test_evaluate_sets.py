"""evaluate_path on several named evaluation sets: one statistics pass per point, each set equal to its own run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from net_factory import trained_like

from lmc_lightning.weights.evaluate import evaluate_path
from lmc_lightning.weights.paths import Linear
from lmc_lightning.weights.result import PathResult

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sets():
    g = torch.Generator().manual_seed(1)
    clean = (torch.randn(150, 1, 8, 8, generator=g), torch.randint(0, 5, (150,), generator=g))
    shifted = (2 * torch.randn(90, 1, 8, 8, generator=g) + 1, torch.randint(0, 5, (90,), generator=g))
    stats = torch.randn(200, 1, 8, 8, generator=g) * 0.5 + 0.3  # statistics data differ from both sets
    return {"clean": clean, "shifted": shifted}, stats


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_each_set_equals_its_own_single_set_run(sets, strategy):
    data, stats = sets
    a, b = (trained_like("resnet20", s, width=0.25, stats_samples=64) for s in (0, 1))
    path = Linear(a.state_dict(), b.state_dict())
    kw = dict(coords=[0.0, 0.4, 1.0], bn="reset", train_data=stats, bn_batches=2, bn_batch_size=100,
              batch_size=64, precision="32", device="cpu", strategy=strategy)
    multi = evaluate_path(path, a, data, **kw)
    assert multi.set_names == ["clean", "shifted"]
    assert multi.meta["num_test"] == {"clean": 150, "shifted": 90}
    for name, d in data.items():
        single = evaluate_path(path, a, d, **kw)
        np.testing.assert_allclose(multi.sets[name].loss, single.loss, rtol=0, atol=1e-6)
        np.testing.assert_array_equal(multi.sets[name].accuracy, single.accuracy)
        assert multi.sets[name].loss_barrier == pytest.approx(single.loss_barrier, abs=1e-6)
    np.testing.assert_array_equal(multi.loss, multi.sets["clean"].loss)  # the first set is the primary one
    # the two sets really differ (the shifted one is far from the statistics data)
    assert np.abs(multi.sets["clean"].loss - multi.sets["shifted"].loss).max() > 0.05


def test_named_sets_need_explicit_statistics_data(sets):
    data, _ = sets
    a = trained_like("resnet20", 0, width=0.25, stats_samples=64)
    path = Linear(a.state_dict(), a.state_dict())
    with pytest.raises(ValueError, match="train_data"):
        evaluate_path(path, a, data, num_points=2, bn="reset", device="cpu")
    with pytest.raises(ValueError, match="empty mapping"):
        evaluate_path(path, a, {}, num_points=2, device="cpu")
    with pytest.raises(TypeError, match=r"data\['bad'\]"):
        evaluate_path(path, a, {"bad": [1, 2, 3]}, num_points=2, device="cpu")


def test_multi_set_result_barriers_files_and_round_trip(tmp_path):
    ts = np.array([0.0, 0.5, 1.0])
    res = PathResult.from_sets(ts, {"clean": ([1.0, 3.0, 1.0], [0.9, 0.5, 0.9]),
                                    "rand_cue": ([2.0, 4.0, 4.0], [0.6, 0.2, 0.4])}, {"bn": "reset"})
    assert res.sets["clean"].loss_barrier == pytest.approx(2.0)
    assert res.sets["rand_cue"].loss_barrier == pytest.approx(1.0)  # 1 above the line 2 -> 4
    assert res.sets["rand_cue"].accuracy_barrier == pytest.approx(0.3)
    assert res.loss_barrier == pytest.approx(2.0)
    assert res.set_barriers()["rand_cue"]["loss_barrier"] == pytest.approx(1.0)
    rows = res.to_csv(tmp_path / "r.csv").read_text().splitlines()
    assert rows[0] == "t,set,loss,accuracy" and len(rows) == 7 and rows[5] == "0.5,rand_cue,4.0,0.2"
    saved = json.loads(res.to_json(tmp_path / "r.json").read_text())
    assert saved["sets"]["rand_cue"]["accuracy_barrier"] == pytest.approx(0.3)
    back = PathResult.from_json(tmp_path / "r.json")
    assert back.set_names == ["clean", "rand_cue"]
    np.testing.assert_array_equal(back.sets["rand_cue"].loss, [2.0, 4.0, 4.0])
    assert res.plot(tmp_path / "r.png").stat().st_size > 1000
    grid = np.array([(u, v) for u in (0, 1) for v in (0, 1)], dtype=float)
    surf = PathResult.from_sets(grid, {"a": (np.ones(4), np.ones(4)), "b": (np.zeros(4), np.ones(4))})
    assert surf.plot(tmp_path / "s.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="same coordinates"):
        PathResult(ts, [1, 2, 3], [1, 1, 1], sets={"x": PathResult([0.0, 1.0], [1, 1], [1, 1])})
    with pytest.raises(ValueError, match="at least one"):
        PathResult.from_sets(ts, {})
