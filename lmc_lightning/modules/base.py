"""Base LightningModule: optimiser and schedule settings shared by every method."""

from __future__ import annotations

import math
import os
import random
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torchmetrics import Metric

from lmc_lightning.data.chunks import estimated_steps


@dataclass
class OptimConfig:
    """Optimiser and learning-rate schedule.

    Args:
        optimizer: ``"sgd"``, ``"adam"`` or ``"adamw"``.
        lr: Peak learning rate.
        momentum: SGD momentum.
        nesterov: Use Nesterov momentum (SGD).
        weight_decay: L2 penalty (decoupled for AdamW).
        betas: Adam/AdamW betas.
        scheduler: ``"constant"``, ``"multistep"`` (decay by ``gamma`` at ``milestones``), ``"cosine"`` (to 0 at the
            end of training), ``"onecycle"`` (linear up for ``warmup_epochs`` or 30%, cosine down) or ``"garipov"``
            (as in Garipov et al. and Anokhin & Yarotsky's ``train.py``: per epoch, with ``a = epoch / epochs``,
            factor 1 for ``a <= 0.5``, ``1 - 0.99 (a - 0.5) / 0.4`` for ``a <= 0.9``, then 0.01).
        milestones: Epochs (may be fractional) at which ``multistep`` multiplies the rate by ``gamma``.
        gamma: Decay factor for ``multistep``.
        warmup_epochs: Linear warm-up from 0 over this many epochs (fractional allowed), before any schedule.
        horizon_epochs: Length of the schedule in epochs; ``None``: the trainer's ``max_epochs`` (or ``max_steps``)
            of the run that starts training. A resumed run keeps the length stored in its checkpoint, so stopping
            early (``--trainer.max_epochs N --model.optim.horizon_epochs M``) and resuming to ``M`` follows the
            same schedule as one run to ``M``.
    """

    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.999)
    scheduler: Literal["constant", "multistep", "cosine", "onecycle", "garipov"] = "cosine"
    milestones: list[float] = field(default_factory=list)
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    horizon_epochs: float | None = None

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be positive, got {self.lr}.")
        if self.nesterov and (self.optimizer != "sgd" or self.momentum <= 0):
            raise ValueError("optim.nesterov needs optimizer 'sgd' with momentum > 0.")
        if self.warmup_epochs < 0:
            raise ValueError(f"optim.warmup_epochs must be >= 0, got {self.warmup_epochs}.")
        if self.horizon_epochs is not None and self.horizon_epochs <= 0:
            raise ValueError(f"optim.horizon_epochs must be > 0 or None, got {self.horizon_epochs}.")
        self.betas = tuple(self.betas)  # YAML gives lists

    def build_optimizer(self, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        """Create the optimiser over ``params``."""
        params = [p for p in params if p.requires_grad]
        if not params:
            raise ValueError("Nothing to optimise: the module has no trainable parameters.")
        if self.optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, nesterov=self.nesterov,
                                   weight_decay=self.weight_decay)
        cls = torch.optim.Adam if self.optimizer == "adam" else torch.optim.AdamW
        return cls(params, lr=self.lr, betas=self.betas, weight_decay=self.weight_decay)

    def lr_factor(self, step: int, total_steps: int, steps_per_epoch: float) -> float:
        """Multiplier of ``lr`` at optimiser step ``step`` (0-based) of ``total_steps``."""
        warm = self.warmup_epochs * steps_per_epoch
        if self.scheduler == "onecycle" and warm == 0:
            warm = 0.3 * total_steps
        if warm > 0 and step < warm:
            return (step + 1) / warm
        if self.scheduler == "multistep":
            epoch = step / max(steps_per_epoch, 1e-12)
            return self.gamma ** sum(epoch >= m for m in self.milestones)
        if self.scheduler == "garipov":
            return garipov_factor(int(step // max(steps_per_epoch, 1e-12)), total_steps / max(steps_per_epoch, 1e-12))
        if self.scheduler in ("cosine", "onecycle"):
            progress = (step - warm) / max(total_steps - warm, 1)
            return 0.5 * (1 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
        return 1.0


def garipov_factor(epoch: int, epochs: float) -> float:
    """Garipov et al.'s learning-rate factor at 0-based ``epoch`` of ``epochs``."""
    alpha = epoch / max(epochs, 1e-12)
    if alpha <= 0.5:
        return 1.0
    if alpha <= 0.9:
        return 1.0 - (alpha - 0.5) / 0.4 * 0.99
    return 0.01


def as_optim(optim: OptimConfig | dict[str, Any] | None) -> OptimConfig:
    """Accept an ``OptimConfig``, its dict form (as stored in checkpoints), or None (defaults)."""
    if optim is None:
        return OptimConfig()
    if isinstance(optim, OptimConfig):
        return optim
    return OptimConfig(**optim)


MODULE_KEY = "lmc_module"
"""Checkpoint entry naming the module class that wrote it."""
RNG_KEY = "lmc_rng"
"""Checkpoint entry holding the random generators' states (torch CPU and CUDA, numpy, python)."""
SCHEDULE_KEY = "lmc_schedule"
"""Checkpoint entry holding the learning-rate schedule's length in steps and steps per epoch."""


def rng_states() -> dict[str, Any]:
    """The global random generators' states, in plain types and tensors (loadable with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached": float(cached), "kind": str(kind)},
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what :func:`rng_states` returned."""
    torch.set_rng_state(states["torch"])
    n = states["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


class LMCModule(LightningModule):
    """Base class of every method: classification loss, optimiser and step-wise schedule.

    Conventions every subclass gets by inheriting (call ``super()`` where it overrides these hooks):

    - **Resume equals an uninterrupted run.** Checkpoints hold the random generators' states (torch, CUDA, numpy,
      python: ``t``/``(u, v)`` draws, augmentation) and the schedule's length; resuming ``fit`` from one restores
      both (:meth:`on_load_checkpoint`), the datamodules' training order is a function of ``(seed, epoch)``, and
      ``lmc fit --ckpt_path`` logs into the checkpoint's run folder. Draw randomness from the global generators (or
      from generators whose state you save), never from a generator created anew at ``fit`` start. A run stopped
      early on purpose sets ``optim.horizon_epochs`` to the final length, so that its schedule is the long one.
    - **Outputs.** The CLI puts every run in ``<default_root_dir>/<module class name>/<version>/`` (metrics,
      ``config.yaml``, ``checkpoints/``); write result files into ``trainer.log_dir`` (atomically, see
      :mod:`lmc_lightning.io`) and say where with ``rank_zero_info``.
    - **Seeds.** ``seed_everything`` seeds the run; module arguments such as ``seed`` default to None (follow it)
      and override it when given.
    - **Checkpoints** record the module class; loading one of another module is a clear error.

    Args:
        num_classes: Number of classes (linked from the datamodule by the CLI).
        input_shape: ``(C, H, W)`` of the inputs (linked from the datamodule by the CLI).
        optim: Optimiser and schedule settings.
        label_smoothing: Label smoothing of the cross-entropy loss.
    """

    def __init__(
        self,
        num_classes: int = 10,
        input_shape: tuple[int, int, int] = (1, 28, 28),
        optim: OptimConfig | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}.")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}.")
        self.num_classes = num_classes
        self.input_shape = tuple(input_shape)
        self.optim = as_optim(optim)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self._schedule: dict[str, float] | None = None

    def on_fit_end(self) -> None:
        """Say where the run's files are; forget the schedule length of this fit (a later ``fit`` computes its own)."""
        self._schedule = None
        checkpoint = self.trainer.checkpoint_callback
        folder = getattr(checkpoint, "dirpath", None) or self.trainer.log_dir
        if folder:
            rank_zero_info(f"{type(self).__name__}: run files in {os.path.abspath(folder)}")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record which module wrote the checkpoint (checked by :meth:`on_load_checkpoint`), the random generators'
        states and the schedule's length (restored on resume, see the class docstring)."""
        checkpoint[MODULE_KEY] = _qualname(type(self))
        checkpoint[RNG_KEY] = rng_states()
        if self._schedule is not None:
            checkpoint[SCHEDULE_KEY] = dict(self._schedule)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint written by another module (it would silently run, or fail on missing tensors).

        Raises:
            ValueError: Naming both modules.
        """
        writer = checkpoint.get(MODULE_KEY)
        if writer is not None and writer != _qualname(type(self)):
            raise ValueError(f"The checkpoint was written by {writer.rsplit('.', 1)[-1]}, not by "
                             f"{type(self).__name__}: pass a {type(self).__name__} checkpoint to --ckpt_path, or "
                             f"select --model {writer.rsplit('.', 1)[-1]} to run that one.")
        if self._trainer is not None and self.trainer.training:  # resuming fit: continue the stored streams
            if RNG_KEY in checkpoint:
                set_rng_states(checkpoint[RNG_KEY])
            if SCHEDULE_KEY in checkpoint:
                self._schedule = dict(checkpoint[SCHEDULE_KEY])

    def save_hparams(self, ignore: Iterable[str] = ()) -> None:
        """``save_hyperparameters`` with checkpoint-safe values (plain types only, for ``weights_only`` loading)."""
        self.save_hyperparameters(ignore=list(ignore), logger=True)
        for key, value in list(self.hparams.items()):
            if isinstance(value, OptimConfig):
                self.hparams[key] = asdict(value)
            elif isinstance(value, tuple):
                self.hparams[key] = list(value)

    def classification_step(self, net: nn.Module, x: Tensor, y: Tensor, acc: Metric, stage: str,
                            suffix: str = "") -> Tensor:
        """Loss of ``net`` on a batch; logs ``{stage}/loss{suffix}`` and ``{stage}/acc{suffix}`` with the batch size."""
        logits = net(x)
        loss = self.criterion(logits, y)
        acc(logits, y)
        on_step = stage == "train"
        self.log(f"{stage}/loss{suffix}", loss, batch_size=len(y), on_step=on_step, on_epoch=True, prog_bar=True,
                 sync_dist=not on_step)
        self.log(f"{stage}/acc{suffix}", acc, batch_size=len(y), on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def trainable_parameters(self) -> Iterable[nn.Parameter]:
        """Parameters the optimiser updates (all by default)."""
        return self.parameters()

    def schedule_length(self) -> tuple[int, float]:
        """``(total steps, steps per epoch)`` of the learning-rate schedule.

        From the checkpoint when resuming; else from ``optim.horizon_epochs`` or the trainer's limits.
        """
        if self._schedule is None:
            total = max(int(estimated_steps(self.trainer)), 1)
            epochs = self.trainer.max_epochs if self.trainer.max_epochs and self.trainer.max_epochs > 0 else 1
            per_epoch = total / epochs
            if self.optim.horizon_epochs is not None:
                total = max(round(self.optim.horizon_epochs * per_epoch), 1)
            self._schedule = {"total_steps": total, "steps_per_epoch": per_epoch}
        elif self.trainer.max_steps > self._schedule["total_steps"] or (
                self.trainer.max_epochs and self.trainer.max_epochs * self._schedule["steps_per_epoch"]
                > self._schedule["total_steps"] + 0.5):
            rank_zero_warn(f"Resuming beyond the schedule stored in the checkpoint ({self._schedule['total_steps']} "
                           "steps): the learning rate stays at its final value. For a longer schedule, start the "
                           "run with --model.optim.horizon_epochs set to the final length.")
        return int(self._schedule["total_steps"]), float(self._schedule["steps_per_epoch"])

    def configure_optimizers(self) -> dict[str, Any]:
        """Optimiser plus a per-step ``LambdaLR`` following ``optim``'s schedule over :meth:`schedule_length`."""
        opt = self.optim.build_optimizer(self.trainable_parameters())
        total, per_epoch = self.schedule_length()
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: self.optim.lr_factor(s, total, per_epoch))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
