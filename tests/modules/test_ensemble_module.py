"""EnsembleModule through `lmc test`: plain and WA ensembles of checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_fixtures import COMMON, fit_mlps, logger_args, split_tensors

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

