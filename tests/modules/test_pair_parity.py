"""Pair-run parity with the rethink-re-basin seed's run_ex.py: train and test barriers, top-5, per-measurement curve
files, distances, and init checkpoints for both nets."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.func import functional_call

from lmc_lightning.callbacks import InterpolationBarrier
from lmc_lightning.checkpoint import save_net
from lmc_lightning.data import FashionMNISTDataModule
from lmc_lightning.modules import OptimConfig, PairModule

NET = {"net": "mlp", "net_kwargs": {"depth": 1, "width": 16}, "optim": OptimConfig(lr=0.1, scheduler="constant")}
SPEC = {"name": "mlp", "num_classes": 10, "in_channels": 1, "input_size": 28, "depth": 1, "width": 16}


def _fit(root: Path, tmp_path: Path, model: PairModule, callbacks: list) -> pl.Trainer:
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=0, accelerator="cpu",
                         logger=pl.loggers.CSVLogger(tmp_path), enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path, callbacks=callbacks)
    trainer.fit(model, datamodule=FashionMNISTDataModule(root=str(root), batch_size=32))
    return trainer


def test_train_and_test_barriers_top5_curves_and_distances(fake_fmnist_root: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = PairModule(**NET, seed_a=0, seed_b=1)
    start = {s: {k: v.clone() for k, v in getattr(model, f"net_{s}").named_parameters()} for s in "ab"}
    barrier = InterpolationBarrier(reference="twin", every_n_epochs=1, at_start=True, num_points=3,
                                   split=["train", "test"], max_eval_samples=64)
    trainer = _fit(fake_fmnist_root, tmp_path, model, [barrier])
    last = barrier.history[-1]
    for split in ("train", "test"):
        for name in ("loss", "accuracy", "top5_accuracy", "top5_accuracy_mean"):
            assert f"barrier/{split}/{name}" in last
    # per-measurement curves, in memory and on disk: at start and after the epoch, for both splits
    assert [(c["step"], c["split"]) for c in barrier.curves] == [(0, "train"), (0, "test"), (3, "train"),
                                                                 (3, "test")]
    files = sorted((Path(trainer.log_dir) / "barrier_curves").glob("*.csv"))
    assert [f.name for f in files] == [f"barrier_step{s:08d}_{sp}.csv" for s in (0, 3) for sp in ("test", "train")]
    rows = list(csv.DictReader(open(files[-1])))
    assert [float(r["t"]) for r in rows] == [0.0, 0.5, 1.0]
    # top-5 at t = 0 equals a direct computation on net_a
    dm = FashionMNISTDataModule(root=str(fake_fmnist_root))
    dm.setup("fit")
    x, y = barrier._data["train"]
    with torch.no_grad():
        logits = model.net_a.eval()(x)
    top5 = (logits.topk(5, 1).indices == y[:, None]).any(1).double().mean().item()
    assert float(rows[0]["accuracy_top5"]) == pytest.approx(top5)
    assert all(float(r["accuracy_top5"]) >= float(r["accuracy"]) for r in rows)
    # distances: logged once per epoch, equal to the L2 norms over parameters
    d = model.distances()
    pa, pb = dict(model.net_a.named_parameters()), dict(model.net_b.named_parameters())
    direct = torch.sqrt(sum(((pa[k] - pb[k]) ** 2).sum() for k in pa)).item()
    assert d["distance/a_b"] == pytest.approx(direct, rel=1e-6)
    assert d["distance/a_init"] == pytest.approx(
        torch.sqrt(sum(((pa[k] - start["a"][k]) ** 2).sum() for k in pa)).item(), rel=1e-6)
    assert 0 < d["distance/b_init"] < d["distance/a_b"]
    metrics = list(csv.DictReader(open(Path(trainer.log_dir) / "metrics.csv")))
    assert any(r.get("distance/a_b") for r in metrics)


def test_pair_starts_from_init_checkpoints(fake_fmnist_root: Path, tmp_path: Path) -> None:
    torch.manual_seed(5)
    src = [PairModule(**NET, seed_a=10 + i, seed_b=20 + i).net_a for i in range(2)]
    files = [save_net(tmp_path / f"init{i}.ckpt", net.state_dict(), SPEC) for i, net in enumerate(src)]
    model = PairModule(**NET, init=[str(f) for f in files])
    model.setup("fit")
    x = torch.randn(4, 1, 28, 28)
    for side, net in zip("ab", src, strict=True):
        torch.testing.assert_close(getattr(model, f"net_{side}")(x), functional_call(net, net.state_dict(), (x,)))
    both = PairModule(**NET, init=[str(files[0])])
    both.setup("fit")
    torch.testing.assert_close(both.net_a(x), both.net_b(x))
    with pytest.raises(ValueError, match="one checkpoint"):
        PairModule(**NET, init=["a", "b", "c"])
    wrong = save_net(tmp_path / "wrong.ckpt", PairModule(net="mlp", net_kwargs={"depth": 1, "width": 8}).net_a
                     .state_dict(), {**SPEC, "width": 8})
    with pytest.raises(ValueError, match="shape"):
        PairModule(**NET, init=[str(wrong)]).setup("fit")
