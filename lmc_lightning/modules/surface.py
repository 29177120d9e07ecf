"""SurfaceModule: fit a Bezier surface spanned by four modes (MCSurface) and map loss/accuracy over ``(u, v)``.

``lmc fit --model SurfaceModule --model.endpoints [a.ckpt,b.ckpt,c.ckpt,d.ckpt] --model.degree 2`` trains the free
control points of the surface, sampling ``(u, v)`` uniformly on the unit square. ``lmc test`` evaluates a
``num_points x num_points`` grid (BatchNorm reset for BN nets by default) and writes ``path.csv``/``path.json`` and
heat maps of loss and accuracy (``path.png``), and logs/prints the lowest loss and highest accuracy with their
``(u, v)`` and, with ``ensemble: true``, the output ensemble of the grid. Without ``--ckpt_path`` it evaluates the
untrained surface, the bilinear interpolation of the four modes (MCSurface's ``--skip_load_model``).

MCSurface's own setup (``configs/surface/cifar10_vgg16_mcsurface.yaml``) is ``degree: 2``, ``sample_mode:
sequential``, ``warmup: two_edges``, ``corner_order: mcsurface``, ``bn: null`` and a constant learning rate.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from lmc_lightning.modules.base import OptimConfig
from lmc_lightning.modules.curve import BNChoice, FittedPathModule, check_fitting_args
from lmc_lightning.modules.path import WeightDict
from lmc_lightning.weights import renorm
from lmc_lightning.weights.curves import CORNER_ORDERS, BezierSurface, surface_degree
from lmc_lightning.weights.ensemble import ensemble_outputs, path_members
from lmc_lightning.weights.fit import parameter_keys, path_loss, sample_boundary, sample_uniform
from lmc_lightning.weights.paths import Path
from lmc_lightning.weights.result import PathResult

SampleMode = Literal["mean", "sequential"]
Warmup = Literal["boundary", "two_edges"]
CornerOrder = Literal["uv", "mcsurface"]


def grid_extrema(result: PathResult) -> dict[str, float]:
    """The lowest loss and the highest accuracy over a surface grid, with their ``(u, v)`` (MCSurface's printout).

    Ties go to the first grid point in the result's order.

    Returns:
        ``{"min_loss", "min_loss_u", "min_loss_v", "max_accuracy", "max_accuracy_u", "max_accuracy_v"}``.
    """
    if result.dim != 2:
        raise ValueError(f"grid_extrema needs a surface result (dim 2), got dim {result.dim}.")
    lo, hi = int(np.argmin(result.loss)), int(np.argmax(result.accuracy))
    return {
        "min_loss": float(result.loss[lo]), "min_loss_u": float(result.coords[lo, 0]),
        "min_loss_v": float(result.coords[lo, 1]),
        "max_accuracy": float(result.accuracy[hi]), "max_accuracy_u": float(result.coords[hi, 0]),
        "max_accuracy_v": float(result.coords[hi, 1]),
    }


class SurfaceModule(FittedPathModule):
    """Fit a Bezier surface through four corner modes; evaluate a ``(u, v)`` grid with ``lmc test``.

    Size: ``degree`` is the Bezier degree, MCSurface's ``num_bends: n`` (an ``(n + 1) x (n + 1)`` control grid;
    MCSurface's ``n = 2`` is a 3x3 grid with 5 free points). ``num_bends`` is our count of free points per edge
    between two corners, ``degree - 1``. Give one of them; neither means ``num_bends=1`` (= ``degree=2``).

    Sampling: every batch draws ``num_samples`` points ``(u, v)``. ``sample_mode="mean"`` averages their losses into
    one optimiser step; ``"sequential"`` (MCSurface) takes one optimiser step per point, ``num_samples`` steps per
    batch on the same batch (manual optimisation: the learning-rate schedule still advances once per batch, while
    ``trainer.global_step`` counts optimiser steps).

    Warm-up (``init_epochs``), ``warmup="boundary"``: ``(u, v)`` is drawn on the boundary of the square, so the four
    edge curves learn and the interior control points get no gradient. ``warmup="two_edges"`` (MCSurface): each
    sample draws ``v`` and its loss is the mean of the losses at ``(0, v)`` and ``(1, v)``, so only the two edges
    ``u = 0`` and ``u = 1`` learn (with ``corner_order="mcsurface"``: checkpoints 0 -> 1 and 2 -> 3). When the
    warm-up ends and ``fill_interior`` is set, the interior points are re-initialised as the Coons patch of the
    trained edges (:meth:`BezierSurface.fill_interior_from_edges`) and their optimiser state is cleared; by default
    this happens after the boundary warm-up and not after the two-edge one (MCSurface fills nothing). From then on
    ``(u, v)`` is uniform on the square and every free point trains. ``init_epochs=0`` trains the whole surface from
    the start.

    Differences from MCSurface by design: BN running statistics of the free points are not optimiser parameters
    (MCSurface's weight decay shrinks them, an artifact), and ``bn="auto"`` recomputes statistics at every evaluated
    point; ``bn=None`` evaluates with the interpolated statistics as MCSurface does.

    Args:
        endpoints: Four corner checkpoints, at the ``(u, v)`` positions of ``corner_order``.
        num_bends: Free control points per edge between two corners (control grid ``(num_bends + 2)^2``).
        degree: Bezier degree, MCSurface's ``num_bends`` (control grid ``(degree + 1)^2``); alternative to
            ``num_bends``.
        num_samples: ``(u, v)`` points sampled per batch (MCSurface used 20).
        sample_mode: ``"mean"`` (one step on the mean loss) or ``"sequential"`` (one step per point, MCSurface).
        init_epochs: Epochs of edge warm-up (see above).
        warmup: ``"boundary"`` (all four edges) or ``"two_edges"`` (edges ``u = 0`` and ``u = 1``, MCSurface).
        fill_interior: Fill the interior from the edges when the warm-up ends; ``None``: only after ``"boundary"``.
        corner_order: ``"uv"``: corners at ``(0, 0), (1, 0), (0, 1), (1, 1)``; ``"mcsurface"``: at
            ``(0, 0), (0, 1), (1, 0), (1, 1)``.
        reg: Weight of the L2 pull of the control points toward the bilinear surface.
        num_points: Grid points per axis evaluated by ``lmc test`` (``num_points**2`` points; MCSurface: 11).
        ensemble: Also evaluate the output ensemble of every grid point (mean softmax, MCSurface's
            ``ensemble_evaluation``; with the same BN statistics as the grid), logged as ``surface/ensemble_*`` and
            stored in ``path.json``'s ``meta.ensemble``.
        bn: BatchNorm statistics at evaluation: ``"auto"`` (reset for BN nets), ``"reset"`` or ``None``
            (interpolated statistics, MCSurface).
        bn_batches: Batches of training data for the BN statistics.
        bn_batch_size: Batch size of the BN statistics pass.
        evaluation_batch_size: Batch size of the evaluation pass (None: as large as memory allows on CUDA, 1000
            elsewhere; see :func:`~lmc_lightning.weights.evaluate.evaluate_path`).
        precision: Evaluation precision (``"auto"``: bf16 autocast on GPU).
        strategy: Evaluation strategy (``"auto"``, ``"loop"`` or ``"vmap"``).
        prefix: Network submodule inside the corners' checkpoints.
        net: Architecture name, needed only for plain state dict corners.
        net_kwargs: Architecture arguments overriding the checkpoints'.
        key_map: Rename the endpoints' checkpoint keys to the net's: a registered map's name
            (:func:`~lmc_lightning.checkpoint.key_maps`) or ``{regex: replacement}`` rules.
        output_dir: Folder of ``path.csv/json/png``; ``None``: the trainer's log folder.
        num_classes: Number of classes (linked from the data).
        input_shape: ``(C, H, W)`` of the inputs (linked from the data).
        optim: Optimiser and schedule of the control points.
        label_smoothing: Label smoothing of the training loss.
    """

    min_endpoints = 4
    extra_eval_settings: ClassVar[tuple[str, ...]] = ("ensemble",)

    def __init__(
        self,
        endpoints: list[str] | None = None,
        num_bends: int | None = None,
        degree: int | None = None,
        num_samples: int = 1,
        sample_mode: SampleMode = "mean",
        init_epochs: int = 0,
        warmup: Warmup = "boundary",
        fill_interior: bool | None = None,
        corner_order: CornerOrder = "uv",
        reg: float = 0.0,
        num_points: int = 11,
        ensemble: bool = False,
        bn: BNChoice | None = "auto",
        bn_batches: int = 20,
        bn_batch_size: int = 500,
        evaluation_batch_size: int | None = None,
        precision: str = "auto",
        strategy: str = "auto",
        prefix: str | list[str] = "net",
        net: str | None = None,
        net_kwargs: dict[str, Any] | None = None,
        key_map: str | dict[str, str] | None = None,
        output_dir: str | None = None,
        num_classes: int = 10,
        input_shape: tuple[int, int, int] = (1, 28, 28),
        optim: OptimConfig | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        order = CORNER_ORDERS.get(corner_order, CORNER_ORDERS["uv"])
        if endpoints is not None and len(endpoints) != 4:
            raise ValueError(f"SurfaceModule takes exactly 4 corner endpoints, at (u, v) = {list(order)}, got "
                             f"{len(endpoints)}.")
        bends = surface_degree(num_bends, degree)
        if bends < 1:
            raise ValueError("num_bends must be a positive integer (free points per edge; degree >= 2), got "
                             f"num_bends={num_bends!r}, degree={degree!r}.")
        if sample_mode not in ("mean", "sequential"):
            raise ValueError(f"sample_mode must be 'mean' or 'sequential', got {sample_mode!r}.")
        if warmup not in ("boundary", "two_edges"):
            raise ValueError(f"warmup must be 'boundary' or 'two_edges', got {warmup!r}.")
        if corner_order not in CORNER_ORDERS:
            raise ValueError(f"corner_order must be one of {sorted(CORNER_ORDERS)}, got {corner_order!r}.")
        if isinstance(init_epochs, bool) or not isinstance(init_epochs, int) or init_epochs < 0:
            raise ValueError(f"init_epochs must be a non-negative integer (edge-only warm-up), got {init_epochs!r}.")
        if bn in renorm.MODES:
            raise ValueError(f"bn={bn!r} interpolates endpoint statistics along a curve; a surface needs 'auto', "
                             "'reset' or None.")
        check_fitting_args(num_samples, reg, bn)
        super().__init__(
            endpoints=endpoints, num_points=num_points, bn=bn, bn_batches=bn_batches,
            bn_batch_size=bn_batch_size, evaluation_batch_size=evaluation_batch_size, precision=precision,
            strategy=strategy, prefix=prefix, net=net, net_kwargs=net_kwargs, key_map=key_map, output_dir=output_dir,
            num_classes=num_classes, input_shape=input_shape, optim=optim, label_smoothing=label_smoothing,
        )
        self.init_fitting(num_samples, reg, bn)
        self.num_bends = bends
        self.sample_mode = sample_mode
        self.init_epochs = init_epochs
        self.warmup = warmup
        self.fill_interior = warmup == "boundary" if fill_interior is None else bool(fill_interior)
        self.corner_order = corner_order
        self.automatic_optimization = sample_mode == "mean"
        self.ensemble = bool(ensemble)
        self.extrema: dict[str, float] = {}

    @property
    def degree(self) -> int:
        """Bezier degree of the surface, ``num_bends + 1`` (MCSurface's ``num_bends``)."""
        return self.num_bends + 1

    def build_path(self, thetas: list[WeightDict]) -> Path:
        """The Bezier surface, its control grid initialised on the bilinear interpolation of the corners."""
        return BezierSurface(thetas, self.num_bends, corner_order=self.corner_order)

    def on_fit_start(self) -> None:
        """Refuse a run whose warm-up would take every epoch (the interior would never train).

        Raises:
            ValueError: ``init_epochs >= max_epochs`` (a warning instead under ``fast_dev_run``, a smoke test).
        """
        max_epochs = self.trainer.max_epochs
        if max_epochs is not None and self.optim.horizon_epochs is not None:  # a planned stop, resumed later
            max_epochs = max(max_epochs, math.ceil(self.optim.horizon_epochs))
        if self.init_epochs and max_epochs is not None and 0 <= max_epochs <= self.init_epochs:
            message = (f"SurfaceModule: init_epochs={self.init_epochs} >= max_epochs={max_epochs}: training would end "
                       "inside the edge-only warm-up and the interior control points would never train. Lower "
                       "--model.init_epochs or raise --trainer.max_epochs.")
            if not self.trainer.fast_dev_run:
                raise ValueError(message)
            rank_zero_warn(message)

    @property
    def warming_up(self) -> bool:
        """Whether the current epoch belongs to the edge warm-up."""
        return self._trainer is not None and self.trainer.current_epoch < self.init_epochs

    def sample_groups(self) -> list[Tensor]:
        """The points of one batch, one ``[k, 2]`` group per optimiser step (each group's losses are averaged).

        ``"mean"`` gives one group of all points; ``"sequential"`` one group per sample. A two-edge warm-up sample
        is the pair ``(0, v), (1, v)``; a boundary one a point on the square's boundary; after the warm-up a point
        uniform on the square.
        """
        n = self.num_samples
        if self.warming_up and self.warmup == "two_edges":
            v = sample_uniform(n, 1)
            groups = [torch.cat([torch.zeros_like(v), v], 1), torch.cat([torch.ones_like(v), v], 1)]
            samples = list(torch.stack(groups, dim=1))  # n x [2, 2]
        else:
            coords = sample_boundary(n) if self.warming_up else sample_uniform(n, 2)
            samples = list(coords[:, None])
        return [torch.cat(samples)] if self.sample_mode == "mean" else samples

    def sample_coords(self) -> Tensor:
        """All points of one batch, ``[k, 2]`` (see :meth:`sample_groups`)."""
        return torch.cat(self.sample_groups())

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """``"mean"``: the mean loss over the sampled points (one step); ``"sequential"``: one step per point."""
        if self.automatic_optimization:
            return super().training_step(batch, batch_idx)
        x, y = batch
        if self._param_keys is None:
            self._param_keys = parameter_keys(self.net)
        self.net.train()
        opt = self.optimizers()
        total = x.new_zeros(())
        groups = self.sample_groups()
        for coords in groups:
            loss = path_loss(self.path, self.net, x, y, coords, reg=self.reg, loss_fn=self.criterion,
                             param_keys=self._param_keys)
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
            total = total + loss.detach()
        sched = self.lr_schedulers()
        if sched is not None:
            sched.step()
        total = total / len(groups)
        self.log("train/loss", total, batch_size=len(y), on_step=True, on_epoch=True, prog_bar=True)
        return total

    def on_train_epoch_start(self) -> None:
        """At the end of the warm-up, fill the interior from the trained edges (if asked) and clear its state."""
        if not (self.init_epochs and self.trainer.current_epoch == self.init_epochs):
            return
        if not self.fill_interior:
            rank_zero_info(f"SurfaceModule: {self.warmup} warm-up done after {self.init_epochs} epoch(s); training the "
                           "whole surface.")
            return
        self.path.fill_interior_from_edges()
        interior = torch.tensor([not e for e in self.path.on_edge], device=self.device)
        for opt in self.trainer.optimizers:
            for state in opt.state.values():
                for value in state.values():
                    if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == len(interior):
                        value[interior] = 0
        rank_zero_info(f"SurfaceModule: {self.warmup} warm-up done after {self.init_epochs} epoch(s); interior "
                       "control points filled from the edges, training the whole surface.")

    def evaluate_grid(self, split: str = "test") -> PathResult:
        """Evaluate the grid (see :meth:`FittedPathModule.evaluate_grid`); its extrema go into ``meta["extrema"]``."""
        result = super().evaluate_grid(split)
        self.extrema = grid_extrema(result)
        result.meta["extrema"] = dict(self.extrema)
        if self.ensemble:
            result.meta["ensemble"] = self.evaluate_ensemble(split)
        return result

    def evaluate_ensemble(self, split: str = "test") -> dict[str, float]:
        """Mean-softmax ensemble of the nets at every grid point on ``split`` (MCSurface's grid ensemble).

        Each point gets the grid's BN treatment (``bn="reset"``: statistics recomputed on the training split).
        Every rank computes it on the whole split (the result is the same everywhere).
        """
        dm = self._datamodule()
        train = dm.split_tensors("train") if self.bn is not None else None
        out = ensemble_outputs(self.net, path_members(self.path, self.eval_coords()), dm.split_tensors(split),
                               batch_size=self.evaluation_batch_size or 1000, device=self.device,
                               precision="bf16" if self.eval_precision == "bf16" else "32", bn=self.bn,
                               train_data=train, bn_batches=self.bn_batches, bn_batch_size=self.bn_batch_size)
        return {"accuracy": float(out.ensemble_accuracy[-1]), "loss": float(out.ensemble_loss[-1]),
                "members": int(out.size), "best_member_accuracy": float(out.member_accuracy.max())}

    def on_test_epoch_end(self) -> None:
        """Evaluate the grid and write its files (see :meth:`PathModule.on_test_epoch_end`); log and print extrema."""
        super().on_test_epoch_end()
        for name, value in self.extrema.items():
            self.log(f"surface/{name}", value, sync_dist=False)
        ens = self.result.meta.get("ensemble")
        if ens:
            self.log("surface/ensemble_acc", ens["accuracy"], sync_dist=False)
            self.log("surface/ensemble_loss", ens["loss"], sync_dist=False)
            rank_zero_info(f"SurfaceModule: ensemble of the {ens['members']} grid points: accuracy "
                           f"{ens['accuracy']:.4f}, loss {ens['loss']:.4f} (best point "
                           f"{ens['best_member_accuracy']:.4f}).")
        e = self.extrema
        rank_zero_info(f"SurfaceModule: lowest loss {e['min_loss']:.4f} at (u, v) = ({e['min_loss_u']:.2f}, "
                       f"{e['min_loss_v']:.2f}); highest accuracy {e['max_accuracy']:.4f} at (u, v) = "
                       f"({e['max_accuracy_u']:.2f}, {e['max_accuracy_v']:.2f}).")
