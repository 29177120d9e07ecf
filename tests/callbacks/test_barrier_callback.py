"""InterpolationBarrier: barriers logged during fit, equal to a direct evaluation; state round trip and resume."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from bn_helpers import TinyBNModule, tiny_bn_net
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from lmc_lightning.callbacks import InterpolationBarrier
from lmc_lightning.data import FashionMNISTDataModule
from lmc_lightning.modules import EndpointModule, OptimConfig
from lmc_lightning.weights.evaluate import evaluate_path, seeded_subset
from lmc_lightning.weights.paths import Linear

DDP = "ddp_spawn" if torch.cuda.is_initialized() else "ddp_fork"  # fork is fast but impossible after CUDA init
NET = {"net": "mlp", "net_kwargs": {"depth": 1, "width": 16}, "seed": 0}


def _data(root: Path) -> FashionMNISTDataModule:
    return FashionMNISTDataModule(root=str(root), batch_size=32)


def _trainer(tmp_path: Path, callbacks: list, **kwargs) -> pl.Trainer:
    kwargs.setdefault("logger", False)
    kwargs.setdefault("enable_checkpointing", False)
    kwargs.setdefault("accelerator", "cpu")
    return pl.Trainer(limit_train_batches=4, limit_val_batches=0, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=tmp_path, callbacks=callbacks, **kwargs)


def test_barrier_to_init_is_logged_and_matches_direct_evaluation(fake_fmnist_root: Path, tmp_path: Path) -> None:
    model = EndpointModule(**NET, optim=OptimConfig(lr=0.1))
    init = {k: v.clone() for k, v in model.net.state_dict().items()}
    by_epoch = InterpolationBarrier(reference="init", every_n_epochs=1, every_fraction=0.5, num_points=5)
    logger = CSVLogger(tmp_path, name="", version="run")
    _trainer(tmp_path, [by_epoch], max_epochs=2, logger=logger).fit(model, datamodule=_data(fake_fmnist_root))

    # 8 steps: the fraction targets (4, 8) coincide with the epoch ends and each step is measured once.
    assert [h["step"] for h in by_epoch.history] == [4, 8]
    torch.testing.assert_close(by_epoch.init_weights, init, rtol=0, atol=0)

    # The last measurement equals evaluate_path on the final and initial weights (no val split: the test split).
    dm = _data(fake_fmnist_root)
    dm.setup("test")
    direct = evaluate_path(Linear(model.net.state_dict(), init), model.net, dm.split_tensors("test"), num_points=5,
                           device="cpu")
    assert by_epoch.history[-1]["barrier/loss"] == pytest.approx(direct.loss_barrier, abs=1e-6)
    assert by_epoch.history[-1]["barrier/accuracy"] == pytest.approx(direct.accuracy_barrier, abs=1e-9)
    assert direct.loss[0] < direct.loss[-1] - 0.05  # t=0 is the trained net, t=1 the (worse) initialisation

    rows = [r for r in csv.DictReader((tmp_path / "run" / "metrics.csv").open()) if r.get("barrier/loss")]
    assert [int(r["step"]) for r in rows] == [4, 8]
    assert float(rows[-1]["barrier/loss"]) == pytest.approx(direct.loss_barrier, abs=1e-6)


def test_checkpoint_reference_equals_init_reference(fake_fmnist_root: Path, tmp_path: Path) -> None:
    model = EndpointModule(**NET)
    ckpt = tmp_path / "init.pt"
    torch.save(model.net.state_dict(), ckpt)
    by_init = InterpolationBarrier(reference="init", every_n_epochs=1, log_prefix="b_init")
    by_file = InterpolationBarrier(reference=str(ckpt), every_n_epochs=1, log_prefix="b_file")
    trainer = _trainer(tmp_path, [by_init, by_file], max_epochs=1)
    trainer.fit(model, datamodule=_data(fake_fmnist_root))
    assert by_init.history[0]["b_init/loss"] == pytest.approx(by_file.history[0]["b_file/loss"], abs=1e-7)
    assert float(trainer.callback_metrics["b_file/loss"]) == pytest.approx(by_file.history[0]["b_file/loss"])


def test_state_round_trip_and_resume(fake_fmnist_root: Path, tmp_path: Path) -> None:
    model = EndpointModule(**NET)
    init = {k: v.clone() for k, v in model.net.state_dict().items()}
    first = InterpolationBarrier(reference="init", every_n_epochs=1, num_points=3)
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    _trainer(tmp_path, [first, ckpt_cb], max_epochs=1, enable_checkpointing=True).fit(
        model, datamodule=_data(fake_fmnist_root))

    state = first.state_dict()
    torch.save(state, tmp_path / "state.pt")
    copy = InterpolationBarrier(reference="init", every_n_epochs=1, num_points=3)
    copy.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert copy.last_step == 4 and copy.history == first.history
    torch.testing.assert_close(copy.init_weights, init, rtol=0, atol=0)

    # Resume with a fresh callback and module: the reference stays the original init, measuring continues.
    resumed = InterpolationBarrier(reference="init", every_n_epochs=1, num_points=3)
    fresh = EndpointModule(**{**NET, "seed": 5})
    _trainer(tmp_path, [resumed], max_epochs=2).fit(fresh, datamodule=_data(fake_fmnist_root),
                                                    ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    torch.testing.assert_close(resumed.init_weights, init, rtol=0, atol=0)
    assert [h["step"] for h in resumed.history] == [4, 8]
    assert resumed.history[0] == first.history[0]


def test_bad_arguments_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="reference must be"):
        InterpolationBarrier(reference=str(tmp_path / "missing.ckpt"))
    with pytest.raises(ValueError, match="Nothing would be measured"):
        InterpolationBarrier(every_n_epochs=None)
    with pytest.raises(ValueError, match="every_fraction"):
        InterpolationBarrier(every_fraction=1.5)
    with pytest.raises(ValueError, match="bn must be"):
        InterpolationBarrier(bn="yes")
    with pytest.raises(ValueError, match="num_points"):
        InterpolationBarrier(num_points=1)


def test_twin_reference_needs_a_pair_module(fake_fmnist_root: Path, tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, [InterpolationBarrier(reference="twin")], max_epochs=1)
    with pytest.raises(ValueError, match="net_b.*PairModule"):
        trainer.fit(EndpointModule(**NET), datamodule=_data(fake_fmnist_root))


@pytest.mark.cpu_ddp
def test_ddp_barrier_with_bn_reset_equals_single_process(fake_fmnist_root: Path, tmp_path: Path,
                                                         train_classifier) -> None:
    """2 CPU processes: each evaluates half of the data, BN statistics per point reset; same as one process."""
    dm = _data(fake_fmnist_root)
    dm.setup("fit")
    x, y = dm.split_tensors("train")
    trained = [train_classifier(tiny_bn_net(seed), x, y, epochs=3, lr=0.05, batch_size=32, seed=seed).state_dict()
               for seed in (0, 1)]
    ref = tmp_path / "other.pt"
    torch.save(trained[1], ref)
    model = TinyBNModule(lr=0.0)  # lr 0: the net keeps the weights loaded here, so the expected path is known
    model.net.load_state_dict(trained[0])
    callback = InterpolationBarrier(reference=str(ref), num_points=5, bn="reset", bn_batches=2, bn_batch_size=32)
    trainer = _trainer(tmp_path, [callback], max_epochs=1, strategy=DDP, devices=2)
    trainer.fit(model, datamodule=_data(fake_fmnist_root))

    direct = evaluate_path(Linear(trained[0], trained[1]), tiny_bn_net(0), dm.split_tensors("test"), num_points=5,
                           bn="reset", train_data=seeded_subset((x, y), 64), bn_batches=2, bn_batch_size=32,
                           device="cpu")
    assert direct.loss_barrier > 0.05  # two independently trained nets: the line between them rises
    for name in ("loss", "accuracy", "loss_mean", "accuracy_mean"):
        expected = getattr(direct, f"{name.split('_')[0]}_barrier" + ("_mean" if "mean" in name else ""))
        assert float(trainer.callback_metrics[f"barrier/{name}"]) == pytest.approx(expected, abs=1e-5)
