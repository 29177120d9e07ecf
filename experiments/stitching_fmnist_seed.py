"""The modelsym seed's stitching protocol on two Fashion-MNIST mCNNs, one process per stitch (for one GPU).

1. Two full-width ``mcnn`` endpoints from seeds 0 and 1 with the seed's zoo optimiser (Adam 1e-3, weight decay 1e-4,
   StepLR every epochs/4 by 0.5, batch 32), ``--endpoint-epochs`` each (the seed: 50), trained side by side.
2. One ``StitchModule`` run per (point, layer), through :func:`~lmc_lightning.stitch_sweep.stitch_sweep`, with the
   seed's protocol: SGD without momentum, lr 1e-3, weight decay 1e-4 (0 on Birkhoff W), batch 32, 20 epochs
   (Birkhoff: 10 warm-up epochs with the scalars off, then 10 with them), alpha 0.1, the no-grad BN pass before
   every evaluation, endpoints evaluated under the same BN pass. The test set is evaluated after every epoch (as the
   seed does; ``best_val_accuracy`` is the seed's best-epoch figure, ``accuracy`` the final epoch's). Identity
   stitches are evaluated untrained. Runs go ``--jobs`` at a time, each a process on one CPU thread.
3. G_ReLU- vs orthogonal-Procrustes similarity of the endpoints per ReLU (``SimilarityModule``, 10k test images),
   run beside the stitches.
4. ``collect`` writes ``stitch_seed.csv`` (one row per stitch), ``stitch_epochs.csv`` (per epoch: accuracy, soft
   accuracy, rounding cost, W's distance from a permutation and mean row max), ``stitch_seed.png`` (penalty bars),
   ``birkhoff_epochs.png`` and ``results.json``.

Differences from the seed, by choice: the BN pass forwards ``--bn-batches`` training batches (default 200) instead
of a whole epoch; with BN momentum 0.1 the running statistics keep 0.9^200 < 1e-9 of their state before the pass, so
this changes only which batches are drawn. Mixed precision is bf16 (the seed: fp16 with a GradScaler). With
``--deadline`` (a Unix time) each stitch runs the whole epochs that fit before it (:class:`FitDeadline`; the Birkhoff
warm-up stays half of them while the scalars are off); the CSV's ``epochs``, ``steps`` and ``warmup`` say what ran.

    python experiments/stitching_fmnist_seed.py all --out runs/stitch_seed --jobs 12           # GPU
    python experiments/stitching_fmnist_seed.py all --out /tmp/s --width 0.0625 --subset 512 --epochs 2 \\
        --warmup 1 --endpoint-epochs 1 --bn-batches 2 --jobs 2                                 # CPU smoke run
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import lightning.pytorch as pl
import torch

POINTS = ["2", "5", "9", "13"]
LAYERS = ["identity", "affine", "lowrank", "birkhoff"]
EPOCH_COLUMNS = ("point", "layer", "epoch", "accuracy", "accuracy_soft", "rounding_cost", "perm_distance", "row_max",
                 "train_perm_distance", "train_row_max")


def _data(args: argparse.Namespace, test_as_val: bool = False, seed: int = 0):
    from lmc_lightning.data import FashionMNISTDataModule

    class TestAsValidation(FashionMNISTDataModule):
        """Validation on the test set after every epoch (the seed's per-epoch test evaluation)."""

        def val_dataloader(self):
            return self.test_dataloader()

    cls = TestAsValidation if test_as_val else FashionMNISTDataModule
    return cls(root=args.data, batch_size=32, eval_batch_size=1000, train_subset=args.subset,
               device_resident=torch.cuda.is_available(), seed=seed)


def _trainer_kwargs(args: argparse.Namespace) -> dict:
    gpu = torch.cuda.is_available()
    return {"accelerator": "gpu" if gpu else "cpu", "devices": 1, "precision": "bf16-mixed" if gpu else "32-true",
            "benchmark": gpu}


class FitDeadline(pl.Callback):
    """Fit a stitch's epochs into the time left: before each epoch, from the last epoch's duration (training plus
    evaluation), cap ``max_epochs`` at the whole epochs that end before ``deadline``; while the Birkhoff scalars are
    still off, keep the warm-up at half the epochs (at most ``warmup``). ``epochs`` and ``warmup`` hold what it kept.
    """

    def __init__(self, deadline: float, epochs: int, warmup: int) -> None:
        super().__init__()
        self.deadline, self.epochs, self.warmup, self.target = deadline, epochs, warmup, epochs
        self._last: float | None = None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Runs before ``StitchModule.on_train_epoch_start`` switches the scalars."""
        now, done = time.time(), trainer.current_epoch
        if self._last is not None and done > 0:
            fit = int((self.deadline - now) // (now - self._last))
            self.epochs = max(done + 1, min(self.target, done + fit))
            trainer.fit_loop.max_epochs = self.epochs
        self._last = now
        if getattr(pl_module, "kind", None) == "birkhoff" and done < pl_module.warmup_epochs:
            pl_module.warmup_epochs = max(done, min(self.warmup, self.epochs // 2))
        self.warmup = getattr(pl_module, "warmup_epochs", self.warmup)


def _endpoints(out: Path) -> list[str]:
    return [str(out / f"mcnn_{seed}.ckpt") for seed in (0, 1)]


def run_endpoint(args: argparse.Namespace) -> None:
    """Train one endpoint with the seed's zoo optimiser; write its checkpoint and test accuracy."""
    from lmc_lightning.checkpoint import save_net
    from lmc_lightning.modules import EndpointModule, OptimConfig

    pl.seed_everything(args.seed, verbose=False)
    zoo = OptimConfig(optimizer="adam", lr=1e-3, weight_decay=1e-4, scheduler="multistep",
                      milestones=[args.endpoint_epochs / 4 * k for k in (1, 2, 3)], gamma=0.5)
    model = EndpointModule(net="mcnn", net_kwargs={"width": args.width}, num_classes=10, input_shape=(1, 28, 28),
                           optim=zoo, seed=args.seed)
    trainer = pl.Trainer(max_epochs=args.endpoint_epochs, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(args.out),
                         **_trainer_kwargs(args))
    data = _data(args, seed=args.seed)  # each endpoint its own data order too
    trainer.fit(model, datamodule=data)
    path = _endpoints(args.out)[args.seed]
    save_net(path, model.net.state_dict(), {"name": "mcnn", "num_classes": 10, "in_channels": 1, "input_size": 28,
                                            "width": args.width})
    acc = float(trainer.test(model, datamodule=data, verbose=False)[0]["test/acc"])
    (args.out / f"endpoint_{args.seed}.json").write_text(json.dumps({"seed": args.seed, "test_acc": acc}))


def run_stitch(args: argparse.Namespace) -> None:
    """One (point, layer) stitch; its row (with per-epoch history) goes to ``runs/<point>_<layer>.json``."""
    from lmc_lightning.stitch_sweep import stitch_sweep

    kwargs, fit = _trainer_kwargs(args), None
    if args.deadline:  # whole epochs that end before the deadline less the final test; max_time as a backstop
        end = args.deadline - args.test_reserve
        fit = FitDeadline(end, args.epochs, args.warmup)
        kwargs.update(callbacks=[fit], max_time=timedelta(seconds=max(end - time.time(), 1)))
    folder = args.out / "runs" / f"{args.point}_{args.layer}"
    rows = stitch_sweep(_endpoints(args.out), _data(args, test_as_val=True), [args.layer], [args.point],
                        epochs=args.epochs, output_dir=folder, trainer_kwargs=kwargs, rank=1, alpha=args.alpha,
                        warmup_epochs=args.warmup, bn_batches=args.bn_batches)
    row = {**rows[0], "warmup": None if args.layer != "birkhoff" else fit.warmup if fit else args.warmup}
    (args.out / "runs" / f"{args.point}_{args.layer}.json").write_text(json.dumps(row, default=float))


def run_similarity(args: argparse.Namespace) -> None:
    """G_ReLU- and orthogonal-Procrustes similarity of the endpoints at each point (same-index pairs)."""
    from lmc_lightning.modules import SimilarityModule

    sim = SimilarityModule(endpoints=_endpoints(args.out), metrics=["grelu_procrustes", "orthogonal_procrustes"],
                           diagonal_only=True, num_samples=min(10_000, args.similarity_samples),
                           output_dir=str(args.out / "similarity"), input_shape=(1, 28, 28))
    kwargs = {**_trainer_kwargs(args), "precision": "32-true"}
    pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(args.out),
               **kwargs).test(sim, datamodule=_data(args), verbose=False)
    n = len(sim.point_names[0])
    values = {m: [float(v[i, i]) for i in range(n)] for m, v in sim.results.items()}
    (args.out / "similarity.json").write_text(json.dumps({"points": sim.point_names[0], **values}))


def _child(args: argparse.Namespace, command: str, *extra: str) -> list[str]:
    """Command line of a child process with this run's settings."""
    shared = ["--out", str(args.out), "--data", args.data, "--width", str(args.width), "--epochs", str(args.epochs),
              "--warmup", str(args.warmup), "--endpoint-epochs", str(args.endpoint_epochs), "--alpha",
              str(args.alpha), "--bn-batches", str(args.bn_batches), "--similarity-samples",
              str(args.similarity_samples), "--test-reserve", str(args.test_reserve)]
    if args.subset:
        shared += ["--subset", str(args.subset)]
    if args.deadline:
        shared += ["--deadline", str(args.deadline)]
    return [sys.executable, __file__, command, *shared, *extra]


def _run_children(commands: list[tuple[str, list[str]]], jobs: int, log_dir: Path, timeout: float | None) -> dict:
    """Run the commands ``jobs`` at a time (one CPU thread each); return exit codes by name."""
    log_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

    def one(item: tuple[str, list[str]]) -> tuple[str, int]:
        name, cmd = item
        start = time.time()
        with open(log_dir / f"{name}.log", "w") as log:
            try:
                code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout).returncode
            except subprocess.TimeoutExpired:
                code = -9
        print(f"  {name}: exit {code} after {time.time() - start:.0f} s", flush=True)
        return name, code

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return dict(pool.map(one, commands))


def run_all(args: argparse.Namespace) -> None:
    """Endpoints (two processes), then every stitch and the similarity (``--jobs`` processes), then collect."""
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    if not all(Path(p).exists() for p in _endpoints(args.out)):
        codes = _run_children([(f"endpoint_{s}", _child(args, "endpoint", "--seed", str(s))) for s in (0, 1)], 2,
                              args.out / "logs", None)
        if any(codes.values()):
            raise RuntimeError(f"endpoint training failed: {codes}; see {args.out / 'logs'}")
    print(f"endpoints ready after {time.time() - start:.0f} s", flush=True)
    # Birkhoff first (the slowest: two BN passes per evaluation), identity last (evaluation only)
    order = sorted(args.layers, key=lambda layer: ["birkhoff", "affine", "lowrank", "identity"].index(layer))
    commands = [(f"{p}_{layer}", _child(args, "stitch", "--point", p, "--layer", layer))
                for layer in order for p in args.points]
    commands.insert(len(args.points), ("similarity", _child(args, "similarity")))
    timeout = args.deadline - time.time() + 5 if args.deadline else None
    codes = _run_children(commands, args.jobs, args.out / "logs", timeout)
    (args.out / "exit_codes.json").write_text(json.dumps(codes))
    collect(args)
    print(f"all done after {time.time() - start:.0f} s", flush=True)


def collect(args: argparse.Namespace) -> None:
    """Merge the per-run JSON files into the CSVs, figures and ``results.json``."""
    from lmc_lightning.io import atomic_write_text
    from lmc_lightning.plots import plot_bars, save_figure
    from lmc_lightning.stitch_sweep import COLUMNS

    rows = [json.loads(p.read_text()) for p in sorted((args.out / "runs").glob("*.json"))]
    rows.sort(key=lambda r: (POINTS.index(r["point"]) if r["point"] in POINTS else 99, LAYERS.index(r["layer"])))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=[*COLUMNS, "steps", "warmup"], extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(args.out / "stitch_seed.csv", buf.getvalue())
    epochs = []
    for r in rows:
        train = {h["epoch"]: h for h in r.get("perm_history", [])}
        for h in r.get("history", []):
            t = train.get(h["epoch"], {})
            epochs.append({"point": r["point"], "layer": r["layer"], **h, "train_perm_distance": t.get("distance"),
                           "train_row_max": t.get("row_max")})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=EPOCH_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(epochs)
    atomic_write_text(args.out / "stitch_epochs.csv", buf.getvalue())
    points = [p for p in POINTS if any(r["point"] == p for r in rows)]
    values = {layer: [next((100 * r["penalty"] for r in rows if r["point"] == p and r["layer"] == layer),
                           float("nan")) for p in points] for layer in LAYERS}
    if rows:
        save_figure(plot_bars(values, points, "stitching penalty (points of accuracy)",
                              "mCNN, Fashion-MNIST: the seed's protocol"), args.out / "stitch_seed.png")
        _plot_birkhoff(epochs, args.out / "birkhoff_epochs.png")
    results = {"endpoints": [json.loads(p.read_text()) for p in sorted(args.out.glob("endpoint_*.json"))],
               "settings": {k: v for k, v in vars(args).items() if k not in ("func", "out")},
               "stitch": [{k: r.get(k) for k in (*COLUMNS, "steps", "warmup")} for r in rows]}
    sim = args.out / "similarity.json"
    if sim.exists():
        results["similarity"] = json.loads(sim.read_text())
    atomic_write_text(args.out / "results.json", json.dumps(results, indent=1, default=float))
    print((args.out / "stitch_seed.csv").read_text(), flush=True)


def _plot_birkhoff(epochs: list[dict], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from lmc_lightning.plots import save_figure

    fig = Figure(figsize=(10, 3.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    for point in POINTS:
        hist = [e for e in epochs if e["layer"] == "birkhoff" and e["point"] == point]
        if not hist:
            continue
        x = [e["epoch"] + 1 for e in hist]
        axes[0].plot(x, [e["perm_distance"] for e in hist], marker=".", label=f"point {point}")
        axes[1].plot(x, [e["row_max"] for e in hist], marker=".")
        axes[2].plot(x, [100 * e["accuracy"] for e in hist], marker=".")
        axes[2].plot(x, [100 * e["accuracy_soft"] for e in hist], ls="--", color=axes[2].lines[-1].get_color())
    for ax, label in zip(axes, ("||W - P||_F / sqrt(2C)", "mean row max of W", "accuracy % (hard P; soft dashed)"),
                         strict=True):
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
    axes[0].legend(fontsize=8)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("command", choices=["all", "endpoint", "stitch", "similarity", "collect"])
    p.add_argument("--out", type=Path, default=Path("runs/stitch_seed"))
    p.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--subset", type=int, default=None, help="training images (default: all 60k)")
    p.add_argument("--endpoint-epochs", type=int, default=4)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--alpha", type=float, default=0.1)
    p.add_argument("--bn-batches", type=int, default=200)
    p.add_argument("--similarity-samples", type=int, default=10_000)
    p.add_argument("--points", nargs="+", default=POINTS)
    p.add_argument("--layers", nargs="+", default=LAYERS, choices=LAYERS)
    p.add_argument("--jobs", type=int, default=12)
    p.add_argument("--deadline", type=float, default=None, help="Unix time by which every stitch has been tested")
    p.add_argument("--test-reserve", type=float, default=25.0, help="seconds kept for a stitch's final test")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--point", default=None)
    p.add_argument("--layer", default=None, choices=LAYERS)
    args = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 1)))
    {"all": run_all, "endpoint": run_endpoint, "stitch": run_stitch, "similarity": run_similarity,
     "collect": collect}[args.command](args)


if __name__ == "__main__":
    main()
