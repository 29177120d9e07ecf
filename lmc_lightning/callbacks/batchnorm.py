"""BatchNormReset: recompute BatchNorm running statistics exactly, DDP-correct, during training."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from lmc_lightning.modules.path import rank_info
from lmc_lightning.weights.evaluate import seeded_subset
from lmc_lightning.weights.renorm import reset_bn

ResetWhen = Literal["train_epoch_end", "validation_start"]
NET_NAMES = ("net", "net_a", "net_b")


def has_batchnorm(net: nn.Module) -> bool:
    """Whether ``net`` holds a BatchNorm layer with running statistics."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats for m in net.modules())


def module_nets(pl_module: LightningModule, names: list[str] | None = None) -> dict[str, nn.Module]:
    """The networks of a module: the named submodules, or by default every one of ``net``, ``net_a``, ``net_b``."""
    if names is None:
        found = {n: m for n, m in pl_module.named_children() if n in NET_NAMES}
        if not found:
            raise ValueError(f"{type(pl_module).__name__} has no submodule named {' / '.join(NET_NAMES)}; "
                             "pass nets=[...] with the names of its networks.")
        return found
    out = {}
    for name in names:
        net = getattr(pl_module, name, None)
        if not isinstance(net, nn.Module):
            raise ValueError(f"{type(pl_module).__name__} has no network '{name}'; check the nets argument.")
        out[name] = net
    return out


class BatchNormReset(Callback):
    """Recompute the BatchNorm running statistics of the trained network(s) on training data.

    The statistics are exact averages over ``num_batches * batch_size`` training samples (a seeded subset, drawn
    once, without augmentation) instead of the momentum-blended values of training. Under DDP each rank forwards its
    slice of that subset through the unwrapped network and the per-channel sums are all-reduced
    (:func:`~lmc_lightning.weights.renorm.reset_bn`), so every rank ends with the statistics a single process would
    compute on the whole subset. Buffers are updated in place.

    Args:
        on: When to reset: ``"validation_start"`` (validation, and a checkpoint saved after it, use the reset
            statistics; skipped during the sanity check) or ``"train_epoch_end"`` (for runs without validation,
            whose checkpoints are saved at the end of the training epoch, after this callback).
        num_batches: Batches of ``batch_size`` samples in the subset.
        batch_size: Samples per batch.
        nets: Names of the networks to reset; ``None``: every submodule named ``net``, ``net_a`` or ``net_b``.
        seed: Seed of the subset.
    """

    def __init__(self, on: ResetWhen = "train_epoch_end", num_batches: int = 20, batch_size: int = 500,
                 nets: list[str] | None = None, seed: int = 0) -> None:
        if on not in ("train_epoch_end", "validation_start"):
            raise ValueError(f"on must be 'train_epoch_end' or 'validation_start', got {on!r}.")
        if num_batches < 1 or batch_size < 1:
            raise ValueError(f"num_batches and batch_size must be >= 1, got {num_batches} and {batch_size}.")
        if nets is not None and not nets:
            raise ValueError("nets is empty: give network names, or None for the defaults.")
        self.on = on
        self.num_batches = num_batches
        self.batch_size = batch_size
        self.nets = list(nets) if nets is not None else None
        self.seed = seed
        self.num_resets = 0
        self.last_step = -1
        self._inputs: Tensor | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(on=self.on, nets=self.nets)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Check the networks (fit only)."""
        if stage != "fit":
            return
        nets = module_nets(pl_module, self.nets)
        if not any(has_batchnorm(n) for n in nets.values()):
            rank_zero_info(f"BatchNormReset: {', '.join(nets)} hold no BatchNorm layer; nothing will be reset.")

    def _shard(self, trainer: Trainer) -> Tensor:
        """This rank's slice of the fixed training subset (drawn on first use)."""
        if self._inputs is None:
            dm = trainer.datamodule
            if dm is None or not hasattr(dm, "split_tensors"):
                raise ValueError("BatchNormReset needs an lmc_lightning datamodule (with split_tensors()).")
            x, _ = seeded_subset(dm.split_tensors("train"), self.num_batches * self.batch_size, seed=self.seed)
            self._inputs = x
        rank, world = rank_info(trainer)
        return self._inputs[rank::world]

    def reset(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Reset the statistics of every selected network now (all ranks must call this together)."""
        nets = [net for net in module_nets(pl_module, self.nets).values() if has_batchnorm(net)]
        if not nets:
            return
        shard = self._shard(trainer)
        device = pl_module.device

        def batches() -> Iterator[Tensor]:
            for chunk in shard.split(self.batch_size):
                yield chunk.to(device, non_blocking=True)

        for net in nets:
            was_training = net.training
            with torch.no_grad():
                reset_bn(net, batches())
            net.train(was_training)
        self.num_resets += 1
        self.last_step = trainer.global_step
        rank_zero_info(f"BatchNormReset: statistics recomputed on {len(self._inputs)} samples "
                       f"(step {trainer.global_step}).")

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.on == "train_epoch_end":
            self.reset(trainer, pl_module)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.on == "validation_start" and not trainer.sanity_checking:
            self.reset(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {"num_resets": self.num_resets, "last_step": self.last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.num_resets = int(state_dict.get("num_resets", 0))
        self.last_step = int(state_dict.get("last_step", -1))
