"""Output ensembles (mean softmax of weight dicts) and WA(n) ensembles."""

from __future__ import annotations

import json

import pytest
import torch

from lmc_lightning.nets import get_net
from lmc_lightning.weights.ensemble import (
    EnsembleResult,
    ensemble_outputs,
    path_members,
    wa_ensemble,
    wa_members,
    write_ensemble,
)
from lmc_lightning.weights.paths import Linear


def _members(n, widths=(8,), bias=True):
    out = []
    for seed in range(n):
        torch.manual_seed(seed)
        net = get_net("mlp", num_classes=4, in_channels=1, input_size=4, widths=list(widths), bias=bias).double()
        out.append({k: v.clone() for k, v in net.state_dict().items()})
    return net, out


def _data(n=200, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 4, 4, generator=g, dtype=torch.float64), torch.randint(0, 4, (n,), generator=g)


def test_ensemble_equals_a_direct_computation():
    net, members = _members(3)
    x, y = _data()
    result = ensemble_outputs(net, members, (x, y), batch_size=64, device="cpu")
    probs = torch.stack([torch.func.functional_call(net, m, (x,)).softmax(-1) for m in members])
    for k in range(3):
        logits = torch.func.functional_call(net, members[k], (x,))
        assert result.member_accuracy[k] == pytest.approx((logits.argmax(-1) == y).double().mean().item())
        assert result.member_loss[k] == pytest.approx(torch.nn.functional.cross_entropy(logits, y).item())
        mean = probs[: k + 1].mean(0)
        assert result.ensemble_accuracy[k] == pytest.approx((mean.argmax(-1) == y).double().mean().item())
        assert result.ensemble_loss[k] == pytest.approx(-mean[torch.arange(len(y)), y].log().mean().item())
    assert result.ensemble_accuracy[0] == result.member_accuracy[0]


def test_path_members_and_writers(tmp_path):
    net, members = _members(2)
    path = Linear(members[0], members[1])
    points = list(path_members(path, [0.0, 0.5, 1.0]))
    assert torch.equal(points[2]["classifier.weight"], members[1]["classifier.weight"])
    result = ensemble_outputs(net, points, _data(), device="cpu")
    files = write_ensemble({"path": result}, tmp_path)
    back = EnsembleResult.from_dict(json.loads(files["json"].read_text())["path"])
    assert back.size == 3 and back.ensemble_accuracy[-1] == result.ensemble_accuracy[-1]
    assert files["csv"].read_text().count("\n") == 4


def test_wa_members_share_the_base_and_reproduce_member_outputs():
    """WA(1) of an FC net: layers before the adjusted one are the base's; with a hidden layer wider than the data
    the re-fit reproduces each member's outputs exactly (the least-squares system is solvable)."""
    net, members = _members(3, widths=(60, 50), bias=False)
    x, _ = _data(40)
    adjusted = wa_members(net, members, x, "hidden.2")
    for k, (m, w) in enumerate(zip(members, adjusted, strict=True)):
        assert torch.equal(w["hidden.0.weight"], members[0]["hidden.0.weight"])
        assert torch.equal(w["classifier.weight"], m["classifier.weight"])
        out_m = torch.func.functional_call(net, m, (x,))
        out_w = torch.func.functional_call(net, w, (x,))
        assert torch.allclose(out_w, out_m, atol=1e-6), k


def test_wa_ensemble_reports_both():
    net, members = _members(3, widths=(30,))
    x, y = _data(300)
    res = wa_ensemble(net, members, (x[200:], y[200:]), x[:200], "classifier", device="cpu")
    assert set(res) == {"plain", "wa"} and res["wa"].size == 3
    assert res["wa"].member_accuracy[0] == pytest.approx(res["plain"].member_accuracy[0])
    with pytest.raises(ValueError, match="Linear/Conv2d layers are"):
        wa_members(net, members, x, "nope")
