"""Metrics along paths in weight space (torchmetrics Metrics with functional twins)."""

from lmc_lightning.metrics.barrier import BarrierMetric
from lmc_lightning.metrics.functional import barrier

__all__ = ["BarrierMetric", "barrier"]
