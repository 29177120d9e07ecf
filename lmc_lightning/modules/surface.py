"""SurfaceModule: fit a Bezier surface spanned by four modes (MCSurface) and map loss/accuracy over ``(u, v)``.

``lmc fit --model SurfaceModule --model.endpoints [a.ckpt,b.ckpt,c.ckpt,d.ckpt] --model.num_bends 2`` trains the
free control points of the surface, sampling ``(u, v)`` uniformly on the unit square. ``lmc test`` evaluates a
``num_points x num_points`` grid (BatchNorm reset for BN nets) and writes ``path.csv``/``path.json`` and heat maps
of loss and accuracy (``path.png``). Without ``--ckpt_path`` it evaluates the untrained surface, the bilinear
interpolation of the four modes (MCSurface's ``--skip_load_model``).
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from lmc_lightning.modules.base import OptimConfig
from lmc_lightning.modules.curve import BNChoice, FittedPathModule, check_fitting_args
from lmc_lightning.modules.path import WeightDict
from lmc_lightning.weights import renorm
from lmc_lightning.weights.curves import CORNERS, BezierSurface
from lmc_lightning.weights.fit import sample_boundary, sample_uniform
from lmc_lightning.weights.paths import Path


class SurfaceModule(FittedPathModule):
    """Fit a Bezier surface through four corner modes; evaluate a ``(u, v)`` grid with ``lmc test``.

    Warm-up (``init_epochs``): for the first ``init_epochs`` epochs, ``(u, v)`` is sampled on the boundary of the
    square only, so only the four edge curves (the boundary rows and columns of the control grid) learn; the
    interior control points get no gradient there. When the warm-up ends, the interior points are re-initialised as
    the Coons patch of the trained edges (:meth:`BezierSurface.fill_interior_from_edges`), their optimiser state is
    cleared, and from then on ``(u, v)`` is sampled on the whole square and every free point trains. ``init_epochs=0``
    trains the whole surface from the start.

    Args:
        endpoints: Four corner checkpoints, at ``(u, v) = (0, 0), (1, 0), (0, 1), (1, 1)`` in that order.
        num_bends: Free control points per edge between two corners (control grid ``(num_bends + 2)^2``).
        num_samples: ``(u, v)`` points sampled per batch (loss averaged; MCSurface used 20).
        init_epochs: Epochs of edge-only warm-up (see above).
        reg: Weight of the L2 pull of the control points toward the bilinear surface.
        num_points: Grid points per axis evaluated by ``lmc test`` (``num_points**2`` points).
        bn: BatchNorm statistics at evaluation: ``"auto"`` (reset for BN nets), ``"reset"`` or ``None``.
        bn_batches: Batches of training data for the BN statistics.
        bn_batch_size: Batch size of the BN statistics pass.
        evaluation_batch_size: Batch size of the evaluation pass (None: as large as memory allows on CUDA, 1000
            elsewhere; see :func:`~lmc_lightning.weights.evaluate.evaluate_path`).
        precision: Evaluation precision (``"auto"``: bf16 autocast on GPU).
        strategy: Evaluation strategy (``"auto"``, ``"loop"`` or ``"vmap"``).
        prefix: Network submodule inside the corners' checkpoints.
        net: Architecture name, needed only for plain state dict corners.
        net_kwargs: Architecture arguments overriding the checkpoints'.
        output_dir: Folder of ``path.csv/json/png``; ``None``: the trainer's log folder.
        num_classes: Number of classes (linked from the data).
        input_shape: ``(C, H, W)`` of the inputs (linked from the data).
        optim: Optimiser and schedule of the control points.
        label_smoothing: Label smoothing of the training loss.
    """

    min_endpoints = 4

    def __init__(
        self,
        endpoints: list[str] | None = None,
        num_bends: int = 1,
        num_samples: int = 1,
        init_epochs: int = 0,
        reg: float = 0.0,
        num_points: int = 11,
        bn: BNChoice | None = "auto",
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
        if endpoints is not None and len(endpoints) != 4:
            raise ValueError(f"SurfaceModule takes exactly 4 corner endpoints, at (u, v) = {list(CORNERS)}, got "
                             f"{len(endpoints)}.")
        if isinstance(num_bends, bool) or not isinstance(num_bends, int) or num_bends < 1:
            raise ValueError(f"num_bends must be a positive integer (free points per edge), got {num_bends!r}.")
        if isinstance(init_epochs, bool) or not isinstance(init_epochs, int) or init_epochs < 0:
            raise ValueError(f"init_epochs must be a non-negative integer (edge-only warm-up), got {init_epochs!r}.")
        if bn in renorm.MODES:
            raise ValueError(f"bn={bn!r} interpolates endpoint statistics along a curve; a surface needs 'auto', "
                             "'reset' or None.")
        check_fitting_args(num_samples, reg, bn)
        super().__init__(
            endpoints=endpoints, num_points=num_points, bn=bn, bn_batches=bn_batches,
            bn_batch_size=bn_batch_size, evaluation_batch_size=evaluation_batch_size, precision=precision,
            strategy=strategy, prefix=prefix, net=net, net_kwargs=net_kwargs, output_dir=output_dir,
            num_classes=num_classes, input_shape=input_shape, optim=optim, label_smoothing=label_smoothing,
        )
        self.init_fitting(num_samples, reg, bn)
        self.num_bends = num_bends
        self.init_epochs = init_epochs

    def build_path(self, thetas: list[WeightDict]) -> Path:
        """The Bezier surface, its control grid initialised on the bilinear interpolation of the corners."""
        return BezierSurface(thetas, self.num_bends)

    def on_fit_start(self) -> None:
        """Refuse a run whose warm-up would take every epoch (the interior would never train).

        Raises:
            ValueError: ``init_epochs >= max_epochs`` (a warning instead under ``fast_dev_run``, a smoke test).
        """
        max_epochs = self.trainer.max_epochs
        if self.init_epochs and max_epochs is not None and 0 <= max_epochs <= self.init_epochs:
            message = (f"SurfaceModule: init_epochs={self.init_epochs} >= max_epochs={max_epochs}: training would end "
                       "inside the edge-only warm-up and the interior control points would never train. Lower "
                       "--model.init_epochs or raise --trainer.max_epochs.")
            if not self.trainer.fast_dev_run:
                raise ValueError(message)
            rank_zero_warn(message)

    @property
    def warming_up(self) -> bool:
        """Whether the current epoch belongs to the edge-only warm-up."""
        return self._trainer is not None and self.trainer.current_epoch < self.init_epochs

    def sample_coords(self) -> Tensor:
        """``[num_samples, 2]`` points: on the square's boundary during warm-up, on the whole square after."""
        if self.warming_up:
            return sample_boundary(self.num_samples)
        return sample_uniform(self.num_samples, 2)

    def on_train_epoch_start(self) -> None:
        """At the end of the warm-up, fill the interior from the trained edges and clear its optimiser state."""
        if self.init_epochs and self.trainer.current_epoch == self.init_epochs:
            self.path.fill_interior_from_edges()
            interior = torch.tensor([not e for e in self.path.on_edge], device=self.device)
            for opt in self.trainer.optimizers:
                for state in opt.state.values():
                    for value in state.values():
                        if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == len(interior):
                            value[interior] = 0
            rank_zero_info(f"SurfaceModule: edge warm-up done after {self.init_epochs} epoch(s); interior control "
                           "points filled from the edges, training the whole surface.")
