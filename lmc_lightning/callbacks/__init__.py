"""Lightning callbacks: the interpolation barrier during training, DDP-correct BatchNorm resets."""

from lmc_lightning.callbacks.barrier import InterpolationBarrier
from lmc_lightning.callbacks.batchnorm import BatchNormReset

__all__ = ["BatchNormReset", "InterpolationBarrier"]
