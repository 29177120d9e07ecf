"""Chunks of training batches (datamodule ``steps_per_batch = S``): the same training as plain batches, bit for bit."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lmc_lightning.callbacks import InterpolationBarrier
from lmc_lightning.data import FashionMNISTDataModule
from lmc_lightning.data.chunks import StepChunk
from lmc_lightning.modules import EndpointModule, OptimConfig, PairModule

pytestmark = pytest.mark.usefixtures("one_thread")

NET = {"net": "mlp", "net_kwargs": {"depth": 1, "width": 16}}
OPTIM = OptimConfig(lr=0.05, momentum=0.9, weight_decay=5e-4, scheduler="cosine")


def _data(root: Path, chunk: int, augment: bool = False) -> FashionMNISTDataModule:
    # 200 of the 256 fake images, batch 16: 13 batches an epoch, the last one of 8 images, the last chunk short.
    return FashionMNISTDataModule(root=str(root), batch_size=16, train_subset=200, device_resident=True,
                                  steps_per_batch=chunk, augment=augment, seed=3)


def _fit(root: Path, tmp: Path, chunk: int, epochs: int = 2, num_models: int = 1, augment: bool = False,
         ckpt_path: str | None = None, callbacks: list | None = None, logger: bool = False,
         optim: OptimConfig = OPTIM, **trainer_args) -> tuple[EndpointModule, pl.Trainer]:
    pl.seed_everything(0, verbose=False)
    model = EndpointModule(**NET, optim=optim, seed=1, num_models=num_models)
    trainer = pl.Trainer(max_epochs=epochs, limit_val_batches=0, accelerator="cpu", enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=any(isinstance(c, ModelCheckpoint)
                                                                              for c in callbacks or []),
                         logger=pl.loggers.CSVLogger(tmp) if logger else False, callbacks=callbacks or [],
                         default_root_dir=tmp, **trainer_args)
    trainer.fit(model, datamodule=_data(root, chunk, augment), ckpt_path=ckpt_path)
    return model, trainer


def _same(a: pl.LightningModule, b: pl.LightningModule) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize(("num_models", "augment", "precision"),
                         [(1, False, "32-true"), (1, True, "32-true"), (3, False, "32-true"), (1, False, "64-true")])
def test_chunks_train_exactly_as_plain_batches(num_models: int, augment: bool, precision: str,
                                               fake_fmnist_root: Path, tmp_path: Path) -> None:
    """Same weights bit for bit, same optimiser steps and schedule, same epoch metrics; Lightning sees chunks
    (64-true: the precision plugin's input cast rebuilds the chunk, which stays a chunk)."""
    plain, t1 = _fit(fake_fmnist_root, tmp_path / "a", 1, num_models=num_models, augment=augment,
                     precision=precision)
    chunked, t4 = _fit(fake_fmnist_root, tmp_path / "b", 4, num_models=num_models, augment=augment,
                       precision=precision)
    assert t1.global_step == t4.global_step == 26
    assert (t1.num_training_batches, t4.num_training_batches) == (13, 4)
    assert t4.lr_scheduler_configs[0].scheduler.last_epoch == 26
    assert _same(plain, chunked)
    assert t1.callback_metrics.keys() == t4.callback_metrics.keys()
    for key, value in t1.callback_metrics.items():
        assert torch.equal(value, t4.callback_metrics[key]), key


def test_chunks_resume_and_max_steps(fake_fmnist_root: Path, tmp_path: Path) -> None:
    """A chunked run stopped after epoch 1 and resumed equals one run; max_steps stops inside a chunk exactly."""
    optim = OptimConfig(lr=0.05, scheduler="cosine", horizon_epochs=3)  # the stopped run keeps the long schedule
    whole, _ = _fit(fake_fmnist_root, tmp_path / "whole", 4, epochs=3, optim=optim)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    _fit(fake_fmnist_root, tmp_path / "part", 4, epochs=1, callbacks=[ckpt], optim=optim)
    resumed, trainer = _fit(fake_fmnist_root, tmp_path / "resumed", 4, epochs=3, optim=optim,
                            ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert trainer.global_step == 39 and _same(whole, resumed)

    plain, t1 = _fit(fake_fmnist_root, tmp_path / "p", 1, max_steps=6)
    chunked, t4 = _fit(fake_fmnist_root, tmp_path / "c", 4, max_steps=6)
    assert t1.global_step == t4.global_step == 6 and _same(plain, chunked)


def test_chunks_log_the_same_metrics(fake_fmnist_root: Path, tmp_path: Path) -> None:
    """The CSV logger gets the same metric names; epoch values are equal, step losses are real step losses."""
    _, t1 = _fit(fake_fmnist_root, tmp_path / "a", 1, logger=True, log_every_n_steps=1)
    _, t4 = _fit(fake_fmnist_root, tmp_path / "b", 4, logger=True, log_every_n_steps=1)
    a, b = (_columns(Path(t.logger.log_dir) / "metrics.csv") for t in (t1, t4))
    assert a.keys() == b.keys()
    for col in ("train/loss_epoch", "train/acc"):
        assert len(a[col]) == 2 and a[col] == b[col]
    steps = a["train/loss_step"]
    assert len(steps) == 26 and len(b["train/loss_step"]) == 8  # one per chunk
    # The chunk's last step's loss: steps 4, 8, 12, 13 of each epoch (1-based).
    assert b["train/loss_step"] == [steps[i - 1] for i in (4, 8, 12, 13, 17, 21, 25, 26)]


def _columns(path: Path) -> dict[str, list[str]]:
    """The non-empty values of each column of a CSV logger's metrics file."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return {key: [row[key] for row in rows if row[key] != ""] for key in rows[0]}


def test_barrier_every_fraction_with_chunks(fake_fmnist_root: Path, tmp_path: Path) -> None:
    """every_fraction targets are optimiser steps; with chunks each is measured once, after its chunk."""
    barriers = [InterpolationBarrier(every_fraction=0.25, num_points=3, max_eval_samples=32) for _ in range(2)]
    _fit(fake_fmnist_root, tmp_path / "a", 1, callbacks=[barriers[0]])
    _fit(fake_fmnist_root, tmp_path / "b", 4, callbacks=[barriers[1]])
    plain, chunked = ([h["step"] for h in b.history] for b in barriers)
    assert plain == [6, 13, 20, 26]  # round(k * 0.25 * 26)
    assert chunked == [8, 13, 21, 26]  # chunk ends at steps 4, 8, 12, 13, 17, 21, 25, 26


def test_chunk_settings_are_checked(fake_fmnist_root: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs device_resident"):
        FashionMNISTDataModule(root=str(fake_fmnist_root), steps_per_batch=4)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match="PairModule takes one batch per training step"):
        trainer.fit(PairModule(**NET), datamodule=_data(fake_fmnist_root, 4))
    with pytest.raises(ValueError, match="needs the module's own update"):
        _fit(fake_fmnist_root, tmp_path / "clip", 4, gradient_clip_val=1.0)
    data = _data(fake_fmnist_root, 5)
    data.setup("fit")
    batches = list(data.train_dataloader())
    assert len(batches) == 3 and all(type(b) is StepChunk for b in batches)
    assert [len(b) for b in batches] == [5, 5, 3] and len(batches[-1][-1][1]) == 8


def test_cli_steps_per_batch(fake_fmnist_root: Path, tmp_path: Path, monkeypatch) -> None:
    """``lmc fit --data.steps_per_batch 2``: 3 chunks of 2 steps; fast_dev_run still makes one step."""
    from lmc_lightning.cli import main

    monkeypatch.chdir(Path(__file__).parents[2])
    args = ["--config", "configs/endpoint/fmnist_mlp.yaml", "--data.root", str(fake_fmnist_root),
            "--data.batch_size", "16", "--data.val_split", "64", "--data.device_resident", "true",
            "--data.steps_per_batch", "2",
            "--model.net_kwargs", '{"depth": 1, "width": 16}', "--trainer.max_epochs", "1",
            "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "0",
            "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false"]
    cli = main(["fit", *args])
    assert cli.trainer.global_step == 6
    cli = main(["fit", *args, "--trainer.fast_dev_run", "true"])
    assert cli.trainer.global_step == 1
