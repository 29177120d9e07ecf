"""EndpointModule: trains one network, a mode to be connected later."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.strategies import Strategy
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor, nn

from lmc_lightning.checkpoint import check_state_matches, load_weights, save_net
from lmc_lightning.data.chunks import StepChunk, steps_per_batch
from lmc_lightning.data.loaders import DeviceLoader
from lmc_lightning.data.zoo import ZooBatches
from lmc_lightning.metrics.totals import ClassificationTotals
from lmc_lightning.modules.base import LMCModule, OptimConfig
from lmc_lightning.nets import get_net
from lmc_lightning.nets.order import freeze_until
from lmc_lightning.weights.stacked import StackedNets


def build_net(net: str, num_classes: int, input_shape: tuple[int, int, int], net_kwargs: dict[str, Any] | None,
              seed: int | None = None) -> nn.Module:
    """Build a registry net for the given data shape, its initialisation seeded when ``seed`` is given."""
    kwargs = dict(net_kwargs or {})
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        return get_net(net, num_classes=num_classes, in_channels=input_shape[0], input_size=input_shape[1], **kwargs)


_BOOKKEEPING = frozenset({"_current_fx_name", "_current_dataloader_idx"})

UPDATE_HOOKS = ("backward", "on_before_backward", "on_after_backward", "on_before_optimizer_step")
"""Hooks that Lightning calls around a manual update: when neither the module nor a callback overrides them, the
update runs without Lightning's layers (:func:`direct_update_ok`)."""


def direct_update_ok(trainer: pl.Trainer, module: pl.LightningModule) -> bool:
    """Whether ``loss.backward(); optimizer.step()`` is exactly what ``manual_backward`` and Lightning's optimiser
    step would do: a single-device strategy and precision plugin that add nothing to backward and step (fp32,
    fp64, bf16-mixed, ``*-true``; not ``16-mixed``'s gradient scaler), and no override of :data:`UPDATE_HOOKS` by
    the module or a callback."""
    strategy, plugin = type(trainer.strategy), trainer.precision_plugin
    if any(getattr(strategy, name) is not getattr(Strategy, name)
           for name in ("backward", "pre_backward", "post_backward", "optimizer_step")):
        return False
    base = MixedPrecision if isinstance(plugin, MixedPrecision) and plugin.scaler is None else Precision
    if any(getattr(type(plugin), name) is not getattr(base, name)
           for name in ("pre_backward", "backward", "post_backward", "optimizer_step")):
        return False
    return not any(is_overridden(hook, module, pl.LightningModule) for hook in UPDATE_HOOKS) and not any(
        is_overridden(hook, callback, Callback) for callback in trainer.callbacks for hook in UPDATE_HOOKS[1:])


class EndpointModule(LMCModule):
    """Train a single classifier, or a zoo of ``num_models`` classifiers in one run.

    Logged: ``train/loss_step`` (on the steps the loggers write, every ``trainer.log_every_n_steps``),
    ``train/loss_epoch`` and ``train/acc`` per epoch (``train/loss`` in ``callback_metrics``), ``val/loss``,
    ``val/acc``, ``test/loss``, ``test/acc``. Epoch values come from sums kept on the device
    (:class:`~lmc_lightning.metrics.totals.ClassificationTotals`), so a training step reads nothing back to the host
    and calls ``self.log`` only when a logger will write. Training epoch values are logged after the epoch's last
    batch (so every callback's ``on_train_epoch_end`` sees this epoch's values), validation and test values from
    ``on_*_epoch_end``.

    **Zoo** (``num_models = K > 1``): member ``k`` is initialised with seed ``seed + k`` and reads the training data
    in the order (and augmentation stream) that data seed ``data.seed + k`` gives, so it is the run
    ``--model.seed {seed+k} --data.seed {data.seed+k}`` (when the data seed only orders the data: no ``val_split``,
    ``subset_mode="first"``). All members train together: ``self.net`` is a
    :class:`~lmc_lightning.weights.stacked.StackedNets` (stacked weights; convolutional nets of the usual layers run
    as one wide network with convolutions grouped by member, Flatten/Linear/ReLU chains such as ``mlp`` as broadcast
    matrix products, anything else through ``torch.func.vmap``; BatchNorm statistics per member),
    the loss is the sum of the members' mean losses and one element-wise optimiser steps them all (exactly as one
    optimiser per member; do not clip gradients by global norm). Logged metrics are the
    mean over members plus each member's under a ``_kk`` suffix (``val/acc_03``). Under DDP every rank holds all
    members and a share of each member's data (data split across ranks). Checkpoints: the Lightning checkpoint
    holds the stacked weights (``load_net(ckpt, index=k)``); at the end of every training epoch each member is also
    written alone, in the single-model layout that ``load_net`` and every path module read, to
    ``<checkpoint dir>/model_kk/last.ckpt`` (the ``ModelCheckpoint`` folder, else ``<default_root_dir>/zoo``).
    ``channels_last`` lays out the wide network's activations channels-last (a zoo that runs through ``vmap``
    ignores it). ``num_models=1`` is the plain single-model module.

    Args:
        net: Registry name (see ``lmc_lightning.nets.available()``).
        net_kwargs: Extra architecture arguments, e.g. ``{"width": 2}`` or ``{"depth": 3, "width": 512}``.
        num_classes: Number of classes (linked from the data).
        input_shape: ``(C, H, W)`` of the inputs (linked from the data).
        optim: Optimiser and schedule.
        label_smoothing: Label smoothing of the loss.
        seed: Seed of the network's initialisation (independent of data order); None: the global RNG, as seeded by
            the run's ``seed_everything`` (so ``--seed_everything N`` varies it). Zoo member ``k`` uses ``seed + k``
            (with None, the members draw one after another from the global RNG).
        channels_last: Keep conv weights and image batches in channels-last memory layout (faster convolutions on
            GPUs with tensor cores, notably under bf16; no effect on nets without ``Conv2d``).
        num_models: Train this many networks at once (a zoo); 1: a single network.
        init: Checkpoint whose weights (parameters and buffers) replace the initialisation: an ``EndpointModule``
            ``.ckpt`` or a plain state dict of this architecture. Loaded in ``setup`` (a resumed run's ``ckpt_path``
            still wins).
        init_prefix: Submodule holding the network in ``init`` (``"net"``; ``"net_a"``/``"net_b"`` for a
            ``PairModule`` checkpoint).
        freeze: Module name (``net.named_modules()``): the parameters of every module that runs up to and including
            it are not trained (see :func:`freeze_until`); e.g. the intertwiner sanity test retrains the layers after a
            transformed one. ``init`` and ``freeze`` need ``num_models=1``.
    """

    supports_step_chunks: bool = True
    """Training batches may come as :class:`~lmc_lightning.data.chunks.StepChunk` (``steps_per_batch`` of the
    datamodule): one optimiser step per batch of the chunk, as with plain batches (see :meth:`training_step`)."""

    direct_update: bool = True
    """Class setting: False sends every manual update through ``manual_backward`` and Lightning's optimiser wrapper
    (for comparisons; the update is the same)."""

    def __init__(
        self,
        net: str = "mlp",
        net_kwargs: dict[str, Any] | None = None,
        num_classes: int = 10,
        input_shape: tuple[int, int, int] = (1, 28, 28),
        optim: OptimConfig | None = None,
        label_smoothing: float = 0.0,
        seed: int | None = None,
        channels_last: bool = False,
        num_models: int = 1,
        init: str | None = None,
        init_prefix: str = "net",
        freeze: str | None = None,
    ) -> None:
        super().__init__(num_classes=num_classes, input_shape=input_shape, optim=optim,
                         label_smoothing=label_smoothing)
        if num_models < 1:
            raise ValueError(f"num_models must be >= 1 (1: a single network, K > 1: a zoo), got {num_models}.")
        self.save_hparams()
        self.num_models = num_models
        nets = [build_net(net, num_classes, self.input_shape, net_kwargs, None if seed is None else seed + k)
                for k in range(num_models)]
        self.net = nets[0] if num_models == 1 else StackedNets(nets)
        self.channels_last = channels_last and any(isinstance(m, nn.Conv2d) for m in nets[0].modules())
        if self.channels_last and num_models > 1:
            self.net.channels_last = True  # the zoo's wide activations (StackedNets.channels_last)
        elif self.channels_last:
            self.net.to(memory_format=torch.channels_last)
        self.train_totals = ClassificationTotals(num_models)
        self.val_totals = ClassificationTotals(num_models)
        self.test_totals = ClassificationTotals(num_models)
        self._zoo_batches: ZooBatches | None = None
        self._update_plan: tuple[Any, Any, bool] | None = None
        self._chunk = 1  # training batches per Lightning batch (set every epoch)
        self._automatic_optimization = False  # see automatic_optimization
        if (init is not None or freeze is not None) and num_models != 1:
            raise ValueError("init and freeze apply to a single network: use num_models=1.")
        self.init, self.init_prefix = init, init_prefix
        self._init_loaded = init is None
        self.frozen = freeze_until(self.net, freeze, self.input_shape) if freeze is not None else []

    @property
    def automatic_optimization(self) -> bool:
        """False (the step updates the weights itself) unless the trainer asks for gradient clipping or accumulation.

        The update is the one Lightning's automatic optimisation makes (``zero_grad``, ``manual_backward`` with the
        precision plugin, ``optimizer.step``, the step-wise schedule), without its closure and per-step hooks
        (``on_before_zero_grad``, ``on_before_optimizer_step`` and ``configure_gradient_clipping`` are not called).
        ``Trainer(gradient_clip_val=...)`` or ``accumulate_grad_batches > 1`` switch to automatic optimisation.
        """
        trainer = self._trainer
        if self._automatic_optimization or trainer is None:
            return self._automatic_optimization
        return bool(trainer.gradient_clip_val) or trainer.accumulate_grad_batches != 1

    @automatic_optimization.setter
    def automatic_optimization(self, value: bool) -> None:
        self._automatic_optimization = value

    def __setattr__(self, name: str, value: Any) -> None:
        """Lightning's per-hook bookkeeping attributes (set twice per hook call, about 30 times a step) skip
        ``nn.Module.__setattr__``'s parameter/module/buffer checks: they are never any of those."""
        if name in _BOOKKEEPING:
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    @property
    def is_zoo(self) -> bool:
        """Whether several networks train together."""
        return self.num_models > 1

    def setup(self, stage: str) -> None:
        """Load the ``init`` weights once."""
        if not self._init_loaded:
            state, _ = load_weights(self.init, self.init_prefix)
            check_state_matches(self.net, state, source=str(self.init))
            with torch.no_grad():
                for key, value in self.net.state_dict().items():
                    value.copy_(state[key])
            self._init_loaded = True

    def forward(self, x: Tensor) -> Tensor:
        """Logits of the network, ``[B, classes]``; of every zoo member on the same batch, ``[K, B, classes]``."""
        if self.is_zoo:
            return self.net(x, shared=True)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)

    def member(self, index: int) -> nn.Module:
        """Network ``index`` of the zoo as a plain ``nn.Module`` (a copy); ``self.net`` itself when not a zoo."""
        if not self.is_zoo:
            if index not in (0, -1):
                raise IndexError(f"member {index} of a single-network module (num_models=1).")
            return self.net
        return self.net.member(index)

    def _step(self, batch: tuple[Tensor, Tensor], stage: str, batch_idx: int = 0) -> Tensor:
        x, y = batch
        totals: ClassificationTotals = getattr(self, f"{stage}_totals")
        if not self.is_zoo:
            # The net and the loss function are called directly (not through self(x) and self.criterion): the same
            # computation with two fewer module calls per step.
            logits = self(x) if self.channels_last else self.net(x)
            loss = F.cross_entropy(logits, y, label_smoothing=self.criterion.label_smoothing)
            totals.accumulate(logits, y, loss)
            return loss
        if stage == "train":
            # Built here, after Lightning's batch transfer: apply the precision plugin's input cast (e.g. 64-true).
            x, y = self.trainer.precision_plugin.convert_input(self._zoo_batches.batch(batch_idx, self.device))
            logits = self.net(x)
        else:
            logits, y = self.net(x, shared=True), y.expand(self.num_models, -1)
        losses = F.cross_entropy(logits.transpose(1, 2), y, reduction="none",
                                 label_smoothing=self.criterion.label_smoothing).mean(1)
        totals.accumulate(logits, y, losses)
        # Each member's gradient is that of its own mean loss; the logged step loss is the members' mean.
        return losses.sum() if stage == "train" else losses.mean()

    def training_step(self, batch: tuple[Tensor, Tensor] | StepChunk, batch_idx: int) -> Tensor:
        """Cross-entropy step (of every zoo member on its own batch).

        A :class:`~lmc_lightning.data.chunks.StepChunk` (datamodule ``steps_per_batch = S``) makes one step per
        batch in it, each exactly as a plain batch would (same weights bit for bit, same epoch metrics); it stops
        at ``trainer.max_steps``. ``train/loss_step`` is then the chunk's last step's loss, logged when Lightning
        logs after the chunk (every ``log_every_n_steps`` chunks).
        """
        if type(batch) is StepChunk:
            if self.automatic_optimization:
                raise ValueError("steps_per_batch > 1 needs the module's own update: drop gradient_clip_val and "
                                 "accumulate_grad_batches, or use steps_per_batch=1.")
            trainer, first = self.trainer, batch_idx * self._chunk
            left = trainer.max_steps - trainer.global_step if trainer.max_steps >= 0 else len(batch)
            for j, item in enumerate(batch[:left]):
                loss = self._step(item, "train", first + j)
                self._update(loss)
        else:
            loss = self._step(batch, "train", batch_idx)
            if not self.automatic_optimization:
                self._update(loss)
        if self._logs_this_step():
            # A host copy (one sync per logging step): the progress bar reads its values on every step, which for
            # a device tensor would make the host wait for the GPU each step.
            self.log("train/loss_step", (loss.detach() / self.num_models).cpu(), on_step=True, on_epoch=False,
                     prog_bar=True)
        return loss

    def _update(self, loss: Tensor) -> None:
        """One optimiser step and the step-wise schedule (manual optimisation).

        Where nothing hooks into the update (see :func:`direct_update_ok`), ``loss.backward()`` and the optimiser's
        own ``step`` run directly, counted as Lightning counts them (``global_step``, profiler), without the
        strategy's and precision plugin's layers of empty hooks; otherwise through ``manual_backward`` and
        Lightning's optimiser wrapper. Both are the same update, bit for bit.
        """
        if self._update_plan is None:  # once per fit (reset in on_train_start)
            self._update_plan = (self.optimizers(), self.lr_schedulers(),
                                 self.direct_update and direct_update_ok(self.trainer, self))
        optimizer, scheduler, direct = self._update_plan
        if direct:
            optimizer.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer._on_before_step()  # Lightning's step counting (global_step) and profiler section
            optimizer.optimizer.step()
            optimizer._on_after_step()
        else:
            optimizer.zero_grad(set_to_none=True)
            self.manual_backward(loss)
            optimizer.step()
        if scheduler is not None:
            scheduler.step()

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Validation loss and accuracy."""
        self._step(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Test loss and accuracy."""
        self._step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Predicted class indices, ``[B]`` (``[K, B]`` for a zoo)."""
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x).argmax(dim=-1)

    def _logs_this_step(self) -> bool:
        """Whether a logger writes step metrics after this training step (the rule Lightning's own callbacks use)."""
        trainer = self.trainer
        return bool(trainer.fast_dev_run) or trainer._logger_connector.should_update_logs

    def _log_epoch(self, stage: str, **log_kwargs: Any) -> None:
        """Log the epoch's mean loss and accuracy from the device sums (all-reduced under DDP), then reset them.

        ``log_kwargs`` (``on_step``, ``on_epoch``) go to every ``self.log`` call."""
        totals: ClassificationTotals = getattr(self, f"{stage}_totals")
        if totals.update_count == 0:
            return
        # Host copies (one sync per epoch), so the progress bar's per-step reads do not wait for the GPU.
        loss, acc = (value.reshape(-1).cpu() for value in totals.compute())  # torchmetrics squeezes K = 1
        totals.reset()
        loss_name = "train/loss_epoch" if stage == "train" else f"{stage}/loss"
        self.log(loss_name, loss.mean(), prog_bar=True, **log_kwargs)
        if stage == "train":
            self.log("train/loss", loss.mean(), logger=False, **log_kwargs)
        self.log(f"{stage}/acc", acc.mean(), prog_bar=True, **log_kwargs)
        if self.is_zoo:
            for k in range(self.num_models):
                self.log(f"{loss_name}_{k:02d}", loss[k], **log_kwargs)
                self.log(f"{stage}/acc_{k:02d}", acc[k], **log_kwargs)

    # Zoo data and member checkpoints --------------------------------------------------------------------------------

    def on_train_start(self) -> None:
        """Choose the update path of this fit (see :meth:`_update`)."""
        self._update_plan = None

    def on_train_epoch_start(self) -> None:
        """Read the training loader's batches per Lightning batch; zoo: draw every member's data order."""
        self._chunk = steps_per_batch(self.trainer)
        if self._chunk > 1 and self.trainer.world_size > 1:
            # DDP reduces gradients in hooks armed once per forward of the wrapped module: one training_step.
            raise ValueError("steps_per_batch > 1 runs on a single process; under DDP use steps_per_batch=1.")
        if not self.is_zoo:
            return
        if self._zoo_batches is None:
            loader = self.trainer.train_dataloader
            base = loader.seed if isinstance(loader, DeviceLoader) else getattr(self.trainer.datamodule, "seed", 0)
            self._zoo_batches = ZooBatches(loader, [int(base) + k for k in range(self.num_models)],
                                           rank=self.global_rank, world_size=self.trainer.world_size)
        self._zoo_batches.start_epoch(self.current_epoch)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """After the epoch's last batch, log the epoch's training metrics: Lightning then reduces them before any
        callback's ``on_train_epoch_end``, so every callback sees this epoch's values (as with metrics logged in
        ``training_step``), not only the monitoring ones that run after the module's hook."""
        if self.trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            self._log_epoch("train", on_step=False, on_epoch=True)

    def on_train_epoch_end(self) -> None:
        self._log_epoch("train")  # an epoch cut short (max_steps, limit_train_batches) had no last batch
        if self.is_zoo:
            self.save_members()

    def on_fit_end(self) -> None:
        super().on_fit_end()
        self._zoo_batches = None
        self._update_plan = None

    def member_dir(self) -> Path:
        """Folder of the per-member checkpoints: the ``ModelCheckpoint`` folder, else ``<default_root_dir>/zoo``."""
        callback = self.trainer.checkpoint_callback
        if callback is not None and getattr(callback, "dirpath", None):
            return Path(callback.dirpath)
        return Path(self.trainer.default_root_dir) / "zoo"

    def save_members(self, folder: str | os.PathLike | None = None) -> list[Path]:
        """Write every zoo member as ``<folder>/model_kk/last.ckpt`` in the single-model checkpoint layout (rank 0).

        Returns:
            The files written (empty on other ranks).
        """
        if self._trainer is not None and not self.trainer.is_global_zero:
            return []
        folder = Path(folder) if folder is not None else self.member_dir()
        hp = self.hparams
        spec = {"name": hp["net"], "num_classes": self.num_classes, "in_channels": self.input_shape[0],
                "input_size": self.input_shape[1], **(hp.get("net_kwargs") or {})}
        states = ({name: v.detach().clone() for name, v in self.net.member_state(k).items()}  # no shared storage
                  for k in range(self.num_models))
        return [save_net(folder / f"model_{k:02d}" / "last.ckpt", state, spec) for k, state in enumerate(states)]

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")
