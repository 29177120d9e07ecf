"""MergeModule: `lmc test` on three endpoints trained by `lmc fit`: merged checkpoint, its metrics, the simplex."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from cli_fixtures import fit_mlps, logger_args

from lmc_lightning.checkpoint import load_net
from lmc_lightning.cli import main
from lmc_lightning.data import FashionMNISTDataModule
from lmc_lightning.modules import MergeModule
from lmc_lightning.weights.permutation import align_many
from lmc_lightning.weights.simplex import average

CONFIG = Path(__file__).parents[2] / "configs" / "merge" / "fmnist_mlp.yaml"


@pytest.fixture(scope="module")
def endpoints(fake_fmnist_root: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three tiny MLP endpoints (seeds 0, 1, 2), each trained for a few steps through `lmc fit`."""
    return fit_mlps(fake_fmnist_root, tmp_path_factory.mktemp("endpoints"), '{"depth": 2, "width": 12}')


def test_lmc_test_merges_three_endpoints(endpoints: list[Path], fake_fmnist_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "merge"
    cli = main(["test", "--config", str(CONFIG), "--model.endpoints", f"[{','.join(map(str, endpoints))}]",
                "--model.align", "weight", "--model.order", "iterative", "--model.num_points", "4",
                "--data.root", str(fake_fmnist_root), "--trainer.accelerator", "cpu", *logger_args(out)])
    files = {p.name: p for p in out.rglob("*") if p.is_file()}
    assert {"merged.ckpt", "merge.json", "path.csv", "path.json", "path.png"} <= set(files)
    assert files["path.png"].stat().st_size > 1000

    # The merged checkpoint is the uniform average of the iteratively aligned endpoints, and its logged metrics
    # are its own test loss and accuracy.
    nets = [load_net(p) for p in endpoints]
    aligned, _ = align_many(nets, order="iterative", check=False)
    expected = average([n.state_dict() for n in aligned])
    merged = load_net(files["merged.ckpt"])
    assert all(torch.allclose(merged.state_dict()[k], expected[k]) for k in expected)
    dm = FashionMNISTDataModule(root=str(fake_fmnist_root))
    dm.setup("test")
    x, y = dm.split_tensors("test")
    with torch.no_grad():
        logits = merged(x)
        ends = [F.cross_entropy(n(x), y).item() for n in nets]
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    assert metrics["merge/loss"] == pytest.approx(F.cross_entropy(logits, y).item(), abs=1e-5)
    assert metrics["merge/acc"] == pytest.approx((logits.argmax(1) == y).double().mean().item(), abs=1e-9)
    assert metrics["merge/loss_barrier"] == pytest.approx(metrics["merge/loss"] - sum(ends) / 3, abs=1e-5)
    saved = json.loads(files["merge.json"].read_text())
    assert saved["order"] == "iterative" and saved["merge/acc"] == pytest.approx(metrics["merge/acc"])

    # The simplex grid: 10 points for 4 per edge; its corners are the endpoints (permuting changes nothing).
    path = json.loads(files["path.json"].read_text())
    assert len(path["coords"]) == 10 and path["meta"]["kind"] == "simplex"
    corners = [path["coords"].index(c) for c in ([0.0, 0.0], [1.0, 0.0], [0.0, 1.0])]
    assert [path["loss"][i] for i in corners] == pytest.approx(ends, abs=1e-5)
    assert metrics["barrier/loss"] == pytest.approx(path["loss_barrier"], abs=1e-6)


def test_print_config_and_bad_arguments(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        main(["test", "--config", str(CONFIG), "--print_config"])
    assert info.value.code in (0, None)
    assert "MergeModule" in capsys.readouterr().out
    with pytest.raises(ValueError, match="order"):
        MergeModule(order="random")
    with pytest.raises(ValueError, match="iterative"):
        MergeModule(align="activation", order="iterative")
    with pytest.raises(ValueError, match="merge weights"):
        MergeModule(endpoints=["a", "b", "c"], merge_weights=[0.5, 0.5])
