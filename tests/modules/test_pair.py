"""PairModule: twin training with shared or separate init and data order, spawning, checkpoints."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lmc_lightning.callbacks import InterpolationBarrier
from lmc_lightning.checkpoint import load_net
from lmc_lightning.data import FashionMNISTDataModule
from lmc_lightning.modules import OptimConfig, PairModule

# Forking is fast; it is impossible once CUDA is initialised in this process (then spawn, slower).
DDP = "ddp_spawn" if torch.cuda.is_initialized() else "ddp_fork"
NET = {"net": "mlp", "net_kwargs": {"depth": 1, "width": 16}, "optim": OptimConfig(lr=0.1, scheduler="constant")}


def _fit(root: Path, tmp_path: Path, model: PairModule, callbacks: list | None = None, **kwargs) -> pl.Trainer:
    kwargs.setdefault("max_epochs", 2)
    kwargs.setdefault("accelerator", "cpu")
    trainer = pl.Trainer(limit_train_batches=3, limit_val_batches=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=callbacks or [], **kwargs)
    trainer.fit(model, datamodule=FashionMNISTDataModule(root=str(root), batch_size=32))
    return trainer


def _max_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a.state_dict().values(), b.state_dict().values(),
                                                          strict=True))


def test_same_init_and_order_gives_identical_nets_and_zero_barrier(fake_fmnist_root: Path, tmp_path: Path) -> None:
    model = PairModule(**NET, same_init=True, same_data_order=True)
    init = {k: v.clone() for k, v in model.net_a.state_dict().items()}
    barrier = InterpolationBarrier(reference="twin", every_n_epochs=1, num_points=5)
    _fit(fake_fmnist_root, tmp_path, model, [barrier])
    assert _max_diff(model.net_a, model.net_b) == 0.0
    assert max((model.net_a.state_dict()[k] - v).abs().max().item() for k, v in init.items()) > 1e-3  # trained
    assert [h["step"] for h in barrier.history] == [3, 6]
    assert all(abs(h["barrier/loss"]) < 1e-6 and abs(h["barrier/accuracy"]) < 1e-9 for h in barrier.history)


def test_different_seeds_give_different_nets(fake_fmnist_root: Path, tmp_path: Path) -> None:
    model = PairModule(**NET, seed_a=0, seed_b=1, same_data_order=True)
    assert _max_diff(model.net_a, model.net_b) > 1e-2
    barrier = InterpolationBarrier(reference="twin", every_n_epochs=1, num_points=5)
    _fit(fake_fmnist_root, tmp_path, model, [barrier])
    assert _max_diff(model.net_a, model.net_b) > 1e-2
    assert barrier.history[-1]["barrier/loss"] >= 0.0


def test_separate_data_order_makes_twins_diverge(fake_fmnist_root: Path, tmp_path: Path) -> None:
    """Same init, net_b fed by its own shuffled view: the nets separate after a few steps."""
    model = PairModule(**NET, same_init=True, same_data_order=False, data_seed=3)
    assert _max_diff(model.net_a, model.net_b) == 0.0
    _fit(fake_fmnist_root, tmp_path, model)
    assert _max_diff(model.net_a, model.net_b) > 1e-3


class _SpawnProbe(Callback):
    """At the spawn step (inside its training step, before backward) record how far net_b is from net_a."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.weights_diff: float | None = None
        self.momentum_diff: float | None = None

    def on_before_backward(self, trainer: pl.Trainer, pl_module: PairModule, loss: torch.Tensor) -> None:
        if trainer.global_step != self.step or self.weights_diff is not None:
            return
        self.weights_diff = _max_diff(pl_module.net_a, pl_module.net_b)
        state = trainer.optimizers[0].state
        pairs = zip(pl_module.net_a.parameters(), pl_module.net_b.parameters(), strict=True)
        self.momentum_diff = max((state[a]["momentum_buffer"] - state[b]["momentum_buffer"]).abs().max().item()
                                 for a, b in pairs)


def test_spawn_copies_weights_and_optimiser_state(fake_fmnist_root: Path, tmp_path: Path) -> None:
    probe = _SpawnProbe(step=2)
    model = PairModule(**NET, spawn_step=2, same_data_order=True)
    _fit(fake_fmnist_root, tmp_path, model, [probe], max_epochs=-1, max_steps=4)
    assert bool(model.spawned)
    assert probe.weights_diff == 0.0 and probe.momentum_diff == 0.0
    # Same batches after the spawn and the same optimiser state: still identical two steps later.
    assert _max_diff(model.net_a, model.net_b) == 0.0


def test_spawn_then_separate_orders_diverge(fake_fmnist_root: Path, tmp_path: Path) -> None:
    probe = _SpawnProbe(step=2)
    model = PairModule(**NET, spawn_step=2, same_data_order=False)
    _fit(fake_fmnist_root, tmp_path, model, [probe], max_epochs=-1, max_steps=5)
    assert probe.weights_diff == 0.0
    assert _max_diff(model.net_a, model.net_b) > 1e-3


def test_checkpoint_loads_each_net(fake_fmnist_root: Path, tmp_path: Path) -> None:
    model = PairModule(**NET, seed_a=0, seed_b=1)
    trainer = _fit(fake_fmnist_root, tmp_path, model, max_epochs=1)
    ckpt = tmp_path / "pair.ckpt"
    trainer.save_checkpoint(ckpt)
    for prefix in ("net_a", "net_b"):
        net = load_net(ckpt, prefix=prefix)
        torch.testing.assert_close(net.state_dict(), getattr(model, prefix).state_dict(), rtol=0, atol=0)


def test_bad_arguments_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="same_init=true"):
        PairModule(seed_a=3, seed_b=3)
    with pytest.raises(ValueError, match="spawn_step"):
        PairModule(spawn_step=-1)


@pytest.mark.cpu_ddp
def test_spawn_under_two_process_ddp(fake_fmnist_root: Path, tmp_path: Path) -> None:
    """Before the spawn net_b gets no real gradient; DDP (find_unused_parameters off) must still run."""
    model = PairModule(**NET, spawn_step=1, same_data_order=False)
    init = {k: v.clone() for k, v in model.net_a.state_dict().items()}
    trainer = _fit(fake_fmnist_root, tmp_path, model, max_epochs=-1, max_steps=3, strategy=DDP, devices=2)
    assert trainer.state.finished and bool(model.spawned)  # rank 0's weights and buffers come back
    assert max((model.net_a.state_dict()[k] - v).abs().max().item() for k, v in init.items()) > 1e-3
    assert _max_diff(model.net_a, model.net_b) > 1e-4  # rank 0's nets, trained on different orders after step 1
