"""FineTuneModule (MMC fine-tuning): CBFT's gradient and losses against direct computations, FT/LP/LP-FT/CBFT runs,
checkpoints that load with load_net, the CLI path, DDP."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

from lmc_lightning import load_net
from lmc_lightning.checkpoint import save_net
from lmc_lightning.data import CueDataModule
from lmc_lightning.data.cue import EVAL_SETS
from lmc_lightning.modules.finetune import FineTuneModule, cbft_t, head_of, invariance_loss
from lmc_lightning.nets import get_net

pytestmark = pytest.mark.usefixtures("one_thread")
NET = {"name": "vgg13_mmc", "num_classes": 10, "in_channels": 1, "input_size": 28, "width": 0.0625}
DDP = "ddp_spawn" if torch.cuda.is_initialized() else "ddp_fork"


def _net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    spec = dict(NET)
    return get_net(spec.pop("name"), **spec)


@pytest.fixture(scope="module")
def cue_ckpt(tmp_path_factory) -> Path:
    return save_net(tmp_path_factory.mktemp("cue") / "cue.ckpt", _net(0).state_dict(), NET)


def _data(root: Path, **kwargs) -> CueDataModule:
    return CueDataModule(base_args={"root": str(root), "batch_size": 32, "val_split": 40}, **kwargs)


def _trainer(tmp_path: Path, **kwargs) -> pl.Trainer:
    kwargs.setdefault("logger", False)
    kwargs.setdefault("accelerator", "cpu")
    return pl.Trainer(enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, **kwargs)


def test_cbft_barrier_gradient_reaches_theta_only_with_the_one_minus_t_factor(cue_ckpt):
    module = FineTuneModule(method="cbft", init=str(cue_ckpt))
    module.setup("test")
    with torch.no_grad():  # θ differs from θ_cue
        for p in module.net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 1, 28, 28, generator=g), torch.randint(0, 10, (16,), generator=g)
    t = 0.3
    # direct: a net holding θ(t) as its own leaf parameters, in train mode
    direct = copy.deepcopy(module.net).train()
    theta = dict(module.net.named_parameters())
    with torch.no_grad():
        for k, p in direct.named_parameters():
            p.copy_(t * module.theta_cue[k] + (1 - t) * theta[k])
    (1.0 - F.cross_entropy(direct(x), y)).abs().backward()
    module.net.train()
    loss = module.barrier_loss(x, y, t)
    loss.backward()
    for k, p in module.net.named_parameters():
        torch.testing.assert_close(p.grad, (1 - t) * dict(direct.named_parameters())[k].grad, rtol=1e-4, atol=1e-7)
    assert not any(v.requires_grad for v in module.theta_cue.values())  # θ_cue is fixed
    # the barrier forward does not touch θ's own BN statistics
    bn = next(m for m in module.net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert bn.num_batches_tracked.item() == 0


def test_cbft_t_and_invariance_loss_match_their_definitions():
    g = torch.Generator().manual_seed(0)
    ts = torch.tensor([cbft_t(g) for _ in range(4000)])
    assert ts.min() == 0.25 and ts.max() == 0.75
    ends = ((ts == 0.25) | (ts == 0.75)).float().mean().item()
    assert abs(ends - 0.617) < 0.03  # P(|N(0,1)| > 0.5): 62% of the mass on the two ends
    z1, z2 = torch.randn(20, 6, generator=g), torch.randn(15, 6, generator=g)
    y1, y2 = torch.randint(0, 4, (20,), generator=g), torch.randint(1, 5, (15,), generator=g)
    direct = 0.0
    for c in range(5):
        if (y1 == c).any() and (y2 == c).any():
            a, b = z1[y1 == c].mean(0), z2[y2 == c].mean(0)
            direct += ((a / a.norm() - b / b.norm()) ** 2).sum()
    assert invariance_loss(z1, y1, z2, y2, num_classes=5).item() == pytest.approx(float(direct) / 5, rel=1e-5)


@pytest.mark.parametrize("method", ["ft", "lp", "lpft", "cbft"])
def test_each_method_trains_logs_every_set_and_saves_a_loadable_net(method, cue_ckpt, fake_fmnist_root, tmp_path):
    data = _data(fake_fmnist_root)
    model = FineTuneModule(method=method, init=str(cue_ckpt), n_clean=64, n_cue=96, lp_epochs=5, warmup_epochs=1)
    trainer = _trainer(tmp_path, max_epochs=2)
    trainer.fit(model, datamodule=data)
    assert trainer.num_training_batches == 2  # an epoch is the clean loader (64 / 32)
    logged = trainer.callback_metrics
    for name in EVAL_SETS:
        assert 0.0 <= float(logged[f"val/{name}/acc"]) <= 1.0 and float(logged[f"val/{name}/loss"]) > 0
    init = load_net(cue_ckpt).state_dict()
    ckpt = tmp_path / "ft.ckpt"
    trainer.save_checkpoint(ckpt)
    net = load_net(ckpt)
    torch.testing.assert_close(net.state_dict(), model.net.state_dict(), rtol=0, atol=0)
    head, _ = head_of(net)
    changed = {k for k, v in net.state_dict().items() if not torch.equal(v, init[k])}
    if method == "lp":  # only the head moves; the body, its BN statistics included, is frozen
        assert changed == {f"{head}.weight", f"{head}.bias"}
    else:
        assert any(k.startswith("features.0.") for k in changed)
    result = trainer.test(model, datamodule=data, verbose=False)[0]
    assert set(result) == {f"test/{s}/{m}" for s in EVAL_SETS for m in ("acc", "loss")}


def test_bad_arguments_are_clear_errors(fake_fmnist_root, tmp_path):
    with pytest.raises(ValueError, match="method must be"):
        FineTuneModule(method="sgd")
    with pytest.raises(ValueError, match="eval_sets"):
        FineTuneModule(eval_sets=["noise"])
    with pytest.raises(ValueError, match="--model.init"):
        FineTuneModule().setup("fit")


@pytest.mark.cpu_ddp
def test_cbft_under_two_process_ddp(cue_ckpt, fake_fmnist_root, tmp_path):
    """Both optimiser steps of a CBFT step are all-reduced: the ranks end with the same weights."""

    class Check(Callback):
        def on_train_end(self, trainer, module) -> None:
            total = torch.stack([p.detach().double().sum() for p in module.net.parameters()]).sum()
            gathered = trainer.strategy.all_gather(total)
            assert torch.allclose(gathered, gathered[0].expand_as(gathered), rtol=0, atol=1e-9), gathered

    model = FineTuneModule(method="cbft", init=str(cue_ckpt), n_clean=64, n_cue=64, warmup_epochs=0)
    trainer = _trainer(tmp_path, max_epochs=1, strategy=DDP, devices=2, callbacks=[Check()],
                       enable_checkpointing=False)
    trainer.fit(model, datamodule=_data(fake_fmnist_root))
    assert trainer.state.finished


def test_lpft_resume_keeps_the_probe_and_continues(cue_ckpt, fake_fmnist_root, tmp_path, monkeypatch):
    model = FineTuneModule(method="lpft", init=str(cue_ckpt), n_clean=64, lp_epochs=2)
    trainer = _trainer(tmp_path, max_epochs=1, limit_val_batches=0, enable_checkpointing=False)
    trainer.fit(model, datamodule=_data(fake_fmnist_root))
    ckpt = tmp_path / "lpft.ckpt"
    trainer.save_checkpoint(ckpt)
    resumed = FineTuneModule(method="lpft", init=str(cue_ckpt), n_clean=64, lp_epochs=2)
    monkeypatch.setattr(FineTuneModule, "train_linear_probe", lambda *a: pytest.fail("LP ran again on resume"))
    trainer = _trainer(tmp_path, max_epochs=2, limit_val_batches=0, enable_checkpointing=False)
    trainer.fit(resumed, datamodule=_data(fake_fmnist_root), ckpt_path=str(ckpt))
    assert trainer.current_epoch == 2 and resumed._lp_done
    assert any(not torch.equal(v, model.net.state_dict()[k]) for k, v in resumed.net.state_dict().items())
