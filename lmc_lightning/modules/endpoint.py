"""EndpointModule: trains one network, a mode to be connected later."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lmc_lightning.metrics.totals import ClassificationTotals
from lmc_lightning.modules.base import LMCModule, OptimConfig
from lmc_lightning.nets import get_net


def build_net(net: str, num_classes: int, input_shape: tuple[int, int, int], net_kwargs: dict[str, Any] | None,
              seed: int | None = None) -> nn.Module:
    """Build a registry net for the given data shape, its initialisation seeded when ``seed`` is given."""
    kwargs = dict(net_kwargs or {})
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        return get_net(net, num_classes=num_classes, in_channels=input_shape[0], input_size=input_shape[1], **kwargs)


class EndpointModule(LMCModule):
    """Train a single classifier.

    Logged: ``train/loss_step`` (on the steps the loggers write, every ``trainer.log_every_n_steps``),
    ``train/loss_epoch`` and ``train/acc`` per epoch (``train/loss`` in ``callback_metrics``), ``val/loss``,
    ``val/acc``, ``test/loss``, ``test/acc``. Epoch values come from sums kept on the device
    (:class:`~lmc_lightning.metrics.totals.ClassificationTotals`), so a training step reads nothing back to the host
    and calls ``self.log`` only when a logger will write.

    Args:
        net: Registry name (see ``lmc_lightning.nets.available()``).
        net_kwargs: Extra architecture arguments, e.g. ``{"width": 2}`` or ``{"depth": 3, "width": 512}``.
        num_classes: Number of classes (linked from the data).
        input_shape: ``(C, H, W)`` of the inputs (linked from the data).
        optim: Optimiser and schedule.
        label_smoothing: Label smoothing of the loss.
        seed: Seed of the network's initialisation (independent of data order); None uses the global RNG.
        channels_last: Keep conv weights and image batches in channels-last memory layout (faster convolutions on
            GPUs with tensor cores, notably under bf16; no effect on nets without ``Conv2d``).
    """

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
    ) -> None:
        super().__init__(num_classes=num_classes, input_shape=input_shape, optim=optim,
                         label_smoothing=label_smoothing)
        self.save_hparams()
        self.net = build_net(net, num_classes, self.input_shape, net_kwargs, seed)
        self.channels_last = channels_last and any(isinstance(m, nn.Conv2d) for m in self.net.modules())
        if self.channels_last:
            self.net.to(memory_format=torch.channels_last)
        self.train_totals = ClassificationTotals()
        self.val_totals = ClassificationTotals()
        self.test_totals = ClassificationTotals()

    def forward(self, x: Tensor) -> Tensor:
        """Logits of the network."""
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)

    def _step(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = self.criterion(logits, y)
        getattr(self, f"{stage}_totals").update(logits, y, loss)
        return loss

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Cross-entropy step."""
        loss = self._step(batch, "train")
        if self._logs_this_step():
            self.log("train/loss_step", loss, on_step=True, on_epoch=False, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Validation loss and accuracy."""
        self._step(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Test loss and accuracy."""
        self._step(batch, "test")

    def _logs_this_step(self) -> bool:
        """Whether a logger writes step metrics after this training step (the rule Lightning's own callbacks use)."""
        trainer = self.trainer
        return bool(trainer.fast_dev_run) or trainer._logger_connector.should_update_logs

    def _log_epoch(self, stage: str) -> None:
        """Log the epoch's mean loss and accuracy from the device sums (all-reduced under DDP), then reset them."""
        totals: ClassificationTotals = getattr(self, f"{stage}_totals")
        if totals.update_count == 0:
            return
        loss, acc = (value.reshape(-1) for value in totals.compute())  # torchmetrics squeezes K = 1
        totals.reset()
        if stage == "train":
            self.log("train/loss_epoch", loss[0], prog_bar=True)
            self.log("train/loss", loss[0], logger=False)
        else:
            self.log(f"{stage}/loss", loss[0], prog_bar=True)
        self.log(f"{stage}/acc", acc[0], prog_bar=True)

    def on_train_epoch_end(self) -> None:
        self._log_epoch("train")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Predicted class indices."""
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x).argmax(dim=1)
