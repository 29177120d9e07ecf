"""Stitching penalty at every point for several layer types: a small driver around ``StitchModule``.

``python -m lmc_lightning.stitch_sweep --endpoints a.ckpt b.ckpt --layers identity affine lowrank birkhoff
--data-root /usr/share/datasets/fashion-mnist --out runs/stitch`` trains one stitch per (point, layer) with the
seed's protocol (``identity`` is evaluated untrained; ``birkhoff_cv``: alpha cross-validated on an 80/20 split of the
training data, the seed's variant), tests each on the test set under the same BN protocol as the
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
import torch

from lmc_lightning.checkpoint import load_net
from lmc_lightning.io import atomic_write_text
from lmc_lightning.modules.stitch import StitchModule
from lmc_lightning.stitching import stitch_points

COLUMNS = ("point", "layer", "penalty", "accuracy", "endpoint_acc_a", "endpoint_acc_b", "best_val_accuracy",
           "accuracy_soft", "rounding_cost", "perm_distance", "row_max", "epochs", "alpha")
#: The seed's cross-validated alphas, ``logspace(-3, 1, 5)``.
CV_ALPHAS = (1e-3, 1e-2, 1e-1, 1.0, 10.0)


def _trainer(epochs: int, output_dir: str | os.PathLike, trainer_kwargs: dict[str, Any] | None) -> pl.Trainer:
    kwargs = {"max_epochs": epochs, "logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
              "enable_model_summary": False, "num_sanity_val_steps": 0, "default_root_dir": str(output_dir),
              **(trainer_kwargs or {})}
    return pl.Trainer(**kwargs)


def _row(model: StitchModule, point: str, layer: str, epochs: int, history: list[dict]) -> dict:
    """One result row from the module's last (test) metrics and its validation history."""
    last = model.last_metrics
    return {"point": point, "layer": layer, "penalty": last["penalty"], "accuracy": last["accuracy"],
            "endpoint_acc_a": last["endpoint_acc_a"], "endpoint_acc_b": last["endpoint_acc_b"],
            "best_val_accuracy": max((h["accuracy"] for h in history), default=float("nan")),
            "accuracy_soft": last.get("accuracy_soft", float("nan")),
            "rounding_cost": last.get("rounding_cost", float("nan")),
            "perm_distance": last.get("perm_distance", float("nan")),
            "row_max": last.get("row_max", float("nan")), "epochs": epochs,
            "alpha": model.layer_options["alpha"] if model.kind == "birkhoff" else float("nan"),
            "history": history, "perm_history": list(model.perm_history)}


def crossval_stitch(endpoints: Sequence[str], datamodule: pl.LightningDataModule, point: str,
                    alphas: Sequence[float] = CV_ALPHAS, epochs: int = 5, output_dir: str | os.PathLike = ".",
                    seed: int = 0, trainer_kwargs: dict[str, Any] | None = None, **stitch_kwargs: Any) -> dict:
    """The seed's cross-validated Birkhoff stitch: alpha chosen on a held-out part of the training data.

    For each alpha a Birkhoff stitch trains ``epochs`` epochs with the scalars on from the start (the seed: 5) on the
    datamodule's training split, validated every epoch on its validation split (the seed: 80/20, ``val_split=0.2``).
    The run with the best validation accuracy wins; its stitcher is reset to its best epoch, the BN pass runs over
    the training then the validation split (the seed's two no-grad passes), and it is tested.

    Args:
        endpoints: ``[a.ckpt, b.ckpt]``.
        datamodule: Data with a validation split.
        point: Stitch point.
        alphas: Candidate weights of the ``-||W||_F`` penalty.
        epochs: Training epochs per candidate.
        output_dir: Trainer root folder.
        seed: Seed of each run.
        trainer_kwargs: Extra ``pl.Trainer`` arguments.
        **stitch_kwargs: Other ``StitchModule`` arguments.

    Returns:
        The winner's row (``COLUMNS``, ``layer="birkhoff_cv"``, its ``alpha``) plus ``val_accuracy`` per alpha.

    Raises:
        ValueError: Without a validation split, or with no alphas.
    """
    if not getattr(datamodule, "val_split", 0):
        raise ValueError("crossval_stitch needs a datamodule with a validation split (the seed's 80/20: "
                         "val_split=0.2).")
    if not alphas:
        raise ValueError("crossval_stitch needs at least one alpha.")
    stitch_kwargs = {**stitch_kwargs, "warmup_epochs": 0}
    best, scores = None, {}
    for alpha in alphas:
        pl.seed_everything(seed, verbose=False)
        model = StitchModule(endpoints=list(endpoints), point=point, layer="birkhoff", alpha=alpha,
                             num_classes=datamodule.num_classes, input_shape=datamodule.input_shape, **stitch_kwargs)
        _trainer(epochs, output_dir, trainer_kwargs).fit(model, datamodule=datamodule)
        scores[alpha] = model.best_accuracy
        print(f"stitch_sweep: point {point} birkhoff alpha {alpha:g}: best validation accuracy "
              f"{model.best_accuracy:.4f}", flush=True)
        if best is None or model.best_accuracy > best.best_accuracy:
            best = model
    history = list(best.history)
    with torch.no_grad():
        best.stitcher.load_state_dict(best.best_stitcher)
    best.bn_splits = ["train", "val"]
    _trainer(epochs, output_dir, trainer_kwargs).test(best, datamodule=datamodule, verbose=False)
    return {**_row(best, point, "birkhoff_cv", epochs, history), "val_accuracy": scores}


def stitch_sweep(endpoints: Sequence[str], datamodule: pl.LightningDataModule,
                 layers: Sequence[str] = ("identity", "affine", "lowrank", "birkhoff"),
                 points: Sequence[str] | None = None, epochs: int = 20, output_dir: str | os.PathLike = "stitch_sweep",
                 seed: int = 0, trainer_kwargs: dict[str, Any] | None = None,
                 cv_datamodule: pl.LightningDataModule | None = None, cv_epochs: int = 5,
                 **stitch_kwargs: Any) -> list[dict]:
    """Train and test one stitch per (point, layer); write the CSV and the bar plot.

    Args:
        endpoints: ``[a.ckpt, b.ckpt]``.
        datamodule: Training data for the stitch and the BN passes; its validation split (if any) is evaluated every
            epoch, its test split once at the end (the reported penalty).
        layers: Layer types (``identity`` is not trained; ``birkhoff_cv``: :func:`crossval_stitch`).
        points: Stitch points; None: all of net A's.
        epochs: Training epochs per stitch (the seed: 20, of which ``warmup_epochs`` without scalars for Birkhoff);
            the rows hold the epochs and ``steps`` actually run (fewer when ``trainer_kwargs`` set ``max_time``).
        output_dir: Folder of ``stitch_sweep.csv`` and ``stitch_sweep.png``.
        seed: Seed of each run (stitch initialisation, data order).
        trainer_kwargs: Extra ``pl.Trainer`` arguments.
        cv_datamodule: Data of the ``birkhoff_cv`` runs (with a validation split); None: ``datamodule``.
        cv_epochs: Epochs per alpha of the ``birkhoff_cv`` runs (the seed: 5).
        **stitch_kwargs: ``StitchModule`` arguments (``rank``, ``alpha``, ``warmup_epochs``, ``bn_batches``, ...).

    Returns:
        One dict per run with the ``COLUMNS``, ``history`` (per-validation metrics) and ``perm_history`` (W's
        distance from a permutation per epoch, rounded layers).
    """
    from lmc_lightning.plots import plot_bars, save_figure

    points = list(points) if points is not None else stitch_points(load_net(endpoints[0]))
    out = Path(output_dir)
    rows = []
    for point in points:
        for layer in layers:
            if layer == "birkhoff_cv":
                row = crossval_stitch(endpoints, cv_datamodule or datamodule, point, epochs=cv_epochs,
                                      output_dir=out, seed=seed, trainer_kwargs=trainer_kwargs,
                                      **{k: v for k, v in stitch_kwargs.items() if k != "alpha"})
            else:
                pl.seed_everything(seed, verbose=False)
                model = StitchModule(endpoints=list(endpoints), point=point, layer=layer,
                                     num_classes=datamodule.num_classes, input_shape=datamodule.input_shape,
                                     **stitch_kwargs)
                trainer = _trainer(epochs, out, trainer_kwargs)
                if layer != "identity":
                    trainer.fit(model, datamodule=datamodule)
                history = list(model.history)
                trainer.test(model, datamodule=datamodule, verbose=False)
                row = {**_row(model, point, layer, 0 if layer == "identity" else trainer.current_epoch, history),
                       "steps": trainer.global_step}
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
    p.add_argument("--layers", nargs="+", default=["identity", "affine", "lowrank", "birkhoff"],
                   help="identity, affine, lowrank, lasso, birkhoff, softsort, or birkhoff_cv (alpha cross-validated)")
    p.add_argument("--cv-epochs", type=int, default=5)
    p.add_argument("--cv-val-split", type=float, default=0.2)
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
    def data(val_split: float) -> FashionMNISTDataModule:
        return FashionMNISTDataModule(root=args.data_root, batch_size=args.batch_size, eval_batch_size=1000,
                                      train_subset=args.train_subset, val_split=val_split, seed=args.seed)

    cv_data = data(args.cv_val_split) if "birkhoff_cv" in args.layers else None
    return stitch_sweep(args.endpoints, data(args.val_split), args.layers, args.points, args.epochs, args.out,
                        args.seed, cv_datamodule=cv_data, cv_epochs=args.cv_epochs, rank=args.rank, alpha=args.alpha,
                        warmup_epochs=args.warmup_epochs, bn_batches=args.bn_batches)


if __name__ == "__main__":
    main()
