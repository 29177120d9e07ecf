"""Metrics: barriers along paths in weight space, representation similarity (torchmetrics Metrics with functional
twins in ``lmc_lightning.metrics.functional``)."""

from lmc_lightning.metrics.barrier import BarrierMetric
from lmc_lightning.metrics.functional import barrier
from lmc_lightning.metrics.similarity import GReLUCKA, GReLUProcrustes, LinearCKA, OrthogonalProcrustes
from lmc_lightning.metrics.similarity_functional import similarity_matrix

__all__ = ["BarrierMetric", "GReLUCKA", "GReLUProcrustes", "LinearCKA", "OrthogonalProcrustes", "barrier",
           "similarity_matrix"]
