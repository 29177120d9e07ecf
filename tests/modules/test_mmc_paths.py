"""MMC paths (seed 000): QMC's random start and step against a direct computation; per-set path evaluation through
InterpolationModule equals separate single-set runs; the CLI fine-tuning path with the shipped config (every shipped
config's --print_config is tested in tests/test_readme.py)."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

import lmc_lightning.modules.curve as curve_module
from lmc_lightning import load_net
from lmc_lightning.checkpoint import save_net
from lmc_lightning.cli import main
from lmc_lightning.data import CueDataModule
from lmc_lightning.data.cue import EVAL_SETS
from lmc_lightning.modules import CurveModule, InterpolationModule, OptimConfig
from lmc_lightning.nets import get_net
from lmc_lightning.weights.evaluate import evaluate_path
from lmc_lightning.weights.paths import Linear

pytestmark = pytest.mark.usefixtures("one_thread")
SPEC = {"name": "mlp", "num_classes": 10, "in_channels": 1, "input_size": 28, "depth": 1, "width": 16}
CONFIGS = Path(__file__).parents[2] / "configs" / "mmc"


def _net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    spec = dict(SPEC)
    return get_net(spec.pop("name"), **spec)


@pytest.fixture(scope="module")
def ends(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("mmc_ends")
    return [save_net(folder / f"e{s}.ckpt", _net(s).state_dict(), SPEC) for s in (0, 1)]


def _data(root: Path, **kwargs) -> CueDataModule:
    return CueDataModule(base_args={"root": str(root), "batch_size": 32}, **kwargs)


def test_qmc_starts_from_a_random_net_and_takes_mmcs_step(ends, fake_fmnist_root, tmp_path, monkeypatch):
    t, lr, wd = 0.3, 0.1, 1e-4
    monkeypatch.setattr(curve_module, "sample_uniform", lambda num, dim=1: torch.full((num, dim), t,
                                                                                     dtype=torch.float64))
    model = CurveModule(endpoints=[str(p) for p in ends], objective="qmc",
                        optim=OptimConfig(lr=lr, momentum=0.9, weight_decay=wd, scheduler="constant"))
    torch.manual_seed(5)
    model.setup("fit")
    torch.manual_seed(5)  # the path module builds its template net without drawing from the run's generator
    fresh = get_net(**{k: v for k, v in SPEC.items() if k != "name"}, name="mlp").state_dict()
    control = model.path.control_points("hidden.0.weight")[1].detach().clone()
    torch.testing.assert_close(control, fresh["hidden.0.weight"])  # m starts as a fresh random net

    seen = {}

    class Capture(Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
            seen["batch"] = [b.clone() for b in batch]

    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", limit_val_batches=0, callbacks=[Capture()],
                         default_root_dir=tmp_path)
    start = {k: model.path.control_points(k)[1].detach().clone() for k in model.path.float_keys}
    trainer.fit(model, datamodule=_data(fake_fmnist_root, cue_proportion=1.0))
    # MMC: g = dL/dtheta(t) (unscaled), momentum buffer g + wd m on the first step, m -= lr 2t(1-t) buffer
    x, y = seen["batch"]
    direct = _net(0)
    theta = {k: (1 - t) ** 2 * model.path.endpoint(0)[k] + 2 * t * (1 - t) * start[k] + t**2 * model.path.endpoint(1)[k]
             for k in start}
    direct.load_state_dict(theta)
    F.cross_entropy(direct.train()(x), y).backward()
    for k, p in direct.named_parameters():
        expected = start[k] - lr * 2 * t * (1 - t) * (p.grad + wd * start[k])
        torch.testing.assert_close(model.path.control_points(k)[1].detach(), expected, rtol=1e-5, atol=1e-7)


def test_interpolation_evaluates_every_set_like_single_set_runs(ends, fake_fmnist_root, tmp_path):
    data = _data(fake_fmnist_root)
    model = InterpolationModule(endpoints=[str(p) for p in ends], num_points=3, eval_sets=list(EVAL_SETS),
                                eval_split="test", output_dir=str(tmp_path))
    pl.Trainer(logger=False, enable_progress_bar=False, accelerator="cpu", default_root_dir=tmp_path).test(
        model, datamodule=data, verbose=False)
    result = model.result
    assert result.set_names == list(EVAL_SETS)
    sets = data.eval_sets("test")
    a, b = (load_net(p) for p in ends)
    for name in EVAL_SETS:
        single = evaluate_path(Linear(a.state_dict(), b.state_dict()), a, sets[name], num_points=3, device="cpu")
        np.testing.assert_allclose(result.sets[name].loss, single.loss, rtol=0, atol=1e-6)
    rows = (tmp_path / "path.csv").read_text().splitlines()
    assert rows[0] == "t,set,loss,accuracy" and len(rows) == 1 + 3 * len(EVAL_SETS)


def test_cli_finetune_fit_then_test(fake_fmnist_root, tmp_path, monkeypatch):
    monkeypatch.chdir(Path(__file__).parents[2])
    cue = save_net(tmp_path / "cue.ckpt", _net(3).state_dict(), SPEC)
    common = ["--config", str(CONFIGS / "fmnist_finetune.yaml"), "--model.init", str(cue),
              "--data.init_args.base_args", f'{{"root": "{fake_fmnist_root}", "batch_size": 32, "val_split": 40}}',
              "--model.n_clean", "64", "--model.n_cue", "64", "--trainer.default_root_dir", str(tmp_path),
              "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.enable_progress_bar", "false"]
    main(["fit", *common, "--model.method", "cbft", "--trainer.max_epochs", "2"])
    ckpt = sorted(tmp_path.rglob("last.ckpt"))[0]
    tuned = load_net(ckpt)
    assert any(not torch.equal(v, load_net(cue).state_dict()[k]) for k, v in tuned.state_dict().items())
    cli = main(["test", *common, "--ckpt_path", str(ckpt)])
    metrics = cli.trainer.callback_metrics
    assert all(0.0 <= float(metrics[f"test/{s}/acc"]) <= 1.0 for s in EVAL_SETS)
