"""The shipped DDP configs, run as a user runs them: the `lmc` script, two processes (gloo on the CPU)."""

from __future__ import annotations

import csv
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lmc_lightning import load_net

ROOT = Path(__file__).parents[1]


def _lmc() -> list[str]:
    """The console script when installed, else the module (same entry point)."""
    script = shutil.which("lmc")
    return [script] if script else [sys.executable, "-m", "lmc_lightning"]


@pytest.mark.cpu_ddp
def test_pair_barrier_config_runs_under_two_process_ddp(fake_fmnist_root: Path, tmp_path: Path) -> None:
    """`configs/ddp/fmnist_pair_barrier.yaml` on 2 CPU processes: exit 0, finite barriers logged, checkpoint loads."""
    args = [*_lmc(), "fit", "--config", str(ROOT / "configs/ddp/fmnist_pair_barrier.yaml"),
            "--trainer.accelerator", "cpu", "--trainer.precision", "32-true", "--trainer.max_epochs", "1",
            "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--model.net_kwargs", "{width: 0.125}", "--data.root", str(fake_fmnist_root), "--data.val_split", "32",
            "--data.batch_size", "16"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (metrics,) = (tmp_path / "runs/ddp/PairModule").rglob("metrics.csv")
    rows = list(csv.DictReader(metrics.open()))
    barrier = [float(r[k]) for r in rows for k in r if k.startswith("barrier/") and r[k]]
    assert barrier and all(math.isfinite(v) for v in barrier), rows
    (ckpt,) = (tmp_path / "runs/ddp/PairModule").rglob("last.ckpt")
    net_a, net_b = load_net(ckpt, prefix="net_a"), load_net(ckpt, prefix="net_b")
    pairs = zip(net_a.state_dict().values(), net_b.state_dict().values(), strict=True)
    diff = max((a - b).abs().max().item() for a, b in pairs if a.is_floating_point())
    assert diff > 1e-4  # two nets from different seeds, both saved by rank zero
