"""Resume equals an uninterrupted run, for every training module: fit to N epochs, resume to M == fit to M."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from lmc_lightning.checkpoint import save_net
from lmc_lightning.cli import main
from lmc_lightning.data import FashionMNISTDataModule
from lmc_lightning.modules import CurveModule, EndpointModule, LMCModule, OptimConfig, PairModule, SurfaceModule
from lmc_lightning.nets import get_net

NET = {"net": "mlp", "net_kwargs": {"depth": 1, "width": 16}}
OPTIM = {"lr": 0.05, "scheduler": "cosine", "horizon_epochs": 2}  # stopped after 1 of 2 epochs, then resumed


@pytest.fixture(scope="module")
def corners(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Four tiny MLP checkpoints (different random inits) as path endpoints."""
    folder = tmp_path_factory.mktemp("corners")
    spec = {"name": "mlp", "num_classes": 10, "in_channels": 1, "input_size": 28, "depth": 1, "width": 16}
    paths = []
    for seed in range(4):
        torch.manual_seed(seed)
        net = get_net(**{k: v for k, v in spec.items() if k != "name"}, name="mlp")
        paths.append(str(save_net(folder / f"m{seed}.ckpt", net.state_dict(), spec)))
    return paths


FACTORIES: dict[str, Callable[[list[str]], LMCModule]] = {
    "EndpointModule": lambda _: EndpointModule(**NET, optim=OptimConfig(**OPTIM)),
    "PairModule": lambda _: PairModule(**NET, spawn_step=2, optim=OptimConfig(**OPTIM)),
    "CurveModule": lambda c: CurveModule(endpoints=c[:2], num_samples=2, optim=OptimConfig(**OPTIM)),
    "SurfaceModule": lambda c: SurfaceModule(endpoints=c, num_bends=1, num_samples=2, init_epochs=1,
                                             optim=OptimConfig(**OPTIM)),
}


def _fit(factory, corners, root: Path, folder: Path, max_epochs: int, ckpt: Path | None = None) -> LMCModule:
    pl.seed_everything(0)
    model = factory(corners)
    trainer = pl.Trainer(max_epochs=max_epochs, limit_train_batches=3, limit_val_batches=0, accelerator="cpu",
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=folder)
    trainer.fit(model, datamodule=FashionMNISTDataModule(root=str(root), batch_size=32), ckpt_path=ckpt)
    if ckpt is None:
        trainer.save_checkpoint(folder / "stop.ckpt")
    return model


@pytest.mark.parametrize("name", list(FACTORIES))
def test_fit_then_resume_equals_one_fit(name: str, corners: list[str], fake_fmnist_root: Path,
                                        tmp_path: Path) -> None:
    factory = FACTORIES[name]
    whole = _fit(factory, corners, fake_fmnist_root, tmp_path / "whole", max_epochs=2)
    first = _fit(factory, corners, fake_fmnist_root, tmp_path / "part", max_epochs=1)
    resumed = _fit(factory, corners, fake_fmnist_root, tmp_path / "resumed", max_epochs=2,
                   ckpt=tmp_path / "part" / "stop.ckpt")
    want, got, moved = whole.state_dict(), resumed.state_dict(), first.state_dict()
    assert any(not torch.equal(want[k], moved[k]) for k in want), "the second epoch changed nothing"
    for key in want:
        assert torch.equal(got[key], want[key]), f"{name}: {key} differs by {(got[key] - want[key]).abs().max()}"


def test_lmc_fit_resumes_in_the_same_run_folder(fake_fmnist_root: Path, tmp_path: Path) -> None:
    args = ["fit", "--model", "EndpointModule", "--model.net", "mlp", "--model.net_kwargs", '{"depth": 1, "width": 8}',
            "--model.optim.horizon_epochs", "2", "--data", "FashionMNISTDataModule", "--data.root",
            str(fake_fmnist_root), "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "0",
            "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false",
            "--trainer.accelerator", "cpu"]
    main([*args, "--trainer.max_epochs", "1"])
    run_dir = tmp_path / "EndpointModule" / "version_0"
    (ckpt,) = (run_dir / "checkpoints").glob("*.ckpt")
    cli = main([*args, "--trainer.max_epochs", "2", "--ckpt_path", str(ckpt)])
    assert cli.trainer.log_dir == str(run_dir) and not (tmp_path / "EndpointModule" / "version_1").exists()
    assert (run_dir / "metrics_before_step2.csv").is_file() and (run_dir / "metrics.csv").is_file()
    assert cli.trainer.global_step == 4
