"""PruneModule: one-shot pruning at several sparsities, with and without re-normalisation, under ``lmc test``."""

from __future__ import annotations

import csv
import io
from pathlib import Path as FilePath
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.func import functional_call

from lmc_lightning.io import atomic_write_text
from lmc_lightning.modules.base import OptimConfig
from lmc_lightning.modules.path import PathModule, WeightDict
from lmc_lightning.prune import prunable_keys, prune, sparsity_of
from lmc_lightning.weights import renorm as rn
from lmc_lightning.weights.evaluate import seeded_subset

RenormChoice = Literal["none", "repair", "rescale", "reset"]
DEFAULT_SPARSITIES = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
COLUMNS = ("sparsity", "actual_sparsity", "renorm", "acc_dense", "acc_pruned", "acc_renorm", "loss_dense",
           "loss_pruned", "loss_renorm")


@torch.no_grad()
def evaluate_weights(net: nn.Module, weights: WeightDict, x: Tensor, y: Tensor, batch_size: int = 1000
                     ) -> tuple[float, float]:
    """``(mean cross-entropy, accuracy)`` of ``net`` with ``weights`` (eval mode) on ``(x, y)``."""
    loss, correct = 0.0, 0
    for xb, yb in zip(x.split(batch_size), y.split(batch_size), strict=True):
        logits = functional_call(net, weights, (xb,)).float()
        loss += float(F.cross_entropy(logits, yb, reduction="sum"))
        correct += int((logits.argmax(1) == yb).sum())
    return loss / len(y), correct / len(y)


def plot_prune(rows: list[dict[str, Any]], path: str | FilePath) -> FilePath:
    """Accuracy against sparsity (dense, pruned, pruned + re-normalised), saved atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lmc_lightning.plots import save_figure

    fig, ax = plt.subplots(figsize=(5, 3.5))
    s = [r["sparsity"] for r in rows]
    ax.plot(s, [r["acc_dense"] for r in rows], "k--", label="dense")
    ax.plot(s, [r["acc_pruned"] for r in rows], "o-", label="pruned")
    if rows and rows[0]["renorm"] != "none":
        ax.plot(s, [r["acc_renorm"] for r in rows], "s-", label=f"pruned + {rows[0]['renorm']}")
    ax.set_xlabel("sparsity")
    ax.set_ylabel("test accuracy")
    ax.legend()
    fig.tight_layout()
    out = save_figure(fig, path)
    plt.close(fig)
    return out


class PruneModule(PathModule):
    """Prune one network at several sparsities; re-normalise each pruned net towards the dense net's statistics.

    ``lmc test --model PruneModule --model.endpoints [dense.ckpt] --model.sparsity [0.5,0.9,0.99]
    --model.renorm rescale --model.num_samples 256 --data FashionMNISTDataModule`` evaluates, on the test split, the
    dense net, each pruned net (:func:`lmc_lightning.prune.prune`: global magnitude over conv and linear weights, made
    permanent) and each pruned net after re-normalisation, as in the rethink-re-basin seed:

    * ``"repair"`` / ``"rescale"``: the pruned net's sites corrected towards the *dense* net's own site statistics
      (:func:`lmc_lightning.weights.renorm.renormalize_to`), BN statistics re-estimated;
    * ``"reset"``: BN statistics re-estimated (BN nets only);
    * ``"none"``: the pruned net as is.

    Statistics use ``num_samples`` training samples (a seeded subset; the seed's sweeps use 64-256). It logs
    ``prune/acc_dense``, ``prune/acc_pruned_s=...`` and ``prune/acc_renorm_s=...``, and writes ``prune.csv`` and
    ``prune.png`` into the log folder.

    Args:
        endpoints: One checkpoint, the dense network.
        sparsity: Sparsities to evaluate, each in ``[0, 1)``.
        renorm: ``"none"``, ``"repair"``, ``"rescale"`` or ``"reset"``.
        renorm_options: Site rule and variants (:class:`~lmc_lightning.weights.renorm.RenormOptions` fields).
        num_samples: Training samples for the statistics.
        bn_batch_size: Batch size of the statistics passes.
        pruner: A registered pruner name (``"magnitude"``; see :func:`lmc_lightning.prune.register_pruner`).
        evaluation_batch_size: Batch size of the evaluation.
        seed: Seed of the statistics subset.
        prefix: Network submodule inside the checkpoint.
        net: Architecture name, needed only for a plain state dict.
        net_kwargs: Architecture arguments overriding the checkpoint's.
        output_dir: Folder of the result files; ``None``: the trainer's log folder.
        num_classes: Number of classes (linked from the data).
        input_shape: ``(C, H, W)`` of the inputs (linked from the data).
        optim: Unused (nothing is trained).
        label_smoothing: Unused.
    """

    min_endpoints = 1

    def __init__(
        self,
        endpoints: list[str] | None = None,
        sparsity: list[float] | None = None,
        renorm: RenormChoice = "repair",
        renorm_options: dict[str, Any] | None = None,
        num_samples: int = 256,
        bn_batch_size: int = 128,
        pruner: str = "magnitude",
        evaluation_batch_size: int = 1000,
        seed: int = 0,
        prefix: str = "net",
        net: str | None = None,
        net_kwargs: dict[str, Any] | None = None,
        output_dir: str | None = None,
        num_classes: int = 10,
        input_shape: tuple[int, int, int] = (1, 28, 28),
        optim: OptimConfig | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        if endpoints is not None and len(endpoints) != 1:
            raise ValueError(f"PruneModule prunes one network: pass --model.endpoints [dense.ckpt], got "
                             f"{len(endpoints)} files.")
        if renorm not in ("none", "repair", "rescale", "reset"):
            raise ValueError(f"renorm must be 'none', 'repair', 'rescale' or 'reset', got {renorm!r}.")
        sparsity = list(DEFAULT_SPARSITIES if sparsity is None else sparsity)
        if not sparsity or any(isinstance(s, bool) or not 0 <= float(s) < 1 for s in sparsity):
            raise ValueError(f"sparsity must be a non-empty list of fractions in [0, 1), got {sparsity!r}.")
        if num_samples < 1 or bn_batch_size < 1 or evaluation_batch_size < 1:
            raise ValueError("num_samples, bn_batch_size and evaluation_batch_size must be >= 1, got "
                             f"{num_samples}, {bn_batch_size}, {evaluation_batch_size}.")
        super().__init__(endpoints=endpoints, num_points=2, prefix=prefix, net=net, net_kwargs=net_kwargs,
                         output_dir=output_dir, num_classes=num_classes, input_shape=input_shape, optim=optim,
                         label_smoothing=label_smoothing)
        self.sparsity = [float(s) for s in sparsity]
        self.renorm = renorm
        self.options = rn.RenormOptions.parse(renorm_options)
        self.num_samples = num_samples
        self.stats_batch_size = bn_batch_size
        self.pruner = pruner
        self.eval_batch_size = evaluation_batch_size
        self.seed = seed
        self.dense: WeightDict | None = None
        self.rows: list[dict[str, Any]] = []

    def setup(self, stage: str) -> None:
        """Load the dense network."""
        if stage == "fit":
            raise ValueError("PruneModule has nothing to train; evaluate it with `lmc test`.")
        if self.dense is None:
            self.dense = self.load_endpoints()[0]

    def build_path(self, thetas: list[WeightDict]) -> None:
        """PruneModule evaluates single nets, not a path."""
        raise NotImplementedError("PruneModule has no path.")

    def _renormalized(self, net: nn.Module, dense: WeightDict, pruned: WeightDict, batches: list[Tensor],
                      goal: rn.Stats | None, sites: list[rn.Site] | None) -> WeightDict:
        if self.renorm == "none":
            return pruned
        if self.renorm == "reset":
            return rn.reset_bn(net, batches, pruned, sync=False)
        return rn.renormalize_to(net, pruned, goal, batches, self.renorm, sites=sites, sync=False,
                                     average=self.options.average, factor=self.options.factor,
                                     sequential=self.options.sequential, statistics=self.options.statistics)

    def sweep(self) -> list[dict[str, Any]]:
        """Evaluate the dense net and every sparsity; returns one row per sparsity (see :data:`COLUMNS`)."""
        dm = self._datamodule()
        device = self.device
        net = self.net.to(device).eval()
        dense = {k: v.to(device) for k, v in self.dense.items()}
        x, y = (t.to(device) for t in dm.split_tensors("test"))
        xs = seeded_subset(dm.split_tensors("train"), self.num_samples, seed=self.seed)[0].to(device)
        batches = list(xs.split(self.stats_batch_size))
        if self.renorm == "reset" and not rn.batchnorms(net):
            raise ValueError(f"renorm='reset' needs BatchNorm layers; {type(net).__name__} has none. Use 'repair' or "
                             "'rescale'.")
        goal = sites = None
        if self.renorm in ("repair", "rescale"):
            sites = rn.find_sites(net, batches[0][:2], dense, self.options.sites)
            goal = rn.site_statistics(net, batches, dense, sites=sites, sync=False,
                                          statistics=self.options.statistics)
        loss_d, acc_d = evaluate_weights(net, dense, x, y, self.eval_batch_size)
        keys = prunable_keys(net)
        rows = []
        for s in self.sparsity:
            pruned, _ = prune(net, s, dense, pruner=self.pruner, keys=keys)
            loss_p, acc_p = evaluate_weights(net, pruned, x, y, self.eval_batch_size)
            fixed = self._renormalized(net, dense, pruned, batches, goal, sites)
            loss_r, acc_r = evaluate_weights(net, fixed, x, y, self.eval_batch_size)
            rows.append({"sparsity": s, "actual_sparsity": sparsity_of(pruned, keys), "renorm": self.renorm,
                         "acc_dense": acc_d, "acc_pruned": acc_p, "acc_renorm": acc_r, "loss_dense": loss_d,
                         "loss_pruned": loss_p, "loss_renorm": loss_r})
        return rows

    def on_test_epoch_end(self) -> None:
        """Run the sweep, log it and write ``prune.csv`` / ``prune.png`` (rank 0)."""
        self.rows = self.sweep()
        metrics = {"prune/acc_dense": self.rows[0]["acc_dense"]}
        for r in self.rows:
            metrics[f"prune/acc_pruned_s={r['sparsity']:.2f}"] = r["acc_pruned"]
            metrics[f"prune/acc_renorm_s={r['sparsity']:.2f}"] = r["acc_renorm"]
        for name, value in metrics.items():
            self.log(name, float(value), sync_dist=False)
        folder = FilePath(self.output_dir or self.trainer.log_dir or self.trainer.default_root_dir)
        if self.trainer.is_global_zero:
            buf = io.StringIO()
            writer = csv.DictWriter(buf, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(self.rows)
            self.result_files = {"csv": atomic_write_text(folder / "prune.csv", buf.getvalue()),
                                 "png": plot_prune(self.rows, folder / "prune.png")}
            rank_zero_info(f"PruneModule: wrote {', '.join(map(str, self.result_files.values()))}")
