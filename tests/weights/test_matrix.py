"""barrier_matrix: every pair's entry is that pair's evaluate_path barrier; symmetric with a zero diagonal."""

from __future__ import annotations

import pytest
import torch

from lmc_lightning.nets import get_net
from lmc_lightning.weights.evaluate import evaluate_path
from lmc_lightning.weights.matrix import barrier_matrix
from lmc_lightning.weights.paths import Linear


def test_barrier_matrix_matches_pairwise_paths(tmp_path) -> None:
    nets = []
    for seed in range(3):
        torch.manual_seed(seed)
        nets.append(get_net("mlp", num_classes=4, in_channels=1, input_size=6, depth=1, width=8))
    g = torch.Generator().manual_seed(0)
    data = (torch.randn(64, 1, 6, 6, generator=g), torch.randint(0, 4, (64,), generator=g))
    matrix = barrier_matrix(nets, nets[0], data, num_points=5, device="cpu")
    assert torch.equal(matrix.loss, matrix.loss.T) and torch.all(matrix.loss.diagonal() == 0)
    direct = evaluate_path(Linear(nets[0].state_dict(), nets[2].state_dict()), nets[0], data, num_points=5,
                           device="cpu")
    assert float(matrix.loss[0, 2]) == pytest.approx(float(direct.loss_barrier), abs=1e-9)
    assert float(matrix.accuracy[2, 0]) == pytest.approx(float(direct.accuracy_barrier), abs=1e-9)
    assert float(matrix.endpoint_accuracy[2]) == pytest.approx(float(direct.accuracy[-1]), abs=1e-9)
    assert len(matrix.off_diagonal()) == 3
    rows = matrix.to_csv(tmp_path / "m.csv").read_text().splitlines()
    assert rows[0] == "i,j,loss_barrier,accuracy_barrier" and len(rows) == 4
    assert matrix.plot(tmp_path / "m.png").stat().st_size > 0
    with pytest.raises(ValueError, match="at least 2"):
        barrier_matrix(nets[:1], nets[0], data)
