"""InterpolationModule: loss and accuracy along the straight line between two endpoints."""

from __future__ import annotations

import time
from typing import Any, Literal

from lightning.pytorch.utilities import rank_zero_info

from lmc_lightning.checkpoint import save_net
from lmc_lightning.modules.base import OptimConfig
from lmc_lightning.modules.path import BNMode, PathModule, WeightDict, as_weight_dict, rank_info
from lmc_lightning.progress import align_progress
from lmc_lightning.weights.evaluate import seeded_subset
from lmc_lightning.weights.paths import Linear, Path
from lmc_lightning.weights.permutation import align_weights
from lmc_lightning.weights.renorm import RenormOptions

AlignMode = Literal["weight", "activation", "ste"]


class InterpolationModule(PathModule):
    """Evaluate linear interpolation ``(1 - t) * theta_a + t * theta_b`` between two endpoints.

    ``lmc test --model InterpolationModule --model.endpoints [a.ckpt,b.ckpt] --model.bn reset
    --data FashionMNISTDataModule`` logs ``barrier/*`` and ``endpoint/*`` (and the curve as an image to TensorBoard or
    W&B), and writes
    ``path.csv``, ``path.json`` and ``path.png`` into the log folder.

    Args:
        endpoints: Two endpoint checkpoints ``[theta_a, theta_b]``.
        align: Permute ``theta_b``'s hidden units onto ``theta_a``'s before interpolating: ``"weight"`` (weight
            matching), ``"activation"`` (activation matching) or ``"ste"`` (straight-through estimator); ``None``
            interpolates the endpoints as they are. See :meth:`align_endpoints`.
        align_samples: Training samples used by activation and STE matching.
        save_aligned: Write the aligned endpoint 1 to this ``.ckpt`` (readable by ``load_net`` and usable as an
            endpoint of any path module); ``None``: don't.
        num_points: Points on ``t`` in [0, 1], endpoints included.
        bn: Statistics at every point: ``"auto"`` (``"reset"`` where the net has BatchNorm, else ``None``),
            ``"reset"`` (BN reset on training data), ``"reset_test"`` (data-independent
            RESET: BN in train mode on each test batch), ``"repair"``, ``"rescale"`` (the rethink-re-basin seed's
            ``y / sigma * sigma_goal``), ``"reshift"``, ``"rescale_centered"`` (mean-preserving) or ``None``
            (interpolated running statistics); see :mod:`lmc_lightning.weights.renorm`.
        renorm_options: Site rule and variants of re-normalisation, fields of
            :class:`~lmc_lightning.weights.renorm.RenormOptions`: ``{sites: auto|pre_norm|post_norm|[names],
            average: false, factor: 1.0, sequential: false, statistics: pooled|seed}``.
        homogeneous: Interpolate biases homogeneously, ``(1 - t)^h b_a + t^h b_b`` (``Linear(homogeneous=True)``).
        bn_batches: Batches of training data for the BN statistics.
        bn_batch_size: Batch size of the BN statistics pass.
        evaluation_batch_size: Batch size of the evaluation pass (None: as large as memory allows on CUDA, 1000
            elsewhere; see :func:`~lmc_lightning.weights.evaluate.evaluate_path`).
        precision: Evaluation precision (``"auto"``: bf16 autocast on GPU).
        strategy: Evaluation strategy (``"auto"``, ``"loop"`` or ``"vmap"``).
        prefix: Network submodule inside the checkpoints (``"net"``; ``["net_a", "net_b"]`` for a ``PairModule``
            checkpoint given twice).
        net: Architecture name, needed only for plain state dict endpoints.
        net_kwargs: Architecture arguments overriding the checkpoints'.
        key_map: Rename the endpoints' checkpoint keys to the net's: a registered map's name
            (:func:`~lmc_lightning.checkpoint.key_maps`) or ``{regex: replacement}`` rules.
        output_dir: Folder of the result files; ``None``: the trainer's log folder.
        num_classes: Number of classes (linked from the data).
        input_shape: ``(C, H, W)`` of the inputs (linked from the data).
        optim: Unused (nothing is trained); kept for a uniform interface.
        label_smoothing: Unused.
        eval_sets: Named evaluation sets of the datamodule, e.g. ``[clean, cue, rand_cue, rand_image]`` of a
            ``CueDataModule`` (one statistics pass per point, on clean training data; see :class:`PathModule`).
        eval_split: Split of the named sets: ``"test"`` or ``"train"``.
    """

    min_endpoints = 2

    def __init__(
        self,
        endpoints: list[str] | None = None,
        align: AlignMode | None = None,
        align_samples: int = 5000,
        save_aligned: str | None = None,
        num_points: int = 21,
        bn: BNMode | None = "auto",
        renorm_options: dict[str, Any] | None = None,
        homogeneous: bool = False,
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
        eval_sets: list[str] | None = None,
        eval_split: Literal["train", "test"] = "test",
    ) -> None:
        if align is not None and align not in ("weight", "activation", "ste"):
            raise ValueError(f"align must be None, 'weight', 'activation' or 'ste', got {align!r}.")
        if save_aligned is not None and align is None:
            raise ValueError("save_aligned needs an alignment method: pass --model.align weight|activation|ste.")
        if align_samples < 1:
            raise ValueError(f"align_samples must be >= 1, got {align_samples}.")
        if endpoints is not None and len(endpoints) != 2:
            raise ValueError(f"InterpolationModule takes exactly 2 endpoints, got {len(endpoints)}.")
        super().__init__(
            endpoints=endpoints, num_points=num_points, bn=bn, bn_batches=bn_batches, bn_batch_size=bn_batch_size,
            evaluation_batch_size=evaluation_batch_size, precision=precision, strategy=strategy, prefix=prefix, net=net,
            net_kwargs=net_kwargs, key_map=key_map, output_dir=output_dir, num_classes=num_classes,
            input_shape=input_shape, optim=optim, label_smoothing=label_smoothing, eval_sets=eval_sets,
            eval_split=eval_split,
        )
        self.renorm_options = RenormOptions.parse(renorm_options)
        self.homogeneous = homogeneous
        self.align = align
        self.align_samples = align_samples
        self.save_aligned = save_aligned

    def align_endpoints(self, thetas: list[WeightDict]) -> list[WeightDict]:
        """Permute ``theta_b`` into ``theta_a``'s basin (:func:`align_weights`); unchanged when ``align`` is None.

        Data-driven methods use ``align_samples`` training samples (a seeded subset, no augmentation). Under DDP
        rank 0 aligns and broadcasts the result, so every rank interpolates the same pair.
        """
        if self.align is None:
            return thetas
        rank, world = rank_info(self._trainer)
        device = self.trainer.strategy.root_device if self._trainer is not None else None
        aligned = None
        rank_zero_info(f"InterpolationModule: aligning endpoint 1 to endpoint 0 by {self.align} matching ...")
        start = time.perf_counter()
        if rank == 0:
            data = None
            if self.align != "weight":
                data = seeded_subset(self._datamodule().split_tensors("train"), self.align_samples)
            with align_progress(self._trainer, self.align, "InterpolationModule") as progress:
                theta_b, _ = align_weights(self.net, thetas[0], thetas[1], method=self.align, data=data,
                                           device=device, progress=progress)
            aligned = as_weight_dict(theta_b)
        if world > 1:
            aligned = self.trainer.strategy.broadcast(aligned, src=0)
        rank_zero_info(f"InterpolationModule: aligned endpoint 1 to endpoint 0 by {self.align} matching in "
                       f"{time.perf_counter() - start:.1f} s.")
        if self.save_aligned is not None and rank == 0:
            save_net(self.save_aligned, aligned, self.net_spec)
            rank_zero_info(f"InterpolationModule: wrote the aligned endpoint 1 to {self.save_aligned}.")
        return [thetas[0], {k: aligned[k] for k in thetas[1]}]

    def prepare_endpoints(self, thetas: list[WeightDict]) -> list[WeightDict]:
        """Align the endpoints (see :meth:`align_endpoints`)."""
        return self.align_endpoints(thetas)

    def build_path(self, thetas: list[WeightDict]) -> Path:
        """The straight line between the two endpoints (biases homogeneous when ``homogeneous``)."""
        return Linear(thetas[0], thetas[1], homogeneous=self.homogeneous)
