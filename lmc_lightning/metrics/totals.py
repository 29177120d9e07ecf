"""Epoch loss and accuracy from sums kept on the device: a few kernels per step, no host sync."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric


class ClassificationTotals(Metric):
    """Running sums of ``loss * n``, correct predictions and ``n`` for one or several models.

    ``update`` adds one batch with a handful of device kernels and never reads a value back to the host (unlike
    ``MulticlassAccuracy``, whose argument checks synchronise every step). ``compute`` gives the sample-weighted mean
    loss and the accuracy, the same numbers as Lightning's ``self.log(..., on_epoch=True, batch_size=n)`` mean of the
    batch losses and a micro-averaged accuracy. The sums are states with ``dist_reduce_fx="sum"``: exact under DDP.

    Args:
        num_models: Models tracked side by side (a zoo); their statistics stay separate.
    """

    full_state_update = False

    def __init__(self, num_models: int = 1) -> None:
        super().__init__()
        if num_models < 1:
            raise ValueError(f"num_models must be >= 1, got {num_models}.")
        self.num_models = num_models
        self.add_state("totals", torch.zeros(num_models, 3, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, logits: Tensor, target: Tensor, loss: Tensor) -> None:
        """Add a batch.

        Args:
            logits: ``[B, C]`` (one model) or ``[K, B, C]``.
            target: ``[B]`` or ``[K, B]`` class indices.
            loss: The batch's mean loss, a scalar or ``[K]``.
        """
        n = target.shape[-1]
        correct = (logits.detach().argmax(-1) == target).sum(-1).reshape(-1)
        batch = torch.stack([loss.detach().reshape(-1).double() * n, correct.double(),
                             torch.full_like(correct, n, dtype=torch.float64)], dim=-1)
        self.totals += batch

    def compute(self) -> tuple[Tensor, Tensor]:
        """``(mean loss, accuracy)``, each ``[num_models]`` (NaN for a model that saw no sample)."""
        loss_sum, correct, count = self.totals.unbind(-1)
        return (loss_sum / count).float(), (correct / count).float()
