"""InterpolationBarrier: measure the linear-interpolation barrier while a network trains."""

from __future__ import annotations

import copy
import math
import os
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from lmc_lightning.checkpoint import check_state_matches, load_weights
from lmc_lightning.data.chunks import estimated_steps
from lmc_lightning.io import atomic_write_text
from lmc_lightning.metrics.functional import barrier
from lmc_lightning.modules.path import BNMode, check_eval_settings, evaluate_on_ranks, summary_metrics
from lmc_lightning.weights.evaluate import seeded_subset
from lmc_lightning.weights.paths import Linear

Split = Literal["auto", "train", "val", "test"]
SPLITS = ("auto", "train", "val", "test")


class InterpolationBarrier(Callback):
    """Measure the barrier on the line between the network being trained and a reference, during ``fit``.

    The path runs from the trained network (``pl_module.net``, ``t = 0``) to the reference (``t = 1``):

    * ``"init"``: the network's own weights when fit started (restored from the checkpoint on resume);
    * ``"twin"``: the other network of a :class:`~lmc_lightning.modules.pair.PairModule` (``pl_module.net_b``);
    * a checkpoint path: fixed weights (``reference_prefix`` names the network inside a Lightning checkpoint);
    * ``"zoo"``: between members of a zoo (``EndpointModule(num_models=K)``), on the disjoint pairs (0, 1), (2, 3),
      ...; each pair is logged with a ``_kk_ll`` suffix (``barrier/loss_00_01``) and the unsuffixed names hold the
      mean over pairs. With another reference, a zoo's member 0 is the trained network.

    Each measurement evaluates ``num_points`` points on (at most ``max_eval_samples`` samples of) the chosen split
    and logs ``barrier/loss``, ``barrier/accuracy``, ``barrier/loss_mean``, ``barrier/accuracy_mean`` and
    ``barrier/top5_accuracy`` (``barrier/top5_accuracy_mean``) to every logger at the current step (and into
    ``trainer.callback_metrics``, so a checkpoint callback may monitor them). With several splits (e.g. ``[train,
    test]``, as the rethink-re-basin seed's ``run_ex.py`` measures) the names carry the split:
    ``barrier/train/loss``, ``barrier/test/top5_accuracy``, ... Under DDP every rank evaluates its slice and the sums
    are all-reduced. Every point's loss, top-1 and top-5 accuracy is kept per measurement (``curves``) and, with
    ``save_curves``, written to ``<log dir>/barrier_curves/<log_prefix>_step<step>_<split>.csv``.

    Args:
        reference: ``"init"``, ``"twin"``, ``"zoo"`` or a checkpoint file.
        every_n_epochs: Measure at the end of every n-th training epoch; ``None``: not by epochs.
        every_fraction: Also measure every ``every_fraction`` of training (in optimiser steps, e.g. 0.1: ten times);
            ``None``: not by fraction. A step is measured at most once. With the datamodule's ``steps_per_batch =
            S > 1`` the measurement comes after the chunk of ``S`` steps that holds the target step (up to ``S - 1``
            steps late; logged at the step it is taken).
        at_start: Also measure before the first training step.
        num_points: Points on ``t`` in [0, 1], endpoints included.
        bn: Statistics at every point: ``"reset"`` (BN reset on training data), ``"repair"``, ``"rescale"``,
            ``"reshift"``, ``"rescale_centered"`` (see :mod:`lmc_lightning.weights.renorm`) or ``None`` (the
            interpolated running statistics).
        bn_batches: Batches of training data for the BN statistics.
        bn_batch_size: Batch size of the BN statistics pass.
        max_eval_samples: Evaluate on at most this many samples of the split (a fixed seeded subset); ``None``: all.
        split: ``"train"`` (unaugmented training data), ``"val"``, ``"test"``, ``"auto"`` (val when the datamodule
            has one, else test), or a list of them.
        reference_prefix: Network submodule inside a reference Lightning checkpoint.
        evaluation_batch_size: Batch size of the evaluation pass (None: as large as memory allows on CUDA, 1000
            elsewhere; see :func:`~lmc_lightning.weights.evaluate.evaluate_path`).
        precision: Evaluation precision (``"auto"``: bf16 autocast on GPU).
        strategy: Evaluation strategy (``"auto"``, ``"loop"``, ``"vmap"``).
        log_prefix: Prefix of the logged names (use distinct ones for several barrier callbacks).
        seed: Seed of the evaluation and BN subsets.
        save_curves: Write each measurement's per-point values to a CSV file (rank 0).
        curves_dir: Folder of those files; ``None``: ``<trainer.log_dir>/barrier_curves``.
    """

    def __init__(
        self,
        reference: str = "init",
        every_n_epochs: int | None = 1,
        every_fraction: float | None = None,
        at_start: bool = False,
        num_points: int = 11,
        bn: BNMode | None = None,
        bn_batches: int = 20,
        bn_batch_size: int = 500,
        max_eval_samples: int | None = 10_000,
        split: Split | list[Split] = "auto",
        reference_prefix: str = "net",
        evaluation_batch_size: int | None = None,
        precision: str = "auto",
        strategy: str = "auto",
        log_prefix: str = "barrier",
        seed: int = 0,
        save_curves: bool = True,
        curves_dir: str | None = None,
    ) -> None:
        if reference not in ("init", "twin", "zoo") and not os.path.isfile(reference):
            raise ValueError(f"reference must be 'init', 'twin', 'zoo' or an existing checkpoint file; {reference!r} "
                             "is none of these (check the path).")
        if every_n_epochs is None and every_fraction is None and not at_start:
            raise ValueError("Nothing would be measured: set every_n_epochs, every_fraction or at_start.")
        if every_n_epochs is not None and every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1 or None, got {every_n_epochs}.")
        if every_fraction is not None and not 0 < every_fraction <= 1:
            raise ValueError(f"every_fraction must lie in (0, 1] (e.g. 0.1 for every 10% of training), "
                             f"got {every_fraction}.")
        if max_eval_samples is not None and max_eval_samples < 1:
            raise ValueError(f"max_eval_samples must be >= 1 or None, got {max_eval_samples}.")
        check_eval_settings(precision, strategy, num_points, bn, bn_batches, bn_batch_size, evaluation_batch_size)
        splits = [split] if isinstance(split, str) else list(split)
        if not splits or any(s not in SPLITS for s in splits) or len(set(splits)) != len(splits):
            raise ValueError(f"split must be one of {SPLITS} or a list of distinct ones, got {split!r}.")
        self.reference = reference
        self.every_n_epochs = every_n_epochs
        self.every_fraction = every_fraction
        self.at_start = at_start
        self.num_points = num_points
        self.bn = bn
        self.bn_batches = bn_batches
        self.bn_batch_size = bn_batch_size
        self.max_eval_samples = max_eval_samples
        self.split = split
        self.splits = splits
        self.save_curves = save_curves
        self.curves_dir = curves_dir
        self.curves: list[dict[str, Any]] = []
        self.reference_prefix = reference_prefix
        self.evaluation_batch_size = evaluation_batch_size
        self.precision = str(precision)
        self.strategy = strategy
        self.log_prefix = log_prefix
        self.seed = seed
        self.last_step = -1
        self.history: list[dict[str, float]] = []
        self.init_weights: dict[str, Tensor] | None = None
        self._fixed: dict[str, Tensor] | None = None
        self._targets: set[int] = set()
        self._data: dict[str, tuple[Tensor, Tensor]] = {}
        self._train: tuple[Tensor, Tensor] | None = None
        self._template: nn.Module | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(reference=self.reference, log_prefix=self.log_prefix)

    # Setup ----------------------------------------------------------------------------------------------------------

    @staticmethod
    def _net(pl_module: LightningModule, name: str = "net") -> nn.Module:
        if name == "net" and getattr(pl_module, "num_models", 1) > 1:
            return pl_module.member(0)
        net = getattr(pl_module, name, None)
        if not isinstance(net, nn.Module):
            raise ValueError(f"InterpolationBarrier needs pl_module.{name} (a network); {type(pl_module).__name__} "
                             f"has none{' (reference=twin needs a PairModule)' if name == 'net_b' else ''}.")
        return net

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Check the module and load a checkpoint reference (fit only)."""
        if stage != "fit":
            return
        net = self._net(pl_module)
        if self.reference == "twin":
            self._net(pl_module, "net_b")
        elif self.reference == "zoo":
            if getattr(pl_module, "num_models", 1) < 2:
                raise ValueError("InterpolationBarrier(reference='zoo') needs a zoo: EndpointModule(num_models=K) "
                                 "with K >= 2.")
        elif self.reference != "init" and self._fixed is None:
            state, _ = load_weights(self.reference, self.reference_prefix)
            check_state_matches(net, state, source=f"reference {self.reference}")
            self._fixed = state
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "split_tensors"):
            raise ValueError("InterpolationBarrier needs an lmc_lightning datamodule (with split_tensors()).")

    @staticmethod
    def _eval_split(dm: Any, split: str) -> tuple[Tensor, Tensor]:
        if split != "auto":
            return dm.split_tensors(split)
        try:
            return dm.split_tensors("val")
        except ValueError:
            rank_zero_info("InterpolationBarrier: no validation split, measuring on the test split.")
            return dm.split_tensors("test")

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Capture the initial weights (unless restored), the evaluation data and the measurement steps."""
        net = self._net(pl_module)
        if self.reference == "init" and self.init_weights is None:
            if trainer.global_step > 0:
                rank_zero_warn("InterpolationBarrier: resuming without the initial weights in the checkpoint; "
                               "the reference is the weights at the resume point instead.")
            self.init_weights = {k: v.detach().to("cpu", copy=True) for k, v in net.state_dict().items()}
        dm = trainer.datamodule
        self._data = {s: seeded_subset(self._eval_split(dm, s), self.max_eval_samples, seed=self.seed)
                      for s in self.splits}
        if self.bn is not None:
            self._train = seeded_subset(dm.split_tensors("train"), self.bn_batches * self.bn_batch_size,
                                        seed=self.seed)
        self._template = copy.deepcopy(net).eval().requires_grad_(False)
        self._targets = set()
        if self.every_fraction is not None:
            total = estimated_steps(trainer)
            if not math.isfinite(total):
                raise ValueError("every_fraction needs a finite training length: set trainer.max_epochs or "
                                 "trainer.max_steps, or measure by every_n_epochs instead.")
            total = int(total)
            count = int(math.floor(1 / self.every_fraction + 1e-9))
            self._targets = {max(1, round(k * self.every_fraction * total)) for k in range(1, count + 1)}

    # Measurement ----------------------------------------------------------------------------------------------------

    def _reference_weights(self, pl_module: LightningModule) -> dict[str, Tensor]:
        if self.reference == "twin":
            return dict(self._net(pl_module, "net_b").state_dict())
        if self.reference == "init":
            return self.init_weights
        return self._fixed

    def _line_metrics(self, trainer: Trainer, theta: dict[str, Tensor], ref: dict[str, Tensor],
                      device: torch.device, suffix: str = "") -> tuple[dict[str, float], list[dict[str, Any]]]:
        """Barrier summaries (loss, top-1, top-5) of the line ``theta -> ref`` on every split, and its curves."""
        ref = {k: ref[k].detach().to(device, copy=True) for k in theta}
        coords = torch.linspace(0, 1, self.num_points, dtype=torch.float64)[:, None]
        metrics: dict[str, float] = {}
        curves = []
        for split, data in self._data.items():
            result = evaluate_on_ranks(
                Linear(theta, ref), self._template, data, trainer, coords=coords, bn=self.bn,
                train_data=self._train, bn_batches=self.bn_batches, bn_batch_size=self.bn_batch_size,
                batch_size=self.evaluation_batch_size, device=device, precision=self.precision,
                strategy=self.strategy,
            )
            prefix = self.log_prefix if len(self._data) == 1 else f"{self.log_prefix}/{split}"
            part = summary_metrics(result, prefix)
            top5 = result.meta["accuracy_top5"]
            part[f"{prefix}/top5_accuracy"] = float(barrier(top5, result.coords, higher_is_better=True))
            part[f"{prefix}/top5_accuracy_mean"] = float(barrier(top5, result.coords, higher_is_better=True,
                                                                 reference="mean"))
            metrics.update({f"{k}{suffix}": v for k, v in part.items()})
            curves.append({"step": trainer.global_step, "epoch": trainer.current_epoch, "split": f"{split}{suffix}",
                           "t": result.coords[:, 0].tolist(), "loss": [float(v) for v in result.loss],
                           "accuracy": [float(v) for v in result.accuracy], "accuracy_top5": list(top5)})
        return metrics, curves

    def _zoo_metrics(self, trainer: Trainer, pl_module: LightningModule) -> tuple[dict[str, float], list]:
        """Barriers of the disjoint member pairs (0, 1), (2, 3), ... and their means."""
        zoo = pl_module.net
        per_pair, curves = [], []
        for a in range(0, pl_module.num_models - 1, 2):
            theta = {k: v.detach().clone() for k, v in zoo.member_state(a).items()}
            pair, pair_curves = self._line_metrics(trainer, theta, zoo.member_state(a + 1), pl_module.device)
            curves += [{**c, "split": f"{c['split']}_{a:02d}_{a + 1:02d}"} for c in pair_curves]
            per_pair.append({f"{k}_{a:02d}_{a + 1:02d}": v for k, v in pair.items()})
            per_pair[-1]["mean"] = pair
        metrics = {k: sum(p["mean"][k] for p in per_pair) / len(per_pair) for k in per_pair[0]["mean"]}
        for pair in per_pair:
            metrics.update({k: v for k, v in pair.items() if k != "mean"})
        return metrics, curves

    def measure(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, float]:
        """Evaluate the barrier now and log it (all ranks must call this together)."""
        if self.reference == "zoo":
            metrics, curves = self._zoo_metrics(trainer, pl_module)
        else:
            theta = {k: v.detach().clone() for k, v in self._net(pl_module).state_dict().items()}
            metrics, curves = self._line_metrics(trainer, theta, self._reference_weights(pl_module),
                                                 pl_module.device)
        step = trainer.global_step
        self.curves += curves
        if self.save_curves:  # trainer.log_dir broadcasts under DDP: every rank asks
            folder = self.curves_dir or os.path.join(trainer.log_dir or trainer.default_root_dir, "barrier_curves")
            if trainer.is_global_zero:
                for curve in curves:
                    self._write_curve(folder, curve)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
        self.history.append({"step": step, "epoch": trainer.current_epoch, **metrics})
        self.last_step = step
        first = next(iter(self._data)) if len(self._data) > 1 else None
        name = self.log_prefix if first is None else f"{self.log_prefix}/{first}"
        rank_zero_info(f"InterpolationBarrier ({self.reference}) step {step}: loss barrier "
                       f"{metrics[f'{name}/loss']:.4f}, accuracy barrier {metrics[f'{name}/accuracy']:.4f}"
                       f"{f' ({first})' if first else ''}")
        return metrics

    def _write_curve(self, folder: str, curve: dict[str, Any]) -> None:
        lines = ["t,loss,accuracy,accuracy_top5"] + [
            f"{t!r},{loss!r},{acc!r},{acc5!r}"
            for t, loss, acc, acc5 in zip(curve["t"], curve["loss"], curve["accuracy"], curve["accuracy_top5"],
                                          strict=True)]
        path = os.path.join(folder, f"{self.log_prefix}_step{curve['step']:08d}_{curve['split']}.csv")
        atomic_write_text(path, "\n".join(lines) + "\n")

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.at_start and trainer.global_step == 0 and self.last_step < 0:
            self.measure(trainer, pl_module)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # A target passed since the last measurement (with steps_per_batch > 1 a batch makes several steps: the
        # measurement comes at the end of the chunk holding the target step).
        step = trainer.global_step
        if any(self.last_step < target <= step for target in self._targets):
            self.measure(trainer, pl_module)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        n = self.every_n_epochs
        if n is not None and (trainer.current_epoch + 1) % n == 0 and trainer.global_step > self.last_step:
            self.measure(trainer, pl_module)

    # Resume ---------------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step, "history": [dict(h) for h in self.history],
                "init_weights": self.init_weights, "curves": [dict(c) for c in self.curves]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_step = int(state_dict.get("last_step", -1))
        self.history = [dict(h) for h in state_dict.get("history", [])]
        self.curves = [dict(c) for c in state_dict.get("curves", [])]
        if state_dict.get("init_weights") is not None:
            self.init_weights = dict(state_dict["init_weights"])
