"""BarrierMetric: per-point loss and accuracy along a path, accumulated as sums so that it is exact under DDP."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

from lmc_lightning.metrics.functional import barrier


class BarrierMetric(Metric):
    """Loss and accuracy at ``P`` points of a path (or surface), and their barriers.

    States are per-point sums (summed cross-entropy, correct predictions, samples) reduced with ``"sum"``, so every
    rank may see a different share of the data.

    Args:
        coords: The points' coordinates, ``[P]`` (curve) or ``[P, 2]`` (surface); must contain the endpoints.
        **kwargs: Passed to :class:`torchmetrics.Metric`.

    Example:
        >>> m = BarrierMetric([0.0, 0.5, 1.0])
        >>> m.update(logits_at_point_1, y, index=1)   # or m.update(logits [P, B, K], y) for all points at once
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, coords: Sequence[float] | Sequence[Sequence[float]] | Tensor, **kwargs) -> None:
        super().__init__(**kwargs)
        c = torch.as_tensor(coords, dtype=torch.float64)
        self.coords = c.reshape(-1, 1) if c.dim() <= 1 else c
        p = self.coords.shape[0]
        if p == 0:
            raise ValueError("BarrierMetric needs at least one point.")
        self.add_state("loss_sum", torch.zeros(p, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("correct", torch.zeros(p, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros(p, dtype=torch.long), dist_reduce_fx="sum")

    @property
    def num_points(self) -> int:
        """Number of points ``P``."""
        return self.coords.shape[0]

    def update(self, preds: Tensor, target: Tensor, index: int | None = None) -> None:
        """Add a batch of logits.

        Args:
            preds: ``[B, K]`` logits of point ``index``, or ``[P, B, K]`` logits of all points.
            target: ``[B]`` class labels.
            index: Point index for ``[B, K]`` logits; ``None`` for ``[P, B, K]``.
        """
        if index is None:
            if preds.dim() != 3 or preds.shape[0] != self.num_points:
                raise ValueError(f"Without index, preds must be [P={self.num_points}, B, K]; got {tuple(preds.shape)}.")
            p, b, k = preds.shape
            losses = F.cross_entropy(preds.float().reshape(p * b, k), target.repeat(p), reduction="none")
            self.loss_sum += losses.view(p, b).sum(1).double()
            self.correct += (preds.argmax(-1) == target).sum(1)
            self.count += b
            return
        if not 0 <= index < self.num_points:
            raise ValueError(f"index {index} is out of range for {self.num_points} points.")
        self.loss_sum[index] += F.cross_entropy(preds.float(), target, reduction="sum").double()
        self.correct[index] += (preds.argmax(-1) == target).sum()
        self.count[index] += target.shape[0]

    def compute(self) -> dict[str, Tensor]:
        """Per-point ``loss`` and ``accuracy`` (``[P]``) and the four barrier numbers."""
        if bool((self.count == 0).any()):
            missing = (self.count == 0).nonzero().flatten().tolist()
            raise RuntimeError(f"BarrierMetric: no samples were added for points {missing}.")
        count = self.count.double()
        loss, acc = self.loss_sum / count, self.correct.double() / count
        coords = self.coords
        return {
            "loss": loss,
            "accuracy": acc,
            "loss_barrier": barrier(loss, coords),
            "accuracy_barrier": barrier(acc, coords, higher_is_better=True),
            "loss_barrier_mean": barrier(loss, coords, reference="mean"),
            "accuracy_barrier_mean": barrier(acc, coords, higher_is_better=True, reference="mean"),
        }
