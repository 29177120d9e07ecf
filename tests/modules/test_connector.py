"""ConnectorModule through `lmc test`; the shipped configs/connect configs parse."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from cli_fixtures import COMMON, fit_mlps, logger_args, split_tensors

from lmc_lightning.checkpoint import load_net
from lmc_lightning.cli import main
from lmc_lightning.modules import ConnectorModule


@pytest.fixture(scope="module")
def members(fake_fmnist_root: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three one-hidden-layer MLPs with bias (seeds 0, 1, 2), each trained for a few steps through `lmc fit`."""
    return fit_mlps(fake_fmnist_root, tmp_path_factory.mktemp("connect_endpoints"), '{"widths": [24], "bias": true}')


def test_lmc_test_connector_writes_the_path(members: list[Path], fake_fmnist_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "connect"
    main(["test", "--model", "ConnectorModule", "--model.endpoints", f"[{members[0]},{members[1]}]",
          "--model.finder", "with_bias_wa", "--model.method", "arc", "--model.match", "ot", "--model.num_points", "9",
          "--data.root", str(fake_fmnist_root), *COMMON, *logger_args(out)])
    files = {p.name: p for p in out.rglob("path.*")}
    assert set(files) == {"path.csv", "path.json", "path.png"}
    saved = json.loads(files["path.json"].read_text())
    ts = [c[0] for c in saved["coords"]]
    assert ts == pytest.approx([0.25 * i for i in range(9)])  # [0, end_time = 2]
    x, y = split_tensors(fake_fmnist_root, "test")
    with torch.no_grad():
        logits = [load_net(p)(x) for p in members[:2]]
    direct = [F.cross_entropy(lg, y).item() for lg in logits]
    assert [saved["loss"][0], saved["loss"][-1]] == pytest.approx(direct, abs=1e-5)


def test_connector_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="finder must be one of"):
        ConnectorModule(finder="butterfly")
    with pytest.raises(ValueError, match="exactly 2 endpoints"):
        ConnectorModule(endpoints=["a", "b", "c"])
    with pytest.raises(ValueError, match="match must be"):
        ConnectorModule(match="sinkhorn")

