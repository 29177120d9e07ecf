"""SimilarityModule: layer x layer representation similarity of two nets on the test set."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lmc_lightning.checkpoint import load_net
from lmc_lightning.io import atomic_write_text
from lmc_lightning.metrics.similarity_functional import METRICS, similarity_matrix
from lmc_lightning.modules.base import LMCModule, OptimConfig
from lmc_lightning.stitching import stitch_points
from lmc_lightning.weights.permutation.batches import capture_module


class SimilarityModule(LMCModule):
    """Compare the representations of two nets at every stitch point, layer by layer.

    ``lmc test --model SimilarityModule --model.endpoints [a.ckpt,b.ckpt] --model.metrics [grelu_cka]
    --data FashionMNISTDataModule`` collects the features at every point (every ReLU, see
    :func:`~lmc_lightning.stitching.stitch_points`) on up to ``num_samples`` test images, computes the
    ``[points_a, points_b]`` matrix of each metric (:func:`~lmc_lightning.metrics.similarity_matrix`; CKA kernels
    once per layer, in blocks on the device), logs the diagonal as ``similarity/<metric>/<point>`` and writes
    ``similarity.csv`` (columns metric, point_a, point_b, value) and ``similarity_<metric>.png`` heat maps. Under
    DDP the features of all ranks are gathered before the matrices are computed, so the values are those of one
    process on the same samples.

    Args:
        endpoints: ``[a.ckpt, b.ckpt]`` (or one checkpoint: the net with itself).
        metrics: Any of ``grelu_procrustes``, ``orthogonal_procrustes``, ``grelu_cka``, ``linear_cka``,
            ``linear_cka_biased``.
        points: Points to compare; None: every activation of net A (the nets may differ, then each uses its own).
        diagonal_only: Only same-index pairs (the seed's Procrustes runs); the CSV then has one row per point.
        num_samples: At most this many test samples (the first ones of the loader).
        prefix: Network submodule in the checkpoints.
        net: Architecture name for plain state dict endpoints.
        net_kwargs: Architecture arguments overriding the checkpoints'.
        output_dir: Folder of the CSV and figures; None: the trainer's log folder.
        num_classes: Number of classes (linked from the data).
        input_shape: ``(C, H, W)`` of the inputs (linked from the data).
        optim: Unused (nothing is trained).
        label_smoothing: Unused.
    """

    def __init__(
        self,
        endpoints: list[str] | None = None,
        metrics: list[str] | None = None,
        points: list[str] | None = None,
        diagonal_only: bool = False,
        num_samples: int = 10_000,
        prefix: str | list[str] = "net",
        net: str | None = None,
        net_kwargs: dict[str, Any] | None = None,
        output_dir: str | None = None,
        num_classes: int = 10,
        input_shape: tuple[int, int, int] = (1, 28, 28),
        optim: OptimConfig | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(num_classes=num_classes, input_shape=input_shape, optim=optim,
                         label_smoothing=label_smoothing)
        metrics = list(metrics) if metrics is not None else ["grelu_procrustes", "orthogonal_procrustes",
                                                              "grelu_cka", "linear_cka"]
        bad = [m for m in metrics if m not in METRICS]
        if bad:
            raise ValueError(f"Unknown similarity metric(s) {bad}; choose from {METRICS}.")
        if endpoints is not None and len(endpoints) not in (1, 2):
            raise ValueError(f"SimilarityModule takes one or two endpoints, got {len(endpoints)}.")
        if num_samples < 4:
            raise ValueError(f"num_samples must be >= 4, got {num_samples}.")
        self.save_hparams()
        self.endpoints, self.metrics, self.points, self.diagonal_only = endpoints, metrics, points, diagonal_only
        self.num_samples, self.prefix, self.net_name = num_samples, prefix, net
        self.net_kwargs, self.output_dir = dict(net_kwargs or {}), output_dir
        self.captures: torch.nn.ModuleList | None = None
        self.point_names: list[list[str]] = []
        self._feats: list[list[list[Tensor]]] = []
        self._seen = 0
        self.results: dict[str, Tensor] = {}
        self.files: list[Path] = []

    def setup(self, stage: str) -> None:
        """Load the endpoints and trace them to return their features at the points."""
        if self.captures is not None:
            return
        if not self.endpoints:
            raise ValueError("SimilarityModule needs --model.endpoints [a.ckpt,b.ckpt].")
        paths = self.endpoints if len(self.endpoints) == 2 else self.endpoints * 2
        captures, self.point_names = [], []
        for i, path in enumerate(paths):
            prefix = self.prefix if isinstance(self.prefix, str) else self.prefix[i]
            net = load_net(path, net=self.net_name, prefix=prefix, **self.net_kwargs)
            points = self.points if self.points is not None else stitch_points(net)
            captures.append(capture_module(net, points).eval())
            self.point_names.append(list(points))
        self.captures = torch.nn.ModuleList(captures)

    def configure_optimizers(self) -> None:
        """Nothing is trained."""
        return None

    def on_test_epoch_start(self) -> None:
        """Empty the feature lists."""
        self._feats = [[[] for _ in names] for names in self.point_names]
        self._seen = 0

    @torch.no_grad()
    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Store the features of both nets at every point (up to ``num_samples`` in total)."""
        x = batch[0][: max(self.num_samples - self._seen * self.trainer.world_size, 0) // self.trainer.world_size]
        if len(x) == 0:
            return
        self._seen += len(x)
        for k, capture in enumerate(self.captures):
            capture.eval()
            for store, h in zip(self._feats[k], capture(x), strict=True):
                store.append(h.float())

    def _gathered(self, k: int) -> list[Tensor]:
        feats = []
        for store in self._feats[k]:
            h = torch.cat(store)
            if self.trainer.world_size > 1:
                h = self.all_gather(h).flatten(0, 1)
            feats.append(h)
        return feats

    def on_test_epoch_end(self) -> None:
        """Compute the matrices, log the diagonal, write CSV and heat maps (rank 0)."""
        if self._seen == 0:
            raise ValueError("SimilarityModule saw no test batches.")
        fa, fb = self._gathered(0), self._gathered(1)
        rows = []
        for metric in self.metrics:
            if self.diagonal_only:
                n = min(len(fa), len(fb))
                values = torch.stack([similarity_matrix([fa[i]], [fb[i]], metric)[0, 0] for i in range(n)])
                mat = torch.full((len(fa), len(fb)), float("nan"), dtype=torch.float64)
                mat[range(n), range(n)] = values
            else:
                mat = similarity_matrix(fa, fb, metric)
            self.results[metric] = mat
            for i, pa in enumerate(self.point_names[0]):
                for j, pb in enumerate(self.point_names[1]):
                    if not torch.isnan(mat[i, j]):
                        rows.append((metric, pa, pb, float(mat[i, j])))
            n = min(mat.shape)
            self.log_dict({f"similarity/{metric}/{self.point_names[0][i]}": float(mat[i, i]) for i in range(n)},
                          rank_zero_only=True)
        if self.trainer.is_global_zero:
            self.files = self._write(rows)
            rank_zero_info(f"SimilarityModule: wrote {', '.join(map(str, self.files))}")

    def _write(self, rows: list[tuple]) -> list[Path]:
        from lmc_lightning.plots import plot_heatmap, save_figure

        folder = Path(self.output_dir or self.trainer.log_dir or self.trainer.default_root_dir)
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(["metric", "point_a", "point_b", "value"])
        writer.writerows(rows)
        files = [atomic_write_text(folder / "similarity.csv", buf.getvalue())]
        for metric, mat in self.results.items():
            fig = plot_heatmap(mat.numpy(), self.point_names[0], self.point_names[1],
                               title=f"{metric}, {self._seen * self.trainer.world_size} samples", label=metric)
            files.append(save_figure(fig, folder / f"similarity_{metric}.png"))
        return files
