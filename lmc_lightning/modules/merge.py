"""MergeModule: align N endpoints into one basin, merge them, and evaluate the simplex they span."""

from __future__ import annotations

import json
from pathlib import Path as FilePath
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info

from lmc_lightning.checkpoint import save_net
from lmc_lightning.io import atomic_write_text
from lmc_lightning.modules.base import OptimConfig
from lmc_lightning.modules.path import BNMode, PathModule, WeightDict, as_weight_dict, evaluate_on_ranks, rank_info
from lmc_lightning.progress import align_progress
from lmc_lightning.weights.evaluate import seeded_subset
from lmc_lightning.weights.paths import Linear, Path
from lmc_lightning.weights.permutation import ORDERS, align_many_weights
from lmc_lightning.weights.renorm import batchnorms
from lmc_lightning.weights.simplex import Simplex, check_weights, corner_index, renormalize_average, simplex_grid

AlignMode = Literal["weight", "activation", "ste"]
OrderMode = Literal["reference", "sequential", "iterative"]


class MergeModule(PathModule):
    """Merge N endpoints: align them (``align_many``), average them (weights ``merge_weights``), correct the
    average's statistics, and evaluate the simplex spanned by the aligned endpoints.

    ``lmc test --model MergeModule --model.endpoints [a.ckpt,b.ckpt,c.ckpt] --model.align weight --model.order
    iterative --model.bn reset --data FashionMNISTDataModule`` logs ``merge/loss``, ``merge/acc``,
    ``merge/loss_barrier`` (the merged model's loss minus the weighted mean of the endpoints' losses) and the
    simplex's ``barrier/*`` (relative to the endpoints' plane), and writes ``merged.ckpt`` (readable by ``load_net``),
    ``merge.json`` and ``path.csv/json/png`` (for N = 3 the plot is the triangle) into the log folder.

    Args:
        endpoints: Two or more endpoint checkpoints.
        align: ``"weight"``, ``"activation"`` or ``"ste"`` matching, or ``None`` (the naive average).
        order: ``"reference"`` (all to endpoint 0), ``"sequential"`` (each to the aligned previous one) or
            ``"iterative"`` (each to the mean of the others until nothing changes; weight matching only).
        align_samples: Training samples for the data-driven methods.
        merge_weights: Barycentric weights of the merge (one per endpoint, summing to 1); ``None``: uniform.
        save_merged: Where to write the merged network (``None``: ``merged.ckpt`` in the output folder).
        num_points: Points per edge of the simplex grid (``num_points * (num_points + 1) / 2`` points for N = 3).
        bn: Statistics of the merged model: ``"reset"`` (BN reset), ``"repair"`` / ``"rescale"`` / ``"reshift"`` /
            ``"rescale_centered"`` (toward the weighted endpoint statistics,
            :func:`~lmc_lightning.weights.simplex.renormalize_average`) or ``None``. The
            simplex grid gets a BN reset for every mode but ``None`` when the net has BatchNorm (REPAIR over a whole
            simplex is not offered), nothing otherwise.
        bn_batches: Batches of training data for the statistics.
        bn_batch_size: Batch size of the statistics pass.
        evaluation_batch_size: Batch size of the evaluation pass.
        precision: Evaluation precision (``"auto"``: bf16 autocast on GPU).
        strategy: Evaluation strategy (``"auto"``, ``"loop"`` or ``"vmap"``).
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
        align: AlignMode | None = "weight",
        order: OrderMode = "reference",
        align_samples: int = 5000,
        merge_weights: list[float] | None = None,
        save_merged: str | None = None,
        num_points: int = 6,
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
        if align is not None and align not in ("weight", "activation", "ste"):
            raise ValueError(f"align must be None, 'weight', 'activation' or 'ste', got {align!r}.")
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {order!r}.")
        if order == "iterative" and align not in (None, "weight"):
            raise ValueError("order='iterative' works with align='weight' only (it matches each model to the average "
                             "of the others' weights).")
        if align_samples < 1:
            raise ValueError(f"align_samples must be >= 1, got {align_samples}.")
        if endpoints is not None and merge_weights is not None:
            check_weights(merge_weights, len(endpoints))
        super().__init__(
            endpoints=endpoints, num_points=num_points, bn=bn, bn_batches=bn_batches, bn_batch_size=bn_batch_size,
            evaluation_batch_size=evaluation_batch_size, precision=precision, strategy=strategy, prefix=prefix, net=net,
            net_kwargs=net_kwargs, output_dir=output_dir, num_classes=num_classes, input_shape=input_shape,
            optim=optim, label_smoothing=label_smoothing,
        )
        self.align = align
        self.order = order
        self.align_samples = align_samples
        self.merge_weights = None if merge_weights is None else [float(w) for w in merge_weights]
        self.save_merged = save_merged
        self.merged: WeightDict | None = None
        self.merge_metrics: dict[str, float] = {}

    def prepare_endpoints(self, thetas: list[WeightDict]) -> list[WeightDict]:
        """Align the endpoints with :func:`~lmc_lightning.weights.permutation.align_many_weights` (rank 0; broadcast
        under DDP); unchanged when ``align`` is None."""
        if self.align is None:
            return thetas
        rank, world = rank_info(self._trainer)
        device = self.trainer.strategy.root_device if self._trainer is not None else None
        aligned = None
        if rank == 0:
            data = None
            if self.align != "weight":
                data = seeded_subset(self._datamodule().split_tensors("train"), self.align_samples)
            with align_progress(self._trainer, self.align, "MergeModule") as progress:
                result = align_many_weights(self.net, thetas, method=self.align, order=self.order, data=data,
                                            device=device, progress=progress)
            aligned = [as_weight_dict(t) for t in result.weights]
            rank_zero_info(f"MergeModule: aligned {len(thetas)} endpoints by {self.align} matching, {self.order} "
                           f"order ({result.rounds} round(s)).")
        if world > 1:
            aligned = self.trainer.strategy.broadcast(aligned, src=0)
        return [{k: a[k] for k in t} for a, t in zip(aligned, thetas, strict=True)]

    def build_path(self, thetas: list[WeightDict]) -> Path:
        """The simplex spanned by the (aligned) endpoints."""
        return Simplex(thetas)

    def eval_coords(self) -> torch.Tensor:
        """The simplex lattice with ``num_points`` points per edge."""
        return simplex_grid(self.path.num_fixed, self.num_points)

    def merged_weights(self) -> WeightDict:
        """The weighted average of the aligned endpoints with its statistics corrected by ``bn``."""
        n = self.path.num_fixed
        w = check_weights(self.merge_weights, n)
        merged = self.path.from_coefficients(w)
        if self.bn is not None and (self.bn != "reset" or batchnorms(self.net)):
            work = self.net.to(self.device)
            x = seeded_subset(self._datamodule().split_tensors("train"), self.bn_batches * self.bn_batch_size)[0]
            batches = list(x.to(self.device).split(self.bn_batch_size))
            merged = renormalize_average(work, [self.path.endpoint(i) for i in range(n)], merged, batches,
                                         self.bn, w)
        return as_weight_dict(merged)

    def on_test_epoch_end(self) -> None:
        """Evaluate the simplex grid (as every path module does), then the merged model; write its checkpoint."""
        requested = self.bn
        self.bn = None if requested is None else ("reset" if batchnorms(self.net) else None)
        try:
            super().on_test_epoch_end()
        finally:
            self.bn = requested
        self.merged = self.merged_weights()
        dm = self._datamodule()
        single = evaluate_on_ranks(
            Linear(self.merged, self.merged), self.net, dm.split_tensors("test"), self.trainer, coords=[0.0],
            batch_size=self.evaluation_batch_size, device=self.device, precision=self.eval_precision,
            strategy=self.eval_strategy)
        w = check_weights(self.merge_weights, self.path.num_fixed)
        ends = corner_index(self.result.coords)
        end_loss = sum(wi * float(self.result.loss[j]) for wi, j in zip(w, ends, strict=True))
        end_acc = sum(wi * float(self.result.accuracy[j]) for wi, j in zip(w, ends, strict=True))
        self.merge_metrics = {"merge/loss": float(single.loss[0]), "merge/acc": float(single.accuracy[0]),
                              "merge/loss_barrier": float(single.loss[0]) - end_loss,
                              "merge/accuracy_barrier": end_acc - float(single.accuracy[0])}
        for name, value in self.merge_metrics.items():
            self.log(name, value, sync_dist=False)
        if self.trainer.is_global_zero:
            folder = FilePath(self.output_dir or self.trainer.log_dir or self.trainer.default_root_dir)
            target = FilePath(self.save_merged) if self.save_merged else folder / "merged.ckpt"
            save_net(target, self.merged, self.net_spec)
            info = {**self.merge_metrics, "endpoints": self.endpoints, "align": self.align, "order": self.order,
                    "bn": self.bn, "merge_weights": w, "checkpoint": str(target)}
            self.result_files["merged"] = target
            self.result_files["merge_json"] = atomic_write_text(folder / "merge.json",
                                                                json.dumps(info, indent=2) + "\n")
            rank_zero_info(f"MergeModule: merged model loss {self.merge_metrics['merge/loss']:.4f}, accuracy "
                           f"{self.merge_metrics['merge/acc']:.4f}; wrote {target}")
