"""ConnectorModule: Anokhin & Yarotsky's distribution-based connections between two endpoints, under ``lmc test``.

``lmc test --model ConnectorModule --model.endpoints [a.ckpt,b.ckpt] --model.finder stepwise_wa --model.method arc
--model.match ot --model.num_points 61 --data FashionMNISTDataModule`` builds the path with
:func:`~lmc_lightning.weights.connect.connector_path` (on the evaluation device, WA features from the training split
with the test transform), evaluates ``num_points`` values of ``t`` on ``[0, end_time]`` and writes
``path.csv``/``path.json``/``path.png``.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lmc_lightning.modules.base import OptimConfig
from lmc_lightning.modules.path import BNMode, PathModule, WeightDict, evaluate_on_ranks
from lmc_lightning.weights.connect import check_options, connector_path, layer_chain
from lmc_lightning.weights.data import seeded_subset
from lmc_lightning.weights.paths import NonlinearPath, Path
from lmc_lightning.weights.result import PathResult

Finder = Literal["with_bias", "with_bias_wa", "simultaneous", "stepwise_butterfly", "stepwise_wa"]


class ConnectorModule(PathModule):
    """Evaluate a distribution-based connection (:mod:`lmc_lightning.weights.connect`) between two endpoints.

    Conv nets (VGG-style with conv bias, no normalisation, e.g. ``vgg16_garipov``) get the conv variants
    automatically (conv weights as samples, patch features for WA).

    Args:
        endpoints: Two endpoint checkpoints ``[theta_a, theta_b]``.
        finder: ``with_bias`` (one hidden layer, ``[0, 1]``), ``with_bias_wa`` (the seed's inverse-with-bias,
            ``[0, 2]``), ``simultaneous`` (``[0, 1]``), ``stepwise_butterfly`` (``[0, L - 1]``) or ``stepwise_wa``
            (``[0, L]``), ``L`` the number of Linear/Conv2d layers.
        method: ``lin`` or ``arc`` (centred, as in the seed).
        match: ``none`` or ``ot`` (optimal-transport matching of net 2's units first).
        solver: WA solver: ``lstsq`` (``torch.linalg.lstsq`` in float64) or ``pinv`` (the seed's formula).
        wa_samples: Training samples for WA features (a seeded subset); None: the whole training split, as in the
            seed.
        feature_batch_size: Samples per forward pass when computing WA features.
        train_curve: Evaluate the training split (test transform) along the path too, as the seed does; the result
            then has the evaluation sets ``test`` and ``train`` (``path.csv``/``path.json`` hold both, and
            ``path.json`` the seed's summary: start, end, min, max, mean and length-weighted integral per metric).
        num_points: Points on ``t`` in ``[0, end_time]``, endpoints included.
        bn: BatchNorm statistics at every point (``simultaneous`` on BN nets only; the other finders need nets
            without normalisation).
        bn_batches: Batches of training data for the BN statistics.
        bn_batch_size: Batch size of the BN statistics pass.
        evaluation_batch_size: Batch size of the evaluation pass.
        precision: Evaluation precision (``"auto"``: bf16 autocast on GPU).
        strategy: Evaluation strategy (``"auto"``, ``"loop"`` or ``"vmap"``; nonlinear paths run point by point).
        prefix: Network submodule inside the checkpoints.
        net: Architecture name, needed only for plain state dict endpoints.
        net_kwargs: Architecture arguments overriding the checkpoints'.
        output_dir: Folder of the result files; ``None``: the trainer's log folder.
        num_classes: Number of classes (linked from the data).
        input_shape: ``(C, H, W)`` of the inputs (linked from the data).
        optim: Unused (nothing is trained).
        label_smoothing: Unused.
    """

    min_endpoints = 2

    def __init__(
        self,
        endpoints: list[str] | None = None,
        finder: Finder = "stepwise_wa",
        method: Literal["lin", "arc"] = "lin",
        match: Literal["none", "ot"] = "none",
        solver: Literal["lstsq", "pinv"] = "lstsq",
        wa_samples: int | None = None,
        feature_batch_size: int = 1000,
        train_curve: bool = True,
        num_points: int = 21,
        bn: BNMode | None = None,
        bn_batches: int = 20,
        bn_batch_size: int = 500,
        evaluation_batch_size: int | None = None,
        precision: str = "auto",
        strategy: str = "auto",
        prefix: str | list[str] = "net",
        net: str | None = None,
        net_kwargs: dict[str, Any] | None = None,
        output_dir: str | None = None,
        num_classes: int = 10,
        input_shape: tuple[int, int, int] = (1, 28, 28),
        optim: OptimConfig | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        check_options(finder, method, match)
        if solver not in ("lstsq", "pinv"):
            raise ValueError(f"solver must be 'lstsq' or 'pinv', got {solver!r}.")
        if (wa_samples is not None and wa_samples < 1) or feature_batch_size < 1:
            raise ValueError(f"wa_samples and feature_batch_size must be >= 1, got {wa_samples} and "
                             f"{feature_batch_size}.")
        if endpoints is not None and len(endpoints) != 2:
            raise ValueError(f"ConnectorModule takes exactly 2 endpoints, got {len(endpoints)}.")
        super().__init__(
            endpoints=endpoints, num_points=num_points, bn=bn, bn_batches=bn_batches, bn_batch_size=bn_batch_size,
            evaluation_batch_size=evaluation_batch_size, precision=precision, strategy=strategy, prefix=prefix, net=net,
            net_kwargs=net_kwargs, output_dir=output_dir, num_classes=num_classes, input_shape=input_shape,
            optim=optim, label_smoothing=label_smoothing,
        )
        self.finder, self.method, self.match, self.solver = finder, method, match, solver
        self.wa_samples, self.feature_batch_size = wa_samples, feature_batch_size
        self.train_curve = train_curve
        self._thetas: list[WeightDict] | None = None

    def setup(self, stage: str) -> None:
        """Load the endpoints; the path itself is built on the evaluation device in :meth:`evaluate_grid`."""
        if stage == "fit":
            raise ValueError("ConnectorModule has nothing to train; evaluate it with `lmc test`.")
        if self._thetas is None:
            self._thetas = self.load_endpoints()
            if self.finder != "simultaneous" or self.match == "ot":
                layer_chain(self.net)  # fail early, naming the layer, for nets the finder cannot take

    def build_path(self, thetas: list[WeightDict]) -> Path | NonlinearPath:
        """The connection on ``self.device``; WA finders read the training split (test transform) of the data."""
        device = self.device
        a, b = ({k: v.to(device) for k, v in th.items()} for th in thetas)
        x = None
        if self.finder in ("with_bias_wa", "stepwise_wa", "stepwise_butterfly"):
            x, _ = seeded_subset(self._datamodule().split_tensors("train"), self.wa_samples)
            x = x.to(device)
        path = connector_path(self.net, a, b, self.finder, self.method, self.match, data=x, solver=self.solver,
                              batch_size=self.feature_batch_size)
        rank_zero_info(f"ConnectorModule: {self.finder} ({self.method}, match {self.match}) on "
                       f"[0, {getattr(path, 'end_time', 1.0):g}] between the endpoints of '{self.net_spec['name']}'.")
        return path

    @property
    def end_time(self) -> float:
        """Right end of the path's ``t`` range."""
        return float(getattr(self.path, "end_time", 1.0)) if self.path is not None else 1.0

    def eval_coords(self) -> Tensor:
        """``num_points`` values of ``t`` on ``[0, end_time]``."""
        return torch.linspace(0, self.end_time, self.num_points, dtype=torch.float64)[:, None]

    def evaluate_grid(self, split: str = "test") -> PathResult:
        """Build the path (once, on the evaluation device), then evaluate it on ``split`` (and, with
        ``train_curve``, on the training split: sets ``test`` and ``train``)."""
        if self.path is None:
            if self._thetas is None:
                raise RuntimeError("ConnectorModule: the endpoints are loaded in setup(); run it first.")
            self.path = self.build_path(self._thetas)
        dm = self._datamodule()
        train = dm.split_tensors("train")
        data = {split: dm.split_tensors(split), "train": train} if self.train_curve else dm.split_tensors(split)
        return evaluate_on_ranks(
            self.path, self.net, data, self.trainer, coords=self.eval_coords(), bn=self.bn,
            train_data=train if self.bn is not None else None, bn_batches=self.bn_batches,
            bn_batch_size=self.bn_batch_size, batch_size=self.evaluation_batch_size, device=self.device,
            precision=self.eval_precision, strategy=self.eval_strategy,
        )

    def log_result(self, result: PathResult) -> None:
        """The path module's metrics plus the seed's summary: ``summary/{set}_{metric}_{stat}`` and the length."""
        super().log_result(result)
        summary = result.summary()
        per_set = summary if result.sets else {"test": summary}
        for name, stats in per_set.items():
            for metric in ("loss", "accuracy"):
                for stat, value in stats[metric].items():
                    if value is not None:
                        self.log(f"summary/{name}_{metric}_{stat}", float(value), sync_dist=False)
            if stats["length"] is not None:
                self.log("summary/length", float(stats["length"]), sync_dist=False)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Nothing to store: the module is evaluated only."""
