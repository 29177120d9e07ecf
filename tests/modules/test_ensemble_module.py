"""EnsembleModule through `lmc test`: plain and WA ensembles of checkpoints, and of a fitted path's grid."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_fixtures import COMMON, fit_mlps, logger_args, split_tensors
from torch.func import functional_call

from lmc_lightning import modules
from lmc_lightning.checkpoint import load_net
from lmc_lightning.cli import main
from lmc_lightning.modules import EnsembleModule


@pytest.fixture(scope="module")
def members(fake_fmnist_root: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three one-hidden-layer MLPs with bias (seeds 0, 1, 2), each trained for a few steps through `lmc fit`."""
    return fit_mlps(fake_fmnist_root, tmp_path_factory.mktemp("connect_endpoints"), '{"widths": [24], "bias": true}')


def test_lmc_test_ensemble_and_wa(members: list[Path], fake_fmnist_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "ensemble"
    cli = main(["test", "--model", "EnsembleModule", "--model.members", f"[{members[0]},{members[1]},{members[2]}]",
                "--model.wa_layer", "classifier", "--data.root", str(fake_fmnist_root), *COMMON, *logger_args(out)])
    saved = json.loads(next(out.rglob("ensemble.json")).read_text())
    assert set(saved) == {"plain", "wa"} and saved["plain"]["members"] == 3
    x, y = split_tensors(fake_fmnist_root, "test")
    with torch.no_grad():
        probs = torch.stack([load_net(p)(x).softmax(-1) for p in members])
    acc = (probs.mean(0).argmax(-1) == y).double().mean().item()
    assert saved["plain"]["ensemble_accuracy"][-1] == pytest.approx(acc, abs=1e-9)
    assert float(cli.trainer.callback_metrics["ensemble/plain_acc_3"]) == pytest.approx(acc, abs=1e-6)
    assert saved["wa"]["member_accuracy"][0] == pytest.approx(saved["plain"]["member_accuracy"][0], abs=0.02)
    with pytest.raises(ValueError, match="bn must be"):
        EnsembleModule(bn="repair")



@pytest.mark.parametrize(("kind", "corners", "grid"), [("CurveModule", (0, 1), 5), ("SurfaceModule", (0, 1, 2, 0), 3)])
def test_lmc_test_ensembles_a_path_checkpoints_grid(kind: str, corners: tuple[int, ...], grid: int,
                                                     members: list[Path], fake_fmnist_root: Path,
                                                     tmp_path: Path) -> None:
    """``--model.members [path.ckpt, c.ckpt] --model.grid N``: the nets at the fitted path's grid, then ``c``, equal
    to averaging the softmax outputs of the nets at those points directly."""
    fitted = tmp_path / "fit"
    main(["fit", "--model", kind, "--model.endpoints", f"[{','.join(str(members[i]) for i in corners)}]",
          "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3", "--data.root", str(fake_fmnist_root),
          *COMMON, *logger_args(fitted)])
    ckpt = sorted(fitted.rglob("*.ckpt"))[0]
    out = tmp_path / "ensemble"
    cli = main(["test", "--model", "EnsembleModule", "--model.members", f"[{ckpt},{members[2]}]", "--model.grid",
                str(grid), "--data.root", str(fake_fmnist_root), *COMMON, *logger_args(out)])
    saved = json.loads(next(out.rglob("ensemble.json")).read_text())["plain"]

    # Direct: Lightning's own restore of the fitted path, each grid net run on its own.
    path = getattr(modules, kind).load_from_checkpoint(ckpt, endpoints=None).path
    axis = torch.linspace(0, 1, grid, dtype=torch.float64)
    coords = [(t,) for t in axis.tolist()] if kind == "CurveModule" else [
        (u, v) for u in axis.tolist() for v in axis.tolist()]
    net = load_net(members[2])
    x, y = split_tensors(fake_fmnist_root, "test")
    with torch.no_grad():
        probs = torch.stack([functional_call(net, path(*c), (x,)).softmax(-1) for c in coords]
                            + [net(x).softmax(-1)]).double()
        first = load_net(members[corners[0]])(x)
        bent = path(*[0.5] * len(coords[0]))
    n = len(coords)
    assert saved["members"] == n + 1 and len(saved["meta"]["members"]) == n + 1
    assert saved["meta"]["members"][0].endswith("=0.00") and saved["meta"]["members"][-1] == str(members[2])
    for k in (n - 1, n):  # the grid alone, then the grid and the extra net
        mean = probs[:k + 1].mean(0)
        assert saved["ensemble_loss"][k] == pytest.approx(-mean.gather(1, y[:, None]).log().mean().item(), abs=1e-5)
        assert saved["ensemble_accuracy"][k] == pytest.approx((mean.argmax(-1) == y).double().mean().item(), abs=1e-9)
    losses = [torch.nn.functional.nll_loss(p.log(), y).item() for p in probs]
    assert saved["member_loss"] == pytest.approx(losses, abs=1e-5)
    # the first grid point is the first corner, and the fitted path's middle is not the straight line's
    assert saved["member_loss"][0] == pytest.approx(torch.nn.functional.cross_entropy(first, y).item(), abs=1e-5)
    straight = {k: sum(load_net(members[i]).state_dict()[k] for i in corners) / len(corners) for k in bent}
    assert max((bent[k] - straight[k]).abs().max().item() for k in bent) > 1e-4
    assert float(cli.trainer.callback_metrics[f"ensemble/plain_acc_{n + 1}"]) == pytest.approx(
        saved["ensemble_accuracy"][-1], abs=1e-6)
    with pytest.raises(ValueError, match="pass --model.grid"):
        EnsembleModule(members=[str(ckpt)]).setup("test")
