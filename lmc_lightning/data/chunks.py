"""Several training batches handed to a module as one Lightning batch, and the optimiser steps that gives."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl


class StepChunk(tuple):
    """Consecutive training batches ``((x, y), (x, y), ...)`` given to a module at once.

    A :class:`~lmc_lightning.data.loaders.DeviceLoader` with ``steps_per_batch = S > 1`` yields these (``S``
    batches each; fewer at the end of an epoch). A module that accepts them (``supports_step_chunks = True``, e.g.
    :class:`~lmc_lightning.modules.EndpointModule`) makes one optimiser step per batch, the same steps in the same
    order as with ``S = 1``, while Lightning's per-batch work (hooks, loop bookkeeping, logging checks) runs once
    per chunk.
    """

    __slots__ = ()


def steps_per_batch(trainer: pl.Trainer) -> int:
    """Optimiser steps per Lightning training batch: the training loader's ``steps_per_batch`` (1 when it has
    none)."""
    return int(getattr(trainer.train_dataloader, "steps_per_batch", 1) or 1)


def estimated_steps(trainer: pl.Trainer) -> float:
    """``trainer.estimated_stepping_batches`` counted in optimiser steps: the same number unless the training
    loader yields :class:`StepChunk` batches, whose batches each make a step (``limit_train_batches`` counts
    chunks)."""
    total = trainer.estimated_stepping_batches  # also loads the training loader
    per_chunk = steps_per_batch(trainer)
    if per_chunk == 1 or not math.isfinite(total) or trainer.max_epochs in (None, -1):
        return total
    loader: Any = trainer.train_dataloader
    per_epoch = min(int(trainer.num_training_batches) * per_chunk, loader.num_steps)
    steps = per_epoch * max(trainer.max_epochs, 1)
    return min(steps, trainer.max_steps) if trainer.max_steps != -1 else steps
