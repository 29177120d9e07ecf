"""LightningModules, one per method."""

from lmc_lightning.modules.base import LMCModule, OptimConfig
from lmc_lightning.modules.endpoint import EndpointModule

__all__ = ["EndpointModule", "LMCModule", "OptimConfig"]
