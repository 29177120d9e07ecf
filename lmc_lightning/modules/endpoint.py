"""EndpointModule: trains one network, a mode to be connected later."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

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

    Args:
        net: Registry name (see ``lmc_lightning.nets.available()``).
        net_kwargs: Extra architecture arguments, e.g. ``{"width": 2}`` or ``{"depth": 3, "width": 512}``.
        num_classes: Number of classes (linked from the data).
        input_shape: ``(C, H, W)`` of the inputs (linked from the data).
        optim: Optimiser and schedule.
        label_smoothing: Label smoothing of the loss.
        seed: Seed of the network's initialisation (independent of data order); None: the global RNG, as seeded by
            the run's ``seed_everything`` (so ``--seed_everything N`` varies it).
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
    ) -> None:
        super().__init__(num_classes=num_classes, input_shape=input_shape, optim=optim,
                         label_smoothing=label_smoothing)
        self.save_hparams()
        self.net = build_net(net, num_classes, self.input_shape, net_kwargs, seed)
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, x: Tensor) -> Tensor:
        """Logits of the network."""
        return self.net(x)

    def _step(self, batch: tuple[Tensor, Tensor], stage: str, acc: MulticlassAccuracy) -> Tensor:
        return self.classification_step(self.net, *batch, acc, stage)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Cross-entropy step."""
        return self._step(batch, "train", self.train_acc)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Validation loss and accuracy."""
        self._step(batch, "val", self.val_acc)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Test loss and accuracy."""
        self._step(batch, "test", self.test_acc)

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Predicted class indices."""
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x).argmax(dim=1)
