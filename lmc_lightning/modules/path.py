"""PathModule: the base of every module that connects endpoint networks in weight space.

A path module loads its endpoints (in ``setup``), builds a :class:`~lmc_lightning.weights.paths.Path` through the
:meth:`PathModule.build_path` hook and, under ``lmc test``, evaluates a grid of points on it with
:func:`~lmc_lightning.weights.evaluate.evaluate_path`: loss and accuracy per point and the barrier summary are logged,
and ``path.csv``, ``path.json`` and ``path.png`` are written into the run's log folder.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from collections.abc import Mapping, Sequence
from pathlib import Path as FilePath
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from lmc_lightning.checkpoint import check_state_matches, load_weights
from lmc_lightning.modules.base import LMCModule, OptimConfig
from lmc_lightning.nets import get_net
from lmc_lightning.progress import progress_bar
from lmc_lightning.weights.evaluate import evaluate_path
from lmc_lightning.weights.paths import Path, check_compatible
from lmc_lightning.weights.renorm import RenormOptions
from lmc_lightning.weights.result import PathResult

WeightDict = dict[str, Tensor]
BN_MODES: tuple[str, ...] = ("reset", "reset_test", "repair", "rescale", "reshift", "rescale_centered")
"""Statistics modes of :func:`~lmc_lightning.weights.evaluate.evaluate_path`; ``bn`` also takes ``"auto"`` (reset
where there is BatchNorm, nothing elsewhere) and None. A plain string checked against this set, so new modes only need
adding here and in the evaluator."""
BNMode = str
CKPT_KEY = "lmc_path"
PRECISIONS = ("auto", "32", "bf16")
STRATEGIES = ("auto", "loop", "vmap")


def check_eval_settings(precision: str, strategy: str, num_points: int = 2, bn: str | None = None,
                        bn_batches: int = 1, bn_batch_size: int = 1, evaluation_batch_size: int | None = None
                        ) -> None:
    """Raise a ValueError naming the first invalid path-evaluation setting."""
    if num_points < 2:
        raise ValueError(f"num_points must be >= 2 (the endpoints at least), got {num_points}.")
    if bn is not None and bn not in ("auto", *BN_MODES):
        raise ValueError(f"bn must be None, 'auto' or one of {BN_MODES}, got {bn!r}.")
    if bn_batches < 1 or bn_batch_size < 1 or (evaluation_batch_size is not None and evaluation_batch_size < 1):
        raise ValueError("bn_batches, bn_batch_size and evaluation_batch_size must be >= 1, got "
                         f"{bn_batches}, {bn_batch_size}, {evaluation_batch_size}.")
    if str(precision) not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS} (evaluation precision), got {precision!r}.")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES} (evaluation strategy), got {strategy!r}.")



def rank_info(trainer: Any) -> tuple[int, int]:
    """``(global_rank, world_size)`` of an attached trainer, ``(0, 1)`` without one."""
    if trainer is None:
        return 0, 1
    return int(trainer.global_rank), int(trainer.world_size)


def evaluate_on_ranks(path: Path, net: nn.Module, data: tuple[Tensor, Tensor] | Mapping[str, tuple[Tensor, Tensor]],
                      trainer: Any = None, **kwargs: Any) -> PathResult:
    """:func:`evaluate_path` with the evaluation data shared between DDP ranks.

    Every rank evaluates every point on its own slice ``x[rank::world]`` of ``data`` (of each named set); per-point
    sums of loss and of correct predictions are all-reduced, so every rank returns the same result, equal to a
    single-process run on all of ``data``. BN statistics (``bn``, ``train_data``) are computed by every rank on the
    same samples (the engine's seeded subset), so they too equal the single-process ones. All ranks must call this
    together.

    Args:
        path: The path to evaluate.
        net: Template network (the architecture the weights are run through).
        data: ``(x, y)`` evaluation tensors, or ``{set name: (x, y)}``, the same on every rank.
        trainer: The Lightning trainer (rank, world size and the all-reduce); ``None``: one process.
        **kwargs: Passed on to :func:`evaluate_path` (``coords``, ``bn``, ``train_data``, ``device``, ...).
    """
    rank, world = rank_info(trainer)
    named = isinstance(data, Mapping)
    parts = dict(data) if named else {"": data}
    for name, (_, y) in parts.items():
        if len(y) < world:
            raise ValueError(f"{len(y)} evaluation samples{f' in set {name!r}' if name else ''} cannot be shared "
                             f"between {world} ranks; use more data.")
    if world > 1:
        parts = {k: (x[rank::world], y[rank::world]) for k, (x, y) in parts.items()}
    result = evaluate_path(path, net, parts if named else parts[""], **kwargs)
    if world == 1:
        return result
    singles = list(result.sets.values()) if named else [result]
    n = torch.tensor([float(len(y)) for _, y in parts.values()], dtype=torch.float64)
    sums = torch.stack([torch.as_tensor(np.stack([r.loss, r.accuracy, r.meta.get("accuracy_top5", r.accuracy)]))
                        for r in singles]) * n[:, None, None]
    device = trainer.strategy.root_device
    sums = trainer.strategy.reduce(sums.to(device), reduce_op="sum").cpu()
    count = trainer.strategy.reduce(n.to(device), reduce_op="sum").cpu()
    mean = (sums / count[:, None, None]).numpy()
    total = [int(c) for c in count.tolist()]
    meta = {**result.meta, "world_size": world, "num_samples": dict(zip(parts, total, strict=True)) if named
            else total[0], "accuracy_top5": mean[0, 2].tolist()}
    if not named:
        return dataclasses.replace(result, loss=mean[0, 0], accuracy=mean[0, 1], meta=meta)
    merged = PathResult.from_sets(result.coords, {k: (mean[i, 0], mean[i, 1]) for i, k in enumerate(parts)}, meta,
                                  length=result.length, end_time=result.end_time)
    for i, part in enumerate(merged.sets.values()):
        part.meta["accuracy_top5"] = mean[i, 2].tolist()
    return merged


def point_label(coord: Sequence[float]) -> str:
    """Metric suffix of a grid point: ``t=0.50`` on a curve, ``u=0.25_v=0.75`` on a surface."""
    values = [float(c) for c in coord]
    names = ["t"] if len(values) == 1 else ["u", "v"] if len(values) == 2 else [f"l{i + 1}" for i in range(len(values))]
    return "_".join(f"{name}={value:.2f}" for name, value in zip(names, values, strict=True))


def write_result(result: PathResult, folder: str | os.PathLike, stem: str = "path") -> dict[str, FilePath]:
    """Write ``{stem}.csv``, ``{stem}.json`` and ``{stem}.png`` into ``folder`` (each atomically); returns the paths."""
    folder = FilePath(folder)
    return {
        "csv": result.to_csv(folder / f"{stem}.csv"),
        "json": result.to_json(folder / f"{stem}.json"),
        "png": result.plot(folder / f"{stem}.png"),
    }


EVAL_SETTINGS = ("num_points", "bn", "bn_batches", "bn_batch_size", "evaluation_batch_size", "precision", "strategy",
                 "output_dir", "renorm_options", "eval_sets", "eval_split")


class PathModule(LMCModule):
    """Base of the path modules: load endpoints, build a path, evaluate a grid of points on ``lmc test``.

    Subclasses implement :meth:`build_path` (and may override :meth:`prepare_endpoints`, :meth:`eval_coords` and
    ``training_step`` with ``trainable = True`` for paths that are fitted, like Bezier curves). The template network
    (``self.net``) only supplies the architecture; every evaluation runs the path's weights through it with
    ``torch.func.functional_call``. It is not a submodule, so checkpoints hold the path's tensors only, and
    ``module.train()``/``eval()`` do not reach it: set its mode where it matters (BatchNorm during training).

    Under DDP each rank evaluates its slice of the test split and the sums are all-reduced
    (:func:`evaluate_on_ranks`); rank 0 writes the files.

    Args:
        endpoints: Endpoint checkpoints (Lightning ``.ckpt`` of an lmc_lightning module or plain state dicts).
        num_points: Grid points per path coordinate (``t`` on a curve; ``num_points**2`` points on a surface).
        bn: Statistics at every point: ``"auto"`` (``"reset"`` for nets with BatchNorm, else ``None``),
            ``"reset"`` (BN reset on training data), ``"reset_test"``, ``"repair"``, ``"rescale"`` (the
            rethink-re-basin seed's, no centring), ``"reshift"`` or ``"rescale_centered"`` (mean-preserving) (see
            :data:`BN_MODES` and :mod:`lmc_lightning.weights.renorm`); ``None`` keeps the path's interpolated
            running statistics.
        bn_batches: Batches of training data for the BN statistics.
        bn_batch_size: Batch size of the BN statistics pass.
        evaluation_batch_size: Batch size of the evaluation pass (None: as large as memory allows on CUDA, 1000
            elsewhere; see :func:`~lmc_lightning.weights.evaluate.evaluate_path`).
        precision: Evaluation precision, passed to ``evaluate_path`` (``"auto"``: bf16 autocast on GPU).
        strategy: Evaluation strategy, passed to ``evaluate_path`` (``"auto"``, ``"loop"`` or ``"vmap"``).
        prefix: Submodule holding the network inside the endpoints' Lightning checkpoints (``"net"``; ``"net_a"`` or
            ``"net_b"`` for a ``PairModule``); one name for all endpoints or one per endpoint.
        net: Architecture name; needed only when the endpoints are plain state dicts (overrides the checkpoints').
        net_kwargs: Architecture arguments overriding the checkpoints' (or for plain state dicts).
        key_map: Rename the endpoints' checkpoint keys to the net's: a registered map's name
            (:func:`~lmc_lightning.checkpoint.key_maps`) or ``{regex: replacement}`` rules.
        output_dir: Folder of ``path.csv/json/png``; ``None``: the trainer's log folder.
        num_classes: Number of classes (linked from the data).
        input_shape: ``(C, H, W)`` of the inputs (linked from the data).
        optim: Optimiser settings (used only by trainable paths).
        label_smoothing: Label smoothing of the training loss (trainable paths).
        eval_sets: Named evaluation sets of the datamodule (``datamodule.eval_sets(split, names)``, e.g. a
            :class:`~lmc_lightning.data.cue.CueDataModule`'s ``[clean, cue, rand_cue, rand_image]``), evaluated
            after one statistics pass per point; BN statistics then come from the ``clean`` training set, as in MMC.
            ``None``: the datamodule's test split.
        eval_split: Split of the named sets: ``"test"`` or ``"train"``.
    """

    renorm_options: RenormOptions | None = None
    """Site rule and variants of ``bn`` re-normalisation (set by modules that expose them)."""
    trainable: ClassVar[bool] = False
    """Whether ``lmc fit`` makes sense (the path has free control points and a ``training_step``)."""
    min_endpoints: ClassVar[int] = 2
    extra_eval_settings: ClassVar[tuple[str, ...]] = ()
    """Subclass init args that are evaluation settings, kept out of the checkpoint like :data:`EVAL_SETTINGS`."""

    def __init__(
        self,
        endpoints: list[str] | None = None,
        num_points: int = 21,
        bn: BNMode | None = "auto",
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
        super().__init__(num_classes=num_classes, input_shape=input_shape, optim=optim,
                         label_smoothing=label_smoothing)
        if eval_split not in ("train", "test"):
            raise ValueError(f"eval_split must be 'train' or 'test', got {eval_split!r}.")
        if eval_sets is not None and not eval_sets:
            raise ValueError("eval_sets must name at least one set (or be null for the test split).")
        # Evaluation settings stay out of the checkpoint's hparams, so that `lmc test --ckpt_path ...` takes them
        # from the command line instead of silently restoring the values used at fit time (DESIGN rule 1).
        self.save_hparams(ignore=(*EVAL_SETTINGS, *self.extra_eval_settings))
        self.endpoints = [str(e) for e in (endpoints or [])]
        if self.endpoints and len(self.endpoints) < self.min_endpoints:
            raise ValueError(f"{type(self).__name__} needs at least {self.min_endpoints} endpoints, got "
                             f"{len(self.endpoints)}: pass --model.endpoints [a.ckpt,b.ckpt].")
        prefixes = [prefix] if isinstance(prefix, str) else list(prefix)
        if len(prefixes) not in (1, max(len(self.endpoints), 1)):
            raise ValueError(f"prefix lists {len(prefixes)} names for {len(self.endpoints)} endpoints; "
                             "give one name, or one per endpoint.")
        self.prefixes = prefixes * len(self.endpoints) if len(prefixes) == 1 else prefixes
        check_eval_settings(precision, strategy, num_points, bn, bn_batches, bn_batch_size, evaluation_batch_size)
        self.num_points = num_points
        self.bn = bn
        self.bn_batches = bn_batches
        self.bn_batch_size = bn_batch_size
        self.evaluation_batch_size = evaluation_batch_size
        self.eval_precision = str(precision)
        self.eval_strategy = strategy
        self.net_name = net
        self.net_kwargs = dict(net_kwargs or {})
        self.key_map = key_map
        self.output_dir = output_dir
        self.eval_sets = list(eval_sets) if eval_sets is not None else None
        self.eval_split = eval_split
        self.path: Path | None = None
        self.net_spec: dict[str, Any] | None = None
        self.result: PathResult | None = None
        self.result_files: dict[str, FilePath] = {}
        object.__setattr__(self, "_template", None)  # not a submodule: kept out of state_dict and parameters()
        self.restore_pending = False
        """Set (by the CLI) when a checkpoint given as ``ckpt_path`` will restore the path: ``setup`` then reads no
        endpoint files, so a checkpoint is evaluated or resumed without them, from any folder."""

    # Template hooks -------------------------------------------------------------------------------------------------

    def prepare_endpoints(self, thetas: list[WeightDict]) -> list[WeightDict]:
        """Transform the loaded endpoints before the path is built (e.g. align them); identity by default.

        Called once, when endpoints are read from their files; not when the path is restored from a checkpoint
        (which already holds the prepared endpoints).
        """
        return thetas

    def build_path(self, thetas: list[WeightDict]) -> Path:
        """Build the path from the endpoint weight dicts (in ``endpoints`` order, keys in the template's order).

        Also called, with placeholder endpoints, to rebuild the path before a checkpoint's tensors are loaded into
        it, so it must construct the same structure from any endpoints of the right architecture.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement build_path(thetas) -> Path.")

    def eval_coords(self) -> Tensor:
        """The grid evaluated by ``lmc test``: ``[P, dim]`` coordinates (``t`` in [0, 1], or a ``(u, v)`` grid)."""
        grid = torch.linspace(0, 1, self.num_points, dtype=torch.float64)
        dim = self.path.dim if self.path is not None else 1
        if dim == 1:
            return grid[:, None]
        mesh = torch.meshgrid(*([grid] * dim), indexing="ij")
        return torch.stack([m.reshape(-1) for m in mesh], dim=1)

    # Endpoints ------------------------------------------------------------------------------------------------------

    @property
    def net(self) -> nn.Module:
        """Template network of the endpoints' architecture (available after ``setup``)."""
        if self._template is None:
            raise RuntimeError(f"{type(self).__name__}: the endpoints are loaded in setup(); run it first.")
        return self._template

    def _resolve_spec(self, specs: list[dict[str, Any] | None]) -> dict[str, Any]:
        """Architecture of the template: ``net``/``net_kwargs`` over the first checkpoint's stored spec."""
        if self.net_name is not None:
            spec = {"name": self.net_name, "num_classes": self.num_classes, "in_channels": self.input_shape[0],
                    "input_size": self.input_shape[1]}
        else:
            spec = next((dict(s) for s in specs if s is not None), None)
            if spec is None:
                raise ValueError("The endpoints are plain state dicts without an architecture: pass "
                                 "--model.net NAME (and --model.net_kwargs) to say which net they belong to.")
        spec.update(self.net_kwargs)
        if int(spec.get("num_classes", self.num_classes)) != self.num_classes:
            raise ValueError(f"The endpoints have {spec['num_classes']} classes but the data has {self.num_classes}; "
                             "evaluate them on the dataset they were trained on.")
        self._check_input_shape(spec)
        return spec

    def _check_input_shape(self, spec: dict[str, Any]) -> None:
        """Compare the endpoints' input shape with the attached datamodule's, before any data is read."""
        dm = self._trainer.datamodule if self._trainer is not None else None
        data_shape = getattr(dm, "input_shape", None)
        if data_shape is None or "in_channels" not in spec or "input_size" not in spec:
            return
        size = int(spec["input_size"])
        ours = (int(spec["in_channels"]), size, size)
        if tuple(int(d) for d in data_shape) != ours:
            raise ValueError(f"The endpoints take inputs of shape {ours} (x in_channels, input_size) but "
                             f"{type(dm).__name__} gives {tuple(data_shape)}; evaluate them on the dataset they were "
                             "trained on (or pass --model.net_kwargs to override the stored architecture).")

    def load_endpoints(self) -> list[WeightDict]:
        """Read the endpoint weights, build the template net and check every endpoint against it.

        Raises:
            ValueError: No endpoints, unreadable files, or a mismatching tensor (named, with both shapes).
        """
        if not self.endpoints:
            raise ValueError(f"{type(self).__name__} has no endpoints: pass --model.endpoints [a.ckpt,b.ckpt].")
        pairs = zip(self.endpoints, self.prefixes, strict=True)
        loaded = [load_weights(p, prefix, key_map=self.key_map) for p, prefix in pairs]
        names = [f"endpoint {i} ({p})" for i, p in enumerate(self.endpoints)]
        return self.checked_states([state for state, _ in loaded], [spec for _, spec in loaded], names)

    def checked_states(self, states: Sequence[Mapping[str, Tensor]], specs: Sequence[dict[str, Any] | None],
                      names: Sequence[str]) -> list[WeightDict]:
        """Build the template net from ``specs`` (see :meth:`_resolve_spec`), check every state against it and
        against each other, and return them with the template's keys in its order.

        Raises:
            ValueError: A mismatching tensor, named with its source in ``names`` and both shapes.
        """
        template = self._make_template(self._resolve_spec(list(specs)))
        keys = list(template.state_dict())
        thetas = []
        for state, name in zip(states, names, strict=True):
            check_state_matches(template, state, source=name)
            thetas.append({k: state[k] for k in keys})
        check_compatible(*thetas, names=list(names))
        return thetas

    def _make_template(self, spec: dict[str, Any]) -> nn.Module:
        kwargs = dict(spec)
        with torch.random.fork_rng(devices=[]):  # its weights are never used: leave the run's random stream alone
            template = get_net(kwargs.pop("name"), **kwargs).eval()
        template.requires_grad_(False)
        self.net_spec = spec
        object.__setattr__(self, "_template", template)
        return template

    def setup(self, stage: str) -> None:
        """Load the endpoints and build the path (skipped when a checkpoint restores it)."""
        if stage == "fit" and not self.trainable:
            raise ValueError(f"{type(self).__name__} has nothing to train; evaluate it with `lmc test`.")
        if self.path is not None:
            return
        trainer = self._trainer
        if self.restore_pending or (trainer is not None and trainer.ckpt_path):
            return  # on_load_checkpoint rebuilds the path from the checkpoint, which holds the endpoints
        thetas = self.prepare_endpoints(self.load_endpoints())
        self.path = self.build_path(thetas)
        rank_zero_info(f"{type(self).__name__}: {type(self.path).__name__} path between "
                       f"{len(self.endpoints)} endpoints of '{self.net_spec['name']}'.")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store what rebuilding the path needs: the architecture and the number of endpoints (plain types); the
        endpoints themselves are tensors of the path, in the state dict."""
        super().on_save_checkpoint(checkpoint)
        checkpoint[CKPT_KEY] = {"net_spec": dict(self.net_spec or {}), "num_endpoints": self.path.num_fixed}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Rebuild the template and an empty path of the right structure; Lightning then loads its tensors."""
        super().on_load_checkpoint(checkpoint)
        info = checkpoint.get(CKPT_KEY)
        if info is None:
            raise ValueError(f"This checkpoint was not written by a {type(self).__name__} (no '{CKPT_KEY}' entry).")
        template = self._make_template(dict(info["net_spec"]))
        placeholder = {k: v.clone() for k, v in template.state_dict().items()}
        self.path = self.build_path([placeholder] * int(info["num_endpoints"]))
        self.path.to(self.device)

    # Evaluation -----------------------------------------------------------------------------------------------------

    def _datamodule(self) -> Any:
        dm = self.trainer.datamodule
        if dm is None or not hasattr(dm, "split_tensors"):
            raise ValueError(f"{type(self).__name__} evaluates whole splits: pass an lmc_lightning datamodule "
                             "(--data FashionMNISTDataModule, ...) that provides split_tensors().")
        return dm

    def evaluation_data(self, split: str = "test") -> tuple[Any, Any]:
        """``(evaluation data, statistics data)``: the named ``eval_sets`` of ``eval_split`` with the clean training
        set for statistics, or ``split`` of the datamodule with its training split."""
        dm = self._datamodule()
        stats_needed = self.bn is not None
        if self.eval_sets is None:
            return dm.split_tensors(split), (dm.split_tensors("train") if stats_needed else None)
        if not hasattr(dm, "eval_sets"):
            raise ValueError(f"eval_sets={self.eval_sets} needs a datamodule with named evaluation sets "
                             "(--data CueDataModule); drop --model.eval_sets to evaluate the test split.")
        data = dm.eval_sets(self.eval_split, self.eval_sets)
        return data, (dm.eval_sets("train", ["clean"])["clean"] if stats_needed else None)

    def evaluate_grid(self, split: str = "test") -> PathResult:
        """Evaluate :meth:`eval_coords` on a whole split of the attached datamodule, or on its named ``eval_sets``
        (all ranks must call this)."""
        if self.path is None:
            raise RuntimeError(f"{type(self).__name__}: no path yet; it is built in setup().")
        data, train = self.evaluation_data(split)
        coords = self.eval_coords()
        with progress_bar(self._trainer, len(coords), f"{type(self).__name__}: {split} points") as progress:
            return evaluate_on_ranks(
                self.path, self.net, data, self.trainer, coords=coords, bn=self.bn,
                train_data=train, bn_batches=self.bn_batches, bn_batch_size=self.bn_batch_size,
                batch_size=self.evaluation_batch_size, device=self.device, precision=self.eval_precision,
                strategy=self.eval_strategy, renorm_options=self.renorm_options, progress=progress,
            )

    def test_step(self, batch: Any, batch_idx: int) -> None:
        """Nothing per batch: the grid is evaluated once on the whole test split in ``on_test_epoch_end``."""
        return None

    def on_test_epoch_end(self) -> None:
        """Evaluate the grid, log per-point and barrier metrics, write the result files (rank 0)."""
        result = self.evaluate_grid("test")
        self.result = result
        self.log_result(result)
        folder = self.output_dir or self.trainer.log_dir or self.trainer.default_root_dir
        if self.trainer.is_global_zero:
            self.result_files = write_result(result, folder)
            b = result.barriers()
            summary = ("no barrier (non-finite loss at some points, see the warning)" if b["loss_barrier"] is None
                       else f"loss barrier {b['loss_barrier']:.4f}, accuracy barrier {b['accuracy_barrier']:.4f}")
            names = ", ".join(p.name for p in self.result_files.values())
            rank_zero_info(f"{type(self).__name__}: {summary}; wrote {names} to {FilePath(folder).resolve()}")

    def log_result(self, result: PathResult) -> None:
        """Log the ``barrier/*`` summary and the endpoints' ``endpoint/loss_t=0.00``, ``endpoint/acc_...`` values
        as scalars (with named sets: ``barrier/<set>/*`` and ``endpoint/<set>/*``), and the whole curve (or
        surface) as a figure to loggers that take images (TensorBoard, W&B); the values at every point are in
        ``path.csv``/``path.json``."""
        parts = {f"/{name}": part for name, part in result.sets.items()} or {"": result}
        metrics = {}
        for tag, part in parts.items():
            metrics.update(summary_metrics(part, prefix=f"barrier{tag}"))
            for coord, loss, acc in zip(part.coords, part.loss, part.accuracy, strict=True):
                if np.all((coord == 0) | (coord == 1)):
                    label = point_label(coord.tolist())
                    metrics[f"endpoint{tag}/loss_{label}"] = float(loss)
                    metrics[f"endpoint{tag}/acc_{label}"] = float(acc)
        for name, value in metrics.items():
            self.log(name, value, sync_dist=False)  # already identical on every rank
        if self._trainer is not None and self.trainer.is_global_zero and self.trainer.loggers:
            log_figure(self.trainer.loggers, result.figure(title=type(self).__name__), "path", self.global_step)


def log_figure(loggers: Sequence[Any], figure: Any, tag: str, step: int = 0) -> list[str]:
    """Send a matplotlib figure, as an RGB image, to every logger that takes images (TensorBoard, W&B).

    Returns:
        The class names of the loggers that received it (CSV loggers take no images: ``path.png`` is on disk).
    """
    figure.canvas.draw()
    image = np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()
    sent = []
    for logger in loggers:
        kind = type(logger).__name__
        if kind == "TensorBoardLogger":
            logger.experiment.add_image(tag, image, global_step=step, dataformats="HWC")
        elif kind == "WandbLogger":
            logger.log_image(key=tag, images=[image], step=step)
        else:
            continue
        sent.append(kind)
    return sent


def summary_metrics(result: PathResult, prefix: str = "barrier") -> dict[str, float]:
    """The barrier summary of a result as ``{prefix}/loss``, ``{prefix}/accuracy``, ``{prefix}/loss_mean``, ...

    Empty when a point's loss is not finite (there is no barrier then; see :meth:`PathResult.barriers`).
    """
    b = result.barriers()
    names = {"loss": "loss_barrier", "accuracy": "accuracy_barrier", "loss_mean": "loss_barrier_mean",
             "accuracy_mean": "accuracy_barrier_mean"}
    return {f"{prefix}/{short}": float(b[long]) for short, long in names.items() if b[long] is not None}


def restore_path_module(file: str | os.PathLike) -> PathModule | None:
    """The path module (a fitted ``CurveModule`` or ``SurfaceModule``) saved in ``file``, its path restored on the
    CPU in eval mode; None when ``file`` is not a path module's checkpoint (e.g. a network's).

    The checkpoint is read with ``weights_only=True``; the module is rebuilt from its stored hyperparameters and
    class name (only :class:`PathModule` subclasses in :mod:`lmc_lightning.modules`).

    Raises:
        ValueError: The checkpoint names a class that is not an lmc_lightning path module.
    """
    obj = torch.load(file, map_location="cpu", weights_only=True)
    if not isinstance(obj, Mapping) or CKPT_KEY not in obj or not isinstance(obj.get("state_dict"), Mapping):
        return None
    from lmc_lightning import modules
    from lmc_lightning.modules.base import MODULE_KEY

    writer = str(obj.get(MODULE_KEY, ""))
    cls = getattr(modules, writer.rsplit(".", 1)[-1], None) if writer.startswith("lmc_lightning.modules.") else None
    if not (isinstance(cls, type) and issubclass(cls, PathModule)):
        raise ValueError(f"{file} holds a path checkpoint written by {writer or 'an unknown module'}, which is not "
                         "an lmc_lightning path module.")
    accepted = inspect.signature(cls.__init__).parameters
    hparams = {k: v for k, v in dict(obj.get("hyper_parameters", {})).items() if k in accepted}
    module = cls(**{**hparams, "endpoints": None})
    module.on_load_checkpoint(obj)
    module.load_state_dict(obj["state_dict"])
    return module.eval()


def as_weight_dict(state: Mapping[str, Tensor]) -> WeightDict:
    """A detached CPU copy of a state dict."""
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}
