"""StitchModule: train a stitching layer between two frozen endpoints (the modelsym seed's protocol)."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterable, Iterator
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from lmc_lightning.checkpoint import load_net
from lmc_lightning.modules.base import LMCModule, OptimConfig
from lmc_lightning.stitching import LAYERS, StitchLayer, _Rounded, make_layer, point_shapes, stitch

LayerKind = Literal["identity", "affine", "lowrank", "lasso", "birkhoff", "softsort"]

#: The seed's stitch optimiser: SGD without momentum, lr 1e-3, weight decay 1e-4, no schedule.
SEED_OPTIM = {"optimizer": "sgd", "lr": 1e-3, "momentum": 0.0, "weight_decay": 1e-4, "scheduler": "constant"}


def _inputs(loader: Iterable, device: torch.device, limit: int | None) -> Iterator[tuple[Tensor, Tensor]]:
    for x, y, *_ in itertools.islice(loader, limit):
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


@torch.no_grad()
def bn_pass(model: nn.Module, batches: Iterable[Tensor], eval_modules: Iterable[nn.Module] = ()) -> None:
    """The seed's no-grad BN epoch: forward training batches with ``model`` in train mode (BN running statistics
    follow their momentum) and ``eval_modules`` (the stitcher: hard rounding) in eval mode; nothing is trained."""
    model.train()
    for module in eval_modules:
        module.eval()
    for x in batches:
        model(x)


class StitchModule(LMCModule):
    """Stitch net A into net B at a point and train only the stitching layer.

    ``lmc fit --model StitchModule --model.endpoints [a.ckpt,b.ckpt] --model.point 5 --model.layer birkhoff
    --data FashionMNISTDataModule --trainer.max_epochs 20`` follows the seed: the frozen nets' BatchNorm layers run in
    train mode while the stitch trains (batch statistics; running statistics updated); after every epoch a no-grad
    BN pass (:func:`bn_pass`, ``bn_epoch``) re-estimates the running statistics with the stitcher in eval mode (hard
    rounding), validation runs, and the pre-pass state is restored. Logged per validation (and test):

    * ``stitch/accuracy``: the stitched net's accuracy (hard rounding for ``birkhoff``/``softsort``);
    * ``stitch/penalty``: mean endpoint accuracy minus ``stitch/accuracy``; the endpoints are measured once per
      stage, each after the same BN pass from its checkpoint's statistics, so both sides share one protocol;
    * ``stitch/endpoint_acc_a``, ``stitch/endpoint_acc_b``, ``stitch/best_accuracy``, ``stitch/best_penalty``;
    * for ``birkhoff``/``softsort``: ``stitch/accuracy_soft`` (no rounding, its own BN pass), ``stitch/rounding_cost``
      (soft minus hard), ``stitch/perm_distance`` (``||W - P||_F / sqrt(2C)``) and ``stitch/row_max`` (mean largest
      entry per row of W).

    Args:
        endpoints: ``[a.ckpt, b.ckpt]``; one architecture.
        point: Stitch point (see :func:`~lmc_lightning.stitching.stitch_points`); None: the first one.
        layer: Stitching layer type.
        rank: Rank of ``lowrank`` (the seed uses 1, 2, 4).
        lam: L1 multiplier of ``lasso``.
        alpha: Weight of ``birkhoff``'s ``-||W||_F`` penalty.
        sinkhorn_iters: Sinkhorn rounds of ``birkhoff``'s projection.
        tau: Temperature of ``softsort``.
        warmup_epochs: ``birkhoff``: epochs with the scalars off before they are switched on (the seed: 10 of 20).
        bn_epoch: Run the no-grad BN pass before each validation/test (the seed's ``--bn_epoch``).
        bn_batches: Training batches of the BN pass (per split); None: a whole epoch (the seed).
        bn_splits: Splits of the BN pass, in order: ``["train"]`` (the seed), or ``["train", "val"]`` (the seed's
            cross-validated variant before its test; the validation split in batches of the training batch size).
        prefix: Network submodule in the checkpoints (``"net"``, or ``["net_a", "net_b"]`` for one ``PairModule``
            checkpoint given twice).
        net: Architecture name for plain state dict endpoints.
        net_kwargs: Architecture arguments overriding the checkpoints'.
        num_classes: Number of classes (linked from the data).
        input_shape: ``(C, H, W)`` of the inputs (linked from the data).
        optim: Stitch optimiser; None: the seed's (SGD, no momentum, lr 1e-3, weight decay 1e-4 except on the
            Birkhoff/SoftSort permutation parameters, constant rate).
        label_smoothing: Label smoothing of the loss.
    """

    def __init__(
        self,
        endpoints: list[str] | None = None,
        point: str | None = None,
        layer: LayerKind = "affine",
        rank: int = 1,
        lam: float = 1e-3,
        alpha: float = 0.1,
        sinkhorn_iters: int = 16,
        tau: float = 1.0,
        warmup_epochs: int = 10,
        bn_epoch: bool = True,
        bn_batches: int | None = None,
        bn_splits: list[str] | None = None,
        prefix: str | list[str] = "net",
        net: str | None = None,
        net_kwargs: dict[str, Any] | None = None,
        num_classes: int = 10,
        input_shape: tuple[int, int, int] = (1, 28, 28),
        optim: OptimConfig | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        if layer not in LAYERS:
            raise ValueError(f"layer must be one of {LAYERS}, got {layer!r}.")
        if endpoints is not None and len(endpoints) != 2:
            raise ValueError(f"StitchModule needs two endpoints [a.ckpt, b.ckpt], got {len(endpoints)}.")
        if bn_batches is not None and bn_batches < 1:
            raise ValueError(f"bn_batches must be >= 1 or None (a whole epoch), got {bn_batches}.")
        bn_splits = ["train"] if bn_splits is None else list(bn_splits)
        if not bn_splits or set(bn_splits) - {"train", "val"}:
            raise ValueError(f"bn_splits must be a non-empty list of 'train' and 'val', got {bn_splits}.")
        super().__init__(num_classes=num_classes, input_shape=input_shape,
                         optim=optim if optim is not None else OptimConfig(**SEED_OPTIM),
                         label_smoothing=label_smoothing)
        self.save_hparams()
        self.endpoints, self.point, self.kind = endpoints, point, layer
        self.layer_options = {"rank": rank, "lam": lam, "alpha": alpha, "iters": sinkhorn_iters, "tau": tau}
        self.warmup_epochs, self.bn_epoch, self.bn_batches = warmup_epochs, bn_epoch, bn_batches
        self.bn_splits = bn_splits
        self.prefix, self.net_name, self.net_kwargs = prefix, net, dict(net_kwargs or {})
        self.stitched: nn.Module | None = None
        self.register_buffer("endpoint_acc", torch.full((2, 2), float("nan")))  # [val/test, a/b]
        self.acc = MulticlassAccuracy(num_classes, average="micro")
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.best_accuracy = float("-inf")
        #: The stitcher's state at the best validation accuracy so far (``best_accuracy``).
        self.best_stitcher: dict[str, Tensor] | None = None
        #: Stitch metrics of every validation, and (rounded layers) W's distance from a permutation per epoch.
        self.history: list[dict[str, float]] = []
        self.perm_history: list[dict[str, float]] = []
        self.last_metrics: dict[str, float] = {}
        self._snapshot: dict[str, Tensor] | None = None
        self._pristine: tuple[nn.Module, nn.Module] | None = None

    # ------------------------------------------------------------------------------------------------ building
    @property
    def stitcher(self) -> StitchLayer:
        """The stitching layer."""
        if self.stitched is None:
            raise RuntimeError("The stitched net is built in setup(); call trainer.fit/validate/test first.")
        return self.stitched.stitcher

    def _load_endpoint(self, i: int) -> nn.Module:
        prefix = self.prefix if isinstance(self.prefix, str) else self.prefix[i]
        return load_net(self.endpoints[i], net=self.net_name, prefix=prefix, **self.net_kwargs)

    def setup(self, stage: str) -> None:
        """Load the endpoints and build the stitched net (once)."""
        if self.stitched is not None:
            return
        if not self.endpoints:
            raise ValueError("StitchModule needs --model.endpoints [a.ckpt,b.ckpt].")
        net_a, net_b = self._load_endpoint(0), self._load_endpoint(1)
        self._pristine = (copy.deepcopy(net_a), copy.deepcopy(net_b))
        shapes = point_shapes(net_a, self.input_shape)
        point = self.point if self.point is not None else next(iter(shapes))
        if point not in shapes:
            raise ValueError(f"Unknown stitch point {point!r}; the points of this net are {list(shapes)}.")
        self.point = point
        layer = make_layer(self.kind, shapes[point][0], **self.layer_options)
        for p in [*net_a.parameters(), *net_b.parameters()]:
            p.requires_grad_(False)
        self.stitched = stitch(net_a, net_b, point, layer).to(self.device).train()  # endpoints load in eval mode

    def forward(self, x: Tensor) -> Tensor:
        """Logits of the stitched net."""
        return self.stitched(x)

    def trainable_parameters(self) -> Iterable[nn.Parameter]:
        """The stitcher's parameters."""
        return self.stitcher.parameters()

    def configure_optimizers(self) -> dict[str, Any]:
        """The stitch optimiser; weight decay on every stitcher weight except a permutation's (Birkhoff W)."""
        named = list(self.stitcher.named_parameters())
        if not named:
            raise ValueError(f"layer={self.kind!r} has no parameters to train; evaluate it with `lmc validate` or "
                             "`lmc test` instead of `lmc fit`.")
        free = [p for n, p in named if not (isinstance(self.stitcher, _Rounded) and n == "weight")]
        fixed = [p for n, p in named if isinstance(self.stitcher, _Rounded) and n == "weight"]
        opt = self.optim.build_optimizer(free)
        if fixed:
            opt.add_param_group({"params": fixed, "weight_decay": 0.0})
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        epochs = self.trainer.max_epochs if self.trainer.max_epochs and self.trainer.max_epochs > 0 else 1
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: self.optim.lr_factor(s, total, total / epochs))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ------------------------------------------------------------------------------------------------ training
    def on_train_epoch_start(self) -> None:
        """The whole stitched net in train mode (the seed's ``model.train()``: the frozen nets' BN layers use batch
        statistics and update their running statistics; the endpoints load in eval mode and Lightning keeps module
        modes); Birkhoff: scalars off during the warm-up epochs, on afterwards."""
        self.stitched.train()
        if hasattr(self.stitcher, "scalars_on") and self.kind == "birkhoff":
            self.stitcher.scalars_on = self.current_epoch >= self.warmup_epochs

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Cross-entropy of the stitched net plus the stitcher's penalty."""
        x, y = batch[0], batch[1]
        logits = self.stitched(x)
        loss = self.criterion(logits, y) + self.stitcher.penalty()
        self.train_acc(logits, y)
        self.log("train/loss", loss, batch_size=len(y), on_step=True, on_epoch=True, prog_bar=True)
        self.log("train/acc", self.train_acc, batch_size=len(y), on_step=False, on_epoch=True)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Projection after every optimiser step (Birkhoff: Sinkhorn of relu(W))."""
        self.stitcher.project()

    def on_train_epoch_end(self) -> None:
        """Rounded layers: log how far W is from a permutation (``stitch/perm_distance``, ``stitch/row_max``)."""
        if isinstance(self.stitcher, _Rounded):
            dist = self.stitcher.distance_to_permutation()
            self.perm_history.append({"epoch": self.current_epoch, **dist})
            self.log_dict({"stitch/perm_distance": dist["distance"], "stitch/row_max": dist["row_max"]})

    # ------------------------------------------------------------------------------------------------ evaluation
    def _bn_inputs(self) -> list[Tensor]:
        """Input batches of one BN pass: ``bn_batches`` of each split in ``bn_splits``."""
        dm = self.trainer.datamodule
        if dm is None:
            raise ValueError("StitchModule's BN pass needs a datamodule (the training data).")
        batches = []
        for split in self.bn_splits:
            if split == "train":
                batches += [x for x, _ in _inputs(dm.train_dataloader(), self.device, self.bn_batches)]
            else:
                x = dm.split_tensors("val")[0].split(dm.batch_size)
                batches += [b.to(self.device) for b in x[:self.bn_batches]]
        return batches

    def _eval_loader(self, stage: str) -> Iterable:
        loaders = self.trainer.val_dataloaders if stage == "val" else self.trainer.test_dataloaders
        return loaders[0] if isinstance(loaders, list | tuple) else loaders

    @torch.no_grad()
    def _accuracy(self, model: nn.Module, stage: str) -> float:
        acc = MulticlassAccuracy(self.num_classes, average="micro").to(self.device)
        model.eval()
        counts = self.trainer.num_val_batches if stage == "val" else self.trainer.num_test_batches
        limit = counts[0] if counts and counts[0] != float("inf") else None  # the loop's limit_*_batches
        for x, y in _inputs(self._eval_loader(stage), self.device, None if limit is None else int(limit)):
            acc.update(model(x), y)
        return float(acc.compute())

    def _measure_endpoints(self, stage: str, batches: list[Tensor]) -> None:
        row = 0 if stage == "val" else 1
        if not torch.isnan(self.endpoint_acc[row]).any():
            return
        for i, pristine in enumerate(self._pristine):
            net = copy.deepcopy(pristine).to(self.device)
            bn_pass(net, batches)
            self.endpoint_acc[row, i] = self._accuracy(net, stage)

    def _state(self) -> dict[str, Tensor]:
        return {k: v.detach().clone() for k, v in self.stitched.state_dict().items()}

    def _restore(self, state: dict[str, Tensor]) -> None:
        with torch.no_grad():
            for k, v in self.stitched.state_dict().items():
                v.copy_(state[k])

    def _start(self, stage: str) -> None:
        # one draw of training batches serves every BN pass of this evaluation (endpoints, soft and hard stitch)
        batches = self._bn_inputs() if self.bn_epoch else []
        self._measure_endpoints(stage, batches)
        self._snapshot = self._state()
        self._soft = None
        if isinstance(self.stitcher, _Rounded):
            self.stitcher.hard = False
            bn_pass(self.stitched, batches, [self.stitcher])
            self._soft = self._accuracy(self.stitched, stage)
            self.stitcher.hard = True
            self._restore(self._snapshot)
        bn_pass(self.stitched, batches, [self.stitcher])
        self.stitched.eval()

    def _end(self, stage: str) -> None:
        acc = float(self.acc.compute())
        self.acc.reset()
        ends = self.endpoint_acc[0 if stage == "val" else 1]
        mean_end = float(ends.mean())
        if stage == "val" and acc > self.best_accuracy:
            self.best_stitcher = {k: v.detach().clone() for k, v in self.stitcher.state_dict().items()}
        self.best_accuracy = max(self.best_accuracy, acc)
        logs = {"accuracy": acc, "penalty": mean_end - acc, "endpoint_acc_a": float(ends[0]),
                "endpoint_acc_b": float(ends[1]), "best_accuracy": self.best_accuracy,
                "best_penalty": mean_end - self.best_accuracy}
        if self._soft is not None:
            logs.update(accuracy_soft=self._soft, rounding_cost=self._soft - acc)
            dist = self.stitcher.distance_to_permutation()
            logs.update(perm_distance=dist["distance"], row_max=dist["row_max"])
        prefix = "stitch" if stage == "val" else "test/stitch"
        self.log_dict({f"{prefix}/{k}": v for k, v in logs.items()}, sync_dist=False)
        self.last_metrics = logs
        if stage == "val":
            self.history.append({"epoch": self.current_epoch, **logs})
        if self._snapshot is not None:
            self._restore(self._snapshot)
            self._snapshot = None

    def on_validation_start(self) -> None:
        """Endpoints (once), soft accuracy, then the BN pass with hard rounding."""
        if not self.trainer.sanity_checking:
            self._start("val")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Accumulate the stitched accuracy."""
        self.acc.update(self.stitched(batch[0]), batch[1])

    def on_validation_epoch_end(self) -> None:
        """Log the stitch metrics and restore the pre-pass state."""
        if self.trainer.sanity_checking:
            self.acc.reset()
            return
        self._end("val")

    def on_test_start(self) -> None:
        """As validation, on the test set."""
        self._start("test")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Accumulate the stitched accuracy."""
        self.acc.update(self.stitched(batch[0]), batch[1])

    def on_test_epoch_end(self) -> None:
        """Log the stitch metrics."""
        self._end("test")
