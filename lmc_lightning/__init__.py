"""lmc_lightning: train modes, connect them in weight space, measure what lies in between.

The top-level names are imported lazily so that ``import lmc_lightning`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "get_net": "lmc_lightning.nets",
    "load_net": "lmc_lightning.checkpoint",
    "load_weights": "lmc_lightning.checkpoint",
    "evaluate_path": "lmc_lightning.weights.evaluate",
    "PathResult": "lmc_lightning.weights.result",
    "align": "lmc_lightning.weights.permutation",
    "align_many": "lmc_lightning.weights.permutation",
    "EquivalenceError": "lmc_lightning.weights.permutation",
    "renormalize": "lmc_lightning.weights.renorm",
    "Linear": "lmc_lightning.weights.paths",
    "Arc": "lmc_lightning.weights.paths",
    "Bezier": "lmc_lightning.weights.curves",
    "PolyChain": "lmc_lightning.weights.curves",
    "BezierSurface": "lmc_lightning.weights.curves",
    "connector_path": "lmc_lightning.weights.connect",
    "ensemble_outputs": "lmc_lightning.weights.ensemble",
    "wa_ensemble": "lmc_lightning.weights.ensemble",
    "EndpointModule": "lmc_lightning.modules",
    "EnsembleModule": "lmc_lightning.modules",
    "ConnectorModule": "lmc_lightning.modules",
    "InterpolationModule": "lmc_lightning.modules",
    "MergeModule": "lmc_lightning.modules",
    "PruneModule": "lmc_lightning.modules",
    "Simplex": "lmc_lightning.weights.simplex",
    "PairModule": "lmc_lightning.modules",
    "CurveModule": "lmc_lightning.modules",
    "SurfaceModule": "lmc_lightning.modules",
    "FineTuneModule": "lmc_lightning.modules",
    "CueDataModule": "lmc_lightning.data",
    "StitchModule": "lmc_lightning.modules",
    "SimilarityModule": "lmc_lightning.modules",
    "stitch": "lmc_lightning.stitching",
    "stitch_points": "lmc_lightning.stitching",
    "transform_layer": "lmc_lightning.weights.symmetry",
    "main": "lmc_lightning.cli",
}

_SUBPACKAGES = ("callbacks", "checkpoint", "cli", "data", "io", "metrics", "modules", "nets", "plots", "prune",
                "stitching", "weights")
"""Imported on first access, so ``import lmc_lightning; lmc_lightning.nets.available()`` works."""

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in _SUBPACKAGES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'lmc_lightning' has no attribute '{name}'")
