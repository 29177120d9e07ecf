"""CurveModule: fit a low-loss curve (Bezier or polygonal chain) between two endpoints.

``lmc fit --model CurveModule --model.endpoints [a.ckpt,b.ckpt] --model.num_bends 1 --data FashionMNISTDataModule``
trains the free control points (Garipov et al., 2018): every batch samples ``t ~ U(0, 1)`` and minimises the loss of
the net at ``theta(t)``. ``lmc test --model CurveModule --ckpt_path last.ckpt`` then evaluates a ``t`` grid with the
same evaluator and files as InterpolationModule (``lmc test`` without ``--ckpt_path`` evaluates the untrained curve,
which is the straight line).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from lmc_lightning.modules.base import OptimConfig
from lmc_lightning.modules.path import BN_MODES, PathModule, WeightDict
from lmc_lightning.nets import get_net
from lmc_lightning.weights.curves import Bezier, MidpointQuadratic, PolyChain
from lmc_lightning.weights.fit import freeze_buffer_points, parameter_keys, path_loss, sample_uniform
from lmc_lightning.weights.paths import Path

BNChoice = str
QMC_MIN_SCALE = 1e-8
"""QMC skips the step when ``2t(1-t)`` is below this (``t`` at an endpoint, where MMC's step is zero)."""


def check_fitting_args(num_samples: int, reg: float, bn: BNChoice | None) -> None:
    """Validate the training arguments shared by :class:`FittedPathModule` subclasses (ValueError naming the fix)."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer (points sampled per batch), got {num_samples!r}.")
    if reg < 0:
        raise ValueError(f"reg must be >= 0 (weight of the L2 pull toward the linear path), got {reg}.")
    if bn is not None and bn not in ("auto", *BN_MODES):
        raise ValueError(f"bn must be None, 'auto' or one of {BN_MODES}, got {bn!r}.")


class FittedPathModule(PathModule):
    """Shared training of paths with free control points (curves and surfaces).

    ``training_step`` samples ``num_samples`` coordinates per batch (:meth:`sample_coords`), runs the template net in
    train mode through :func:`~lmc_lightning.weights.fit.path_loss` (BatchNorm uses batch statistics; the path's
    stored running statistics are never touched), averages the loss over the samples and adds ``reg`` times the
    squared distance of the free control points to their linear position. Only the free points of the net's
    parameters are optimised (BN statistics are recomputed at evaluation).

    Subclasses call :func:`check_fitting_args`, then ``PathModule.__init__``, then :meth:`init_fitting`.
    """

    trainable = True

    def init_fitting(self, num_samples: int, reg: float, bn: BNChoice | None = None) -> None:
        """Store the training settings (after ``PathModule.__init__``).

        Args:
            num_samples: Coordinates sampled per batch (the loss is their mean, on the same batch).
            reg: Weight of the L2 penalty ``||free points - linear position||^2`` (0 disables it).
            bn: Unused (``"auto"`` is resolved by the evaluator); kept for subclasses that pass it.
        """
        self.num_samples = num_samples
        self.reg = float(reg)
        self._param_keys: list[str] | None = None

    def setup(self, stage: str) -> None:
        """Build the path (see :meth:`PathModule.setup`), then keep its frozen tensors out of DDP's buffer sync."""
        super().setup(stage)
        self._ddp_skip_path_buffers()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Rebuild the path from a checkpoint (see :meth:`PathModule.on_load_checkpoint`)."""
        super().on_load_checkpoint(checkpoint)
        self._ddp_skip_path_buffers()

    def _ddp_skip_path_buffers(self) -> None:
        """Tell DDP not to broadcast the path's buffers every step.

        They are the frozen endpoints (twice the model's size for a curve, four times for a surface), identical on
        every rank; DDP's default ``broadcast_buffers`` would send them from rank 0 before each forward.
        """
        if self.path is not None:
            names = [f"path.{name}" for name, _ in self.path.named_buffers()]
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self, names)

    def sample_coords(self) -> Tensor:
        """``[num_samples, dim]`` coordinates for one training batch (uniform on the unit interval or square)."""
        return sample_uniform(self.num_samples, self.path.dim)

    def trainable_parameters(self) -> Iterable[nn.Parameter]:
        """The free control points of the net's parameters (BN-statistic points get no gradient)."""
        if self.path is None:
            raise RuntimeError(f"{type(self).__name__}: no path yet; it is built in setup().")
        return freeze_buffer_points(self.path, self.net)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Mean loss at ``num_samples`` sampled points of the path, plus the ``reg`` penalty."""
        x, y = batch
        if self._param_keys is None:
            self._param_keys = parameter_keys(self.net)
        self.net.train()
        loss = path_loss(self.path, self.net, x, y, self.sample_coords(), reg=self.reg, loss_fn=self.criterion,
                         param_keys=self._param_keys)
        self.log("train/loss", loss, batch_size=len(y), on_step=True, on_epoch=True, prog_bar=True)
        return loss

    def on_train_epoch_end(self) -> None:
        """Log the distance of the free control points to the straight path (parameters only)."""
        keys = self._param_keys or parameter_keys(self.net)
        with torch.no_grad():
            dist = self.path.distance_to_linear([k for k in self.path.float_keys if k in set(keys)])
        self.log("train/distance_to_linear", dist.sqrt(), sync_dist=False)

    def on_train_end(self) -> None:
        """Leave the template in eval mode."""
        self.net.eval()


class CurveModule(FittedPathModule):
    """Fit a curve of weights between two endpoints; evaluate it along ``t`` with ``lmc test``.

    Args:
        endpoints: Two endpoint checkpoints ``[theta_a, theta_b]`` (frozen).
        curve: ``"bezier"`` (Bernstein basis, degree ``num_bends + 1``) or ``"polychain"`` (piecewise linear through
            bends at ``t = k / (num_bends + 1)``).
        num_bends: Free control points; 1 gives the quadratic Bezier curve.
        objective: ``"curve"`` trains the control points from the straight line; ``"midpoint"`` trains the on-curve
            midpoint ``m = theta(0.5)`` of the quadratic curve through it (ours: not MMC's objective, which trains the
            control point); ``"qmc"`` is MMC's QMC (seed 000, ``train_quad_midpoint``): the quadratic Bezier curve
            ``t^2 theta_b + 2t(1-t) m + (1-t)^2 theta_a`` whose control point ``m`` starts as a freshly initialised
            random net (global RNG: ``seed_everything``), one ``t ~ U(0, 1)`` per batch (``num_samples`` 1), the
            gradient of ``theta(t)`` applied unscaled to ``m`` with the step's learning rate multiplied by
            ``2t(1-t)`` (MMC's ``lr * 0.1^(epoch // 10) * 2t(1-t)``: ``optim`` multistep, milestones ``[10, 20,
            ...]``, gamma 0.1). ``"midpoint"`` and ``"qmc"`` need ``curve="bezier"``, ``num_bends=1``.
        num_samples: Values of ``t`` sampled per batch (loss averaged).
        reg: Weight of the L2 pull of the control points (or midpoint) toward their place on the straight line.
        num_points: Points on ``t`` in [0, 1] evaluated by ``lmc test``.
        bn: BatchNorm statistics at evaluation: ``"auto"`` (reset for BN nets), ``"reset"``, ``"repair"``,
            ``"rescale"`` or ``None``.
        bn_batches: Batches of training data for the BN statistics.
        bn_batch_size: Batch size of the BN statistics pass.
        evaluation_batch_size: Batch size of the evaluation pass (None: as large as memory allows on CUDA, 1000
            elsewhere; see :func:`~lmc_lightning.weights.evaluate.evaluate_path`).
        precision: Evaluation precision (``"auto"``: bf16 autocast on GPU).
        strategy: Evaluation strategy (``"auto"``, ``"loop"`` or ``"vmap"``).
        prefix: Network submodule inside the endpoints' checkpoints.
        net: Architecture name, needed only for plain state dict endpoints.
        net_kwargs: Architecture arguments overriding the checkpoints'.
        key_map: Rename the endpoints' checkpoint keys to the net's: a registered map's name
            (:func:`~lmc_lightning.checkpoint.key_maps`) or ``{regex: replacement}`` rules.
        output_dir: Folder of ``path.csv/json/png``; ``None``: the trainer's log folder.
        num_classes: Number of classes (linked from the data).
        input_shape: ``(C, H, W)`` of the inputs (linked from the data).
        optim: Optimiser and schedule of the control points.
        label_smoothing: Label smoothing of the training loss.
        eval_sets: Named evaluation sets of the datamodule, e.g. ``[clean, cue, rand_cue, rand_image]`` of a
            ``CueDataModule`` (one statistics pass per point, on clean training data; see :class:`PathModule`).
        eval_split: Split of the named sets: ``"test"`` or ``"train"``.
    """

    min_endpoints = 2

    def __init__(
        self,
        endpoints: list[str] | None = None,
        curve: Literal["bezier", "polychain"] = "bezier",
        num_bends: int = 1,
        objective: Literal["curve", "midpoint", "qmc"] = "curve",
        num_samples: int = 1,
        reg: float = 0.0,
        num_points: int = 21,
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
        eval_sets: list[str] | None = None,
        eval_split: Literal["train", "test"] = "test",
    ) -> None:
        if endpoints is not None and len(endpoints) != 2:
            raise ValueError(f"CurveModule takes exactly 2 endpoints, got {len(endpoints)}.")
        if curve not in ("bezier", "polychain"):
            raise ValueError(f"curve must be 'bezier' or 'polychain', got {curve!r}.")
        if objective not in ("curve", "midpoint", "qmc"):
            raise ValueError(f"objective must be 'curve', 'midpoint' or 'qmc', got {objective!r}.")
        if isinstance(num_bends, bool) or not isinstance(num_bends, int) or num_bends < 1:
            raise ValueError(f"num_bends must be a positive integer (free control points to train), got {num_bends!r}.")
        if objective in ("midpoint", "qmc") and (curve != "bezier" or num_bends != 1):
            raise ValueError(f"objective={objective!r} trains a quadratic curve: use curve='bezier' "
                             f"and num_bends=1 (got curve={curve!r}, num_bends={num_bends}).")
        if objective == "qmc" and (num_samples != 1 or reg != 0):
            raise ValueError(f"objective='qmc' is MMC's QMC: one t per batch and no regulariser (num_samples=1, "
                             f"reg=0), got num_samples={num_samples}, reg={reg}.")
        check_fitting_args(num_samples, reg, bn)
        super().__init__(
            endpoints=endpoints, num_points=num_points, bn=bn,
            bn_batches=bn_batches, bn_batch_size=bn_batch_size, evaluation_batch_size=evaluation_batch_size,
            precision=precision, strategy=strategy, prefix=prefix, net=net, net_kwargs=net_kwargs, key_map=key_map,
            output_dir=output_dir, num_classes=num_classes, input_shape=input_shape, optim=optim,
            label_smoothing=label_smoothing, eval_sets=eval_sets, eval_split=eval_split,
        )
        self.init_fitting(num_samples, reg, bn)
        self.curve = curve
        self.num_bends = num_bends
        self.objective = objective

    def build_path(self, thetas: list[WeightDict]) -> Path:
        """The curve, its control points (or midpoint) initialised on the straight line between the endpoints; for
        ``"qmc"``, the control point initialised as a fresh random net."""
        if self.objective == "midpoint":
            return MidpointQuadratic(thetas)
        if self.objective == "qmc":
            spec = dict(self.net_spec)
            fresh = get_net(spec.pop("name"), **spec).state_dict()
            return Bezier(thetas, 1, init=[{k: fresh[k] for k in thetas[0]}])
        cls = Bezier if self.curve == "bezier" else PolyChain
        return cls(thetas, self.num_bends)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """The loss at a sampled ``t`` (see :class:`FittedPathModule`); for ``"qmc"`` with MMC's step."""
        if self.objective != "qmc":
            return super().training_step(batch, batch_idx)
        x, y = batch
        if self._param_keys is None:
            self._param_keys = parameter_keys(self.net)
        t = sample_uniform(1, 1)
        scale = float(2 * t * (1 - t))
        self.net.train()
        loss = path_loss(self.path, self.net, x, y, t, loss_fn=self.criterion, param_keys=self._param_keys)
        self.log("train/loss", loss, batch_size=len(y), on_step=True, on_epoch=True, prog_bar=True)
        if scale < QMC_MIN_SCALE:  # t at an endpoint: MMC's step is zero
            return None
        # autograd gives m the gradient 2t(1-t) * dL/dtheta(t); MMC applies dL/dtheta(t) with lr * 2t(1-t)
        sched = self.lr_schedulers()
        scheduled = sched.get_last_lr() if sched is not None else [g["initial_lr"] for g in
                                                                       self.optimizers().param_groups]
        for group, lr in zip(self.optimizers().param_groups, scheduled, strict=True):
            group["lr"] = lr * scale
        return loss / scale

    def on_fit_start(self) -> None:
        """Say what is being trained."""
        what = {"midpoint": "midpoint of a quadratic Bezier curve",
                "qmc": "control point of a quadratic Bezier curve from a random net (MMC's QMC)"}.get(
            self.objective, f"{self.num_bends} bend(s) of a {self.curve} curve")
        rank_zero_info(f"CurveModule: training the {what}; {self.num_samples} t per batch, reg={self.reg}.")
