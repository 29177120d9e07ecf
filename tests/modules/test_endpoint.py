"""EndpointModule: optimiser/schedule settings and a real Fashion-MNIST run."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from lmc_lightning.data import FashionMNISTDataModule
from lmc_lightning.modules import EndpointModule, OptimConfig


@pytest.mark.parametrize(
    ("optim", "step", "expected"),
    [
        (OptimConfig(scheduler="constant"), 50, 1.0),
        (OptimConfig(scheduler="multistep", milestones=[2, 4], gamma=0.1), 25, 0.1),  # epoch 2.5
        (OptimConfig(scheduler="multistep", milestones=[2, 4], gamma=0.1), 45, 0.01),  # epoch 4.5
        (OptimConfig(scheduler="cosine"), 50, 0.5),  # half-way
        (OptimConfig(scheduler="cosine", warmup_epochs=1), 4, 0.5),  # step 5 of a 10-step warm-up
        (OptimConfig(scheduler="onecycle"), 14, 0.5),  # 30 warm-up steps: linear up
        (OptimConfig(scheduler="onecycle"), 100, 0.0),
        # Garipov: 10 epochs of 10 steps; factor 1 to epoch 5, 1 - 0.99 (a - 0.5) / 0.4 to epoch 9, then 0.01
        (OptimConfig(scheduler="garipov"), 59, 1.0),
        (OptimConfig(scheduler="garipov"), 60, 1 - 0.99 * 0.25),  # epoch 6: a = 0.6
        (OptimConfig(scheduler="garipov"), 85, 1 - 0.99 * 0.75),  # epoch 8: a = 0.8
        (OptimConfig(scheduler="garipov"), 99, 0.01),  # epoch 9: a = 0.9 -> 0.01
    ],
)
def test_schedule_factors(optim: OptimConfig, step: int, expected: float) -> None:
    assert math.isclose(optim.lr_factor(step, total_steps=100, steps_per_epoch=10), expected, abs_tol=1e-9)


def test_optimizers_and_bad_settings() -> None:
    params = [torch.nn.Parameter(torch.zeros(3))]
    sgd = OptimConfig(optimizer="sgd", lr=0.1, momentum=0.9, nesterov=True).build_optimizer(params)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["nesterov"]
    assert isinstance(OptimConfig(optimizer="adamw").build_optimizer(params), torch.optim.AdamW)
    assert isinstance(OptimConfig(optimizer="adam").build_optimizer(params), torch.optim.Adam)
    with pytest.raises(ValueError, match="nesterov"):
        OptimConfig(optimizer="adam", nesterov=True)
    with pytest.raises(ValueError, match="lr must be positive"):
        OptimConfig(lr=0)


def test_seed_fixes_initialisation() -> None:
    a, b, c = (EndpointModule(net="mlp", net_kwargs={"depth": 1, "width": 8}, seed=s) for s in (0, 0, 1))
    torch.testing.assert_close(a.net.state_dict(), b.net.state_dict())
    assert not torch.equal(next(a.net.parameters()), next(c.net.parameters()))


@pytest.mark.slow
def test_mlp_reaches_80_percent_on_real_fashion_mnist(tmp_path) -> None:
    """10k real training images, 2 epochs: test accuracy on the real 10k test set >= 80%."""
    pl.seed_everything(0)
    data = FashionMNISTDataModule(root=str(tmp_path), batch_size=128, train_subset=10_000)
    model = EndpointModule(net="mlp", net_kwargs={"depth": 2, "width": 256}, num_classes=data.num_classes,
                           input_shape=data.input_shape, optim=OptimConfig(lr=0.05), seed=0)
    trainer = pl.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         default_root_dir=tmp_path)
    trainer.fit(model, datamodule=data)
    acc = trainer.test(model, datamodule=data, verbose=False)[0]["test/acc"]
    assert acc >= 0.80, f"test accuracy {acc:.3f} < 0.80"


def test_init_loads_weights_and_freeze_stops_gradients(tmp_path) -> None:
    from lmc_lightning.checkpoint import save_net

    kwargs = {"net": "vgg11_bn", "net_kwargs": {"width": 0.125}, "input_shape": (1, 28, 28)}
    src = EndpointModule(**kwargs, seed=3)
    ckpt = save_net(tmp_path / "src.ckpt", src.net.state_dict(),
                    {"name": "vgg11_bn", "num_classes": 10, "in_channels": 1, "input_size": 28, "width": 0.125})
    model = EndpointModule(**kwargs, seed=0, init=str(ckpt), freeze="features.4")
    assert not torch.equal(next(model.net.parameters()), next(src.net.parameters()))
    model.setup("fit")
    torch.testing.assert_close(model.net.state_dict(), src.net.state_dict())
    # frozen: the modules up to features.4 (conv, bn, relu, pool, conv); the rest trains
    names = [n for n, _ in model.net.named_parameters()]
    assert model.frozen == [n for n in names if n.split(".")[0] == "features" and int(n.split(".")[1]) <= 4]
    assert model.frozen and len(model.frozen) < len(names)
    before = {n: p.detach().clone() for n, p in model.net.named_parameters()}
    opt = model.optim.build_optimizer(model.trainable_parameters())
    model.net.train()
    model.criterion(model(torch.randn(4, 1, 28, 28)), torch.arange(4)).backward()
    opt.step()
    for n, p in model.net.named_parameters():
        assert torch.equal(p, before[n]) == (n in model.frozen), n


def test_bad_init_and_freeze_are_clear_errors(tmp_path) -> None:
    with pytest.raises(ValueError, match="freeze='nope' is not a module"):
        EndpointModule(net="mlp", net_kwargs={"depth": 1, "width": 8}, freeze="nope")
    other = EndpointModule(net="mlp", net_kwargs={"depth": 1, "width": 4})
    torch.save(other.net.state_dict(), tmp_path / "w.pt")
    model = EndpointModule(net="mlp", net_kwargs={"depth": 1, "width": 8}, init=str(tmp_path / "w.pt"))
    with pytest.raises(ValueError, match="does not match the architecture"):
        model.setup("fit")


def test_freeze_a_container_freezes_all_of_it() -> None:
    model = EndpointModule(net="vgg11_bn", net_kwargs={"width": 0.125}, input_shape=(1, 28, 28), freeze="features")
    assert model.frozen == [n for n, _ in model.net.named_parameters() if n.startswith("features.")]


class _AfterBackward(pl.Callback):
    """Counts ``on_after_backward`` calls (a hook that makes the update go through Lightning's path)."""

    def __init__(self) -> None:
        self.calls = 0

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.calls += 1


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_direct_update_equals_lightning_update(optimizer: str, tmp_path, monkeypatch) -> None:
    """The direct update (no Lightning layers) gives the same weights, global_step and logged values as
    manual_backward + Lightning's optimiser wrapper; a callback hooking into the update gets its calls."""
    from lmc_lightning.modules.endpoint import direct_update_ok

    def run(direct: bool, callbacks: list) -> tuple[dict, pl.Trainer]:
        monkeypatch.setattr(EndpointModule, "direct_update", direct)
        pl.seed_everything(0, verbose=False)
        model = EndpointModule(net="mlp", net_kwargs={"depth": 1, "width": 16}, seed=1,
                               optim=OptimConfig(optimizer=optimizer, lr=0.01))
        data = FashionMNISTDataModule(root="/usr/share/datasets/fashion-mnist", batch_size=32, train_subset=320,
                                      device_resident=True)
        trainer = pl.Trainer(max_epochs=2, limit_val_batches=0, accelerator="cpu", logger=False,
                             enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                             callbacks=callbacks, log_every_n_steps=3, default_root_dir=tmp_path)
        trainer.fit(model, datamodule=data)
        assert direct_update_ok(trainer, model) == (not callbacks)
        return model.state_dict(), trainer

    (direct, t1), (lightning, t2) = run(True, []), run(False, [])
    hook = _AfterBackward()
    hooked, t3 = run(True, [hook])
    assert hook.calls == 20 and t1.global_step == t2.global_step == t3.global_step == 20
    for other in (lightning, hooked):
        assert all(torch.equal(direct[k], other[k]) for k in direct)
    assert t1.callback_metrics.keys() == t2.callback_metrics.keys()
    assert all(torch.equal(t1.callback_metrics[k], t2.callback_metrics[k]) for k in t1.callback_metrics)


class _EpochReader(pl.Callback):
    """Reads the training epoch metrics in its own on_train_epoch_end (it runs before the module's hook)."""

    def __init__(self) -> None:
        self.seen: list[tuple[float, float]] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        m = trainer.callback_metrics
        self.seen.append((float(m["train/acc"]), float(m["train/loss_epoch"])))


@pytest.mark.parametrize("steps_per_batch", [1, 4])
def test_every_callback_sees_this_epochs_training_metrics(steps_per_batch: int, tmp_path) -> None:
    """A callback's on_train_epoch_end reads this epoch's train/acc and train/loss_epoch (the values the logger
    writes for that epoch), not the previous epoch's."""
    from lightning.pytorch.loggers import CSVLogger

    pl.seed_everything(0, verbose=False)
    model = EndpointModule(net="mlp", net_kwargs={"depth": 1, "width": 16}, seed=1, optim=OptimConfig(lr=0.05))
    data = FashionMNISTDataModule(root="/usr/share/datasets/fashion-mnist", batch_size=32, train_subset=320,
                                  device_resident=True, steps_per_batch=steps_per_batch)
    reader = _EpochReader()
    trainer = pl.Trainer(max_epochs=3, limit_val_batches=0, accelerator="cpu", enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, callbacks=[reader],
                         logger=CSVLogger(tmp_path, name="run"), log_every_n_steps=1)
    trainer.fit(model, datamodule=data)
    rows = [r for r in csv.DictReader(open(Path(trainer.logger.log_dir) / "metrics.csv")) if r.get("train/acc")]
    logged = [(float(r["train/acc"]), float(r["train/loss_epoch"])) for r in rows]
    assert len(logged) == 3 and len({acc for acc, _ in logged}) > 1  # the epochs differ, so the check can fail
    assert reader.seen == pytest.approx(logged, abs=1e-6)
