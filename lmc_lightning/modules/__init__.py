"""LightningModules, one per method."""

from lmc_lightning.modules.base import LMCModule, OptimConfig
from lmc_lightning.modules.connector import ConnectorModule
from lmc_lightning.modules.curve import CurveModule
from lmc_lightning.modules.endpoint import EndpointModule
from lmc_lightning.modules.ensemble import EnsembleModule
from lmc_lightning.modules.finetune import FineTuneModule
from lmc_lightning.modules.interpolation import InterpolationModule
from lmc_lightning.modules.pair import PairModule
from lmc_lightning.modules.path import PathModule
from lmc_lightning.modules.prune import PruneModule
from lmc_lightning.modules.similarity import SimilarityModule
from lmc_lightning.modules.stitch import StitchModule
from lmc_lightning.modules.surface import SurfaceModule

__all__ = ["ConnectorModule", "CurveModule", "EndpointModule", "EnsembleModule", "FineTuneModule",
           "InterpolationModule", "LMCModule", "OptimConfig", "PairModule", "PathModule", "PruneModule",
           "SimilarityModule", "StitchModule", "SurfaceModule"]
