"""Stitching penalty at every point for several layer types: a small driver around ``StitchModule``.

``python -m lmc_lightning.stitch_sweep --endpoints a.ckpt b.ckpt --layers identity affine lowrank birkhoff
--data-root /usr/share/datasets/fashion-mnist --out runs/stitch`` trains one stitch per (point, layer) with the
seed's protocol (``identity`` is evaluated untrained), tests each on the test set under the same BN protocol as the
endpoints, and writes ``stitch_sweep.csv`` (one row per run) and ``stitch_sweep.png`` (penalty per point, one bar
per layer).
"""

from __future__ import annotations

import argparse
import csv
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from lmc_lightning.checkpoint import load_net
from lmc_lightning.io import atomic_write_text
from lmc_lightning.modules.stitch import StitchModule
from lmc_lightning.stitching import stitch_points

COLUMNS = ("point", "layer", "penalty", "accuracy", "endpoint_acc_a", "endpoint_acc_b", "best_val_accuracy",
           "accuracy_soft", "rounding_cost", "perm_distance", "row_max", "epochs")


def stitch_sweep(endpoints: Sequence[str], datamodule: pl.LightningDataModule,
                 layers: Sequence[str] = ("identity", "affine", "lowrank", "birkhoff"),
                 points: Sequence[str] | None = None, epochs: int = 20, output_dir: str | os.PathLike = "stitch_sweep",
                 seed: int = 0, trainer_kwargs: dict[str, Any] | None = None, **stitch_kwargs: Any) -> list[dict]:
    """Train and test one stitch per (point, layer); write the CSV and the bar plot.

    Args:
        endpoints: ``[a.ckpt, b.ckpt]``.
        datamodule: Training data for the stitch and the BN passes; its validation split (if any) is evaluated every
            epoch, its test split once at the end (the reported penalty).
        layers: Layer types (``identity`` is not trained).
        points: Stitch points; None: all of net A's.
        epochs: Training epochs per stitch (the seed: 20, of which ``warmup_epochs`` without scalars for Birkhoff).
        output_dir: Folder of ``stitch_sweep.csv`` and ``stitch_sweep.png``.
        seed: Seed of each run (stitch initialisation, data order).
        trainer_kwargs: Extra ``pl.Trainer`` arguments.
        **stitch_kwargs: ``StitchModule`` arguments (``rank``, ``alpha``, ``warmup_epochs``, ``bn_batches``, ...).

    Returns:
        One dict per run with the ``COLUMNS``; Birkhoff rows also hold ``history`` (per-validation metrics).
    """
    from lmc_lightning.plots import plot_bars, save_figure

    points = list(points) if points is not None else stitch_points(load_net(endpoints[0]))
    out = Path(output_dir)
    rows = []
    for point in points:
        for layer in layers:
            pl.seed_everything(seed, verbose=False)
            model = StitchModule(endpoints=list(endpoints), point=point, layer=layer,
                                 num_classes=datamodule.num_classes, input_shape=datamodule.input_shape,
                                 **stitch_kwargs)
            kwargs = {"max_epochs": epochs, "logger": False, "enable_checkpointing": False,
                      "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0,
                      "default_root_dir": str(out), **(trainer_kwargs or {})}
            trainer = pl.Trainer(**kwargs)
            if layer != "identity":
                trainer.fit(model, datamodule=datamodule)
            history = list(model.history)
            trainer.test(model, datamodule=datamodule, verbose=False)
            last = model.last_metrics
            row = {"point": point, "layer": layer, "penalty": last["penalty"], "accuracy": last["accuracy"],
                   "endpoint_acc_a": last["endpoint_acc_a"], "endpoint_acc_b": last["endpoint_acc_b"],
                   "best_val_accuracy": max((h["accuracy"] for h in history), default=float("nan")),
                   "accuracy_soft": last.get("accuracy_soft", float("nan")),
                   "rounding_cost": last.get("rounding_cost", float("nan")),
                   "perm_distance": last.get("perm_distance", float("nan")),
                   "row_max": last.get("row_max", float("nan")), "epochs": 0 if layer == "identity" else epochs,
                   "history": history}
            rows.append(row)
            print(f"stitch_sweep: point {point} layer {layer}: penalty {row['penalty']:.4f} "
                  f"(stitched {row['accuracy']:.4f})", flush=True)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "stitch_sweep.csv", buf.getvalue())
    values = {layer: [100 * r["penalty"] for r in rows if r["layer"] == layer] for layer in layers}
    save_figure(plot_bars(values, points, "stitching penalty (points of accuracy)", "penalty per stitch point"),
                out / "stitch_sweep.png")
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    """Command line: ``python -m lmc_lightning.stitch_sweep --endpoints a.ckpt b.ckpt ...``."""
    from lmc_lightning.data import FashionMNISTDataModule

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--endpoints", nargs=2, required=True)
    p.add_argument("--layers", nargs="+", default=["identity", "affine", "lowrank", "birkhoff"])
    p.add_argument("--points", nargs="+", default=None)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--warmup-epochs", type=int, default=10)
    p.add_argument("--rank", type=int, default=1)
    p.add_argument("--alpha", type=float, default=0.1)
    p.add_argument("--bn-batches", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--train-subset", type=int, default=None)
    p.add_argument("--val-split", type=int, default=0)
    p.add_argument("--data-root", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--out", default="stitch_sweep")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    data = FashionMNISTDataModule(root=args.data_root, batch_size=args.batch_size, eval_batch_size=1000,
                                  train_subset=args.train_subset, val_split=args.val_split, seed=args.seed)
    return stitch_sweep(args.endpoints, data, args.layers, args.points, args.epochs, args.out, args.seed,
                        rank=args.rank, alpha=args.alpha, warmup_epochs=args.warmup_epochs, bn_batches=args.bn_batches)


if __name__ == "__main__":
    main()
