"""What the module CLI tests share: tiny-run arguments and MLP endpoints trained through `lmc fit`."""

from __future__ import annotations

from pathlib import Path

import torch

from lmc_lightning.cli import main
from lmc_lightning.data import FashionMNISTDataModule

COMMON = ["--data", "FashionMNISTDataModule", "--data.batch_size", "64", "--trainer.enable_progress_bar", "false",
          "--trainer.enable_model_summary", "false", "--trainer.accelerator", "cpu"]


def logger_args(out: Path) -> list[str]:
    """Log (CSV) and write results under ``out``."""
    return ["--trainer.default_root_dir", str(out), "--trainer.logger.class_path", "CSVLogger",
            "--trainer.logger.init_args.save_dir", str(out)]


def fit_mlps(data_root: Path, out: Path, net_kwargs: str, seeds: tuple[int, ...] = (0, 1, 2)) -> list[Path]:
    """One MLP per seed (init and data order), each trained for 3 steps through `lmc fit`; their checkpoints."""
    paths = []
    for seed in seeds:
        main(["fit", "--model", "EndpointModule", "--model.net", "mlp", "--model.net_kwargs", net_kwargs,
              "--model.seed", str(seed), "--data.seed", str(seed), "--data.root", str(data_root),
              "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3", *COMMON,
              *logger_args(out / f"seed{seed}")])
        paths.append(sorted((out / f"seed{seed}").rglob("*.ckpt"))[0])
    return paths


def split_tensors(root: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The fake Fashion-MNIST ``split`` (``train``, ``val`` or ``test``) under ``root`` as tensors."""
    dm = FashionMNISTDataModule(root=str(root))
    dm.setup("test" if split == "test" else "fit")
    return dm.split_tensors(split)
