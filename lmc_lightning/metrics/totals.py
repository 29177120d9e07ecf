"""Epoch loss and accuracy from sums kept on the device: a few kernels per step, no host sync."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric


class ClassificationTotals(Metric):
    """Running sums of ``loss * n``, correct predictions and ``n`` for one or several models.

    ``update`` adds one batch with a handful of device kernels and never reads a value back to the host (unlike
    ``MulticlassAccuracy``, whose argument checks synchronise every step); :meth:`accumulate` is the same addition
    without torchmetrics' ``update`` wrapper, for training steps where each microsecond of host time counts.
    ``compute`` gives the sample-weighted mean loss and the accuracy, the same numbers as Lightning's
    ``self.log(..., on_epoch=True, batch_size=n)`` mean of the batch losses and a micro-averaged accuracy. The sums
    are states with ``dist_reduce_fx="sum"``: exact under DDP.

    Args:
        num_models: Models tracked side by side (a zoo); their statistics stay separate.
    """

    full_state_update = False

    def __init__(self, num_models: int = 1) -> None:
        super().__init__()
        if num_models < 1:
            raise ValueError(f"num_models must be >= 1, got {num_models}.")
        self.num_models = num_models
        for name in ("loss_sum", "correct", "count"):
            self.add_state(name, torch.zeros(num_models, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, logits: Tensor, target: Tensor, loss: Tensor) -> None:
        """Add a batch.

        Args:
            logits: ``[B, C]`` (one model) or ``[K, B, C]``.
            target: ``[B]`` or ``[K, B]`` class indices.
            loss: The batch's mean loss, a scalar or ``[K]``.
        """
        self._add(logits, target, loss)

    def accumulate(self, logits: Tensor, target: Tensor, loss: Tensor) -> None:
        """:meth:`update` without torchmetrics' wrapper (same sums and update count; inputs are detached here)."""
        state = self.__dict__  # plain attributes: skip nn.Module's and Metric's __setattr__ checks
        state["_computed"] = None
        state["_update_count"] += 1
        self._add(logits, target, loss)

    def _add(self, logits: Tensor, target: Tensor, loss: Tensor) -> None:
        # Five kernels: argmax, ==, sum, and three in-place additions into float64 sums (exact for counts).
        n = target.shape[-1]
        self.loss_sum.add_(loss.detach(), alpha=n)
        self.correct.add_((logits.detach().argmax(-1) == target).sum(-1))
        self.count.add_(n)

    def compute(self) -> tuple[Tensor, Tensor]:
        """``(mean loss, accuracy)``, each ``[num_models]`` (NaN for a model that saw no sample)."""
        return (self.loss_sum / self.count).float(), (self.correct / self.count).float()
