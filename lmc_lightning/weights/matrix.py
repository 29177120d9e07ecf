"""Barriers between every pair of a set of networks (a zoo): K x K loss and accuracy matrices."""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lmc_lightning.weights.evaluate import evaluate_path
from lmc_lightning.weights.paths import Linear


@dataclass
class BarrierMatrix:
    """Symmetric ``[K, K]`` barrier matrices (zero diagonal) of the linear paths between ``K`` networks.

    Attributes:
        loss: Loss barrier of each pair (max over t of the loss minus the line between the endpoints' losses).
        accuracy: Accuracy barrier of each pair (same, for the error: endpoints' line minus accuracy).
        endpoint_accuracy: Test accuracy of each network (``t = 0`` of its paths).
    """

    loss: Tensor
    accuracy: Tensor
    endpoint_accuracy: Tensor

    def off_diagonal(self, which: str = "loss") -> Tensor:
        """The ``K (K - 1) / 2`` pair values of ``which`` (``"loss"`` or ``"accuracy"``)."""
        matrix = getattr(self, which)
        i, j = torch.triu_indices(len(matrix), len(matrix), offset=1)
        return matrix[i, j]

    def to_csv(self, path: str | os.PathLike) -> Path:
        """Write one row per pair: ``i, j, loss_barrier, accuracy_barrier``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        k = len(self.loss)
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["i", "j", "loss_barrier", "accuracy_barrier"])
            for i, j in combinations(range(k), 2):
                writer.writerow([i, j, f"{float(self.loss[i, j]):.6g}", f"{float(self.accuracy[i, j]):.6g}"])
        return path

    def plot(self, path: str | os.PathLike) -> Path:
        """Save heat maps of both matrices side by side."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(9, 4))
        for ax, (title, matrix) in zip(axes, (("loss barrier", self.loss), ("accuracy barrier", self.accuracy)),
                                       strict=True):
            image = ax.imshow(matrix.numpy(), cmap="viridis")
            ax.set_title(title)
            ax.set_xlabel("model")
            ax.set_ylabel("model")
            fig.colorbar(image, ax=ax, fraction=0.046)
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


def barrier_matrix(states: Sequence[Mapping[str, Tensor] | nn.Module], net: nn.Module, data: Any,
                   **evaluate_kwargs: Any) -> BarrierMatrix:
    """Barriers of the linear path between every pair of ``states``, each pair through :func:`evaluate_path`.

    Args:
        states: ``K >= 2`` state dicts (or networks) of ``net``'s architecture, e.g. the members of a zoo.
        net: The architecture.
        data: Test data in any form ``evaluate_path`` accepts.
        **evaluate_kwargs: Passed to ``evaluate_path`` (``num_points``, ``bn``, ``train_data``, ``device``, ...).
    """
    if len(states) < 2:
        raise ValueError(f"barrier_matrix needs at least 2 networks, got {len(states)}.")
    states = [s.state_dict() if isinstance(s, nn.Module) else s for s in states]
    k = len(states)
    loss, acc = torch.zeros(k, k, dtype=torch.float64), torch.zeros(k, k, dtype=torch.float64)
    endpoint = torch.zeros(k, dtype=torch.float64)
    for i, j in combinations(range(k), 2):
        result = evaluate_path(Linear(states[i], states[j]), net, data, **evaluate_kwargs)
        loss[i, j] = loss[j, i] = float(result.loss_barrier)
        acc[i, j] = acc[j, i] = float(result.accuracy_barrier)
        endpoint[i], endpoint[j] = float(result.accuracy[0]), float(result.accuracy[-1])
    return BarrierMatrix(loss, acc, endpoint)
