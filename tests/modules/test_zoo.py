"""Zoo training: EndpointModule(num_models=K) members equal separate runs, checkpoints, resume, barriers, logging."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lmc_lightning.callbacks import InterpolationBarrier
from lmc_lightning.checkpoint import load_net
from lmc_lightning.cli import main
from lmc_lightning.data import FashionMNISTDataModule
from lmc_lightning.metrics.totals import ClassificationTotals
from lmc_lightning.modules import EndpointModule, OptimConfig
from lmc_lightning.nets import register
from lmc_lightning.nets.mlp import MLP
from lmc_lightning.nets.registry import _REGISTRY
from lmc_lightning.weights.stacked import StackedNets

pytestmark = pytest.mark.usefixtures("one_thread", "tiny_bn_cnn_registered")


@pytest.fixture(scope="module")
def tiny_bn_cnn_registered():
    """The tiny BN net in the registry for this module's tests only (other tests iterate over all nets)."""
    register("zoo_test_bn_cnn", overwrite=True)(tiny_bn_cnn)
    yield
    _REGISTRY.pop("zoo_test_bn_cnn", None)


def tiny_bn_cnn(num_classes: int = 10, in_channels: int = 1, input_size: int = 28) -> torch.nn.Module:
    """Conv-BN-ReLU, pool, Linear: the smallest net with BatchNorm and a convolution."""
    nn = torch.nn
    return nn.Sequential(nn.Conv2d(in_channels, 4, 3, stride=2), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(16, num_classes))


MLP_NET = {"net": "mlp", "net_kwargs": {"depth": 1, "width": 16}}
BN_NET = {"net": "zoo_test_bn_cnn", "net_kwargs": {}}
OPTIM = OptimConfig(lr=0.05, momentum=0.9, weight_decay=5e-4, scheduler="cosine")


def _fit(model: pl.LightningModule, root: Path, tmp: Path, data_seed: int = 0, resident: bool = True,
         epochs: int = 2, batches: int = 3, precision: str = "32-true", ckpt_path: str | None = None,
         callbacks: list | None = None, batch_size: int = 16) -> pl.Trainer:
    trainer = pl.Trainer(max_epochs=epochs, limit_train_batches=batches, limit_val_batches=0, accelerator="cpu",
                         precision=precision, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=bool(callbacks), callbacks=callbacks or [], default_root_dir=tmp)
    data = FashionMNISTDataModule(root=str(root), batch_size=batch_size, seed=data_seed, device_resident=resident)
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    return trainer


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def test_zoo_of_one_is_the_plain_module() -> None:
    plain, one = EndpointModule(**MLP_NET, seed=3), EndpointModule(**MLP_NET, seed=3, num_models=1)
    assert isinstance(one.net, MLP) and not one.is_zoo and one.member(0) is one.net
    assert list(one.state_dict()) == list(plain.state_dict())
    assert _max_diff(one.state_dict(), plain.state_dict()) == 0.0
    with pytest.raises(ValueError, match="num_models must be >= 1"):
        EndpointModule(**MLP_NET, num_models=0)


@pytest.mark.parametrize(("net", "precision", "resident", "tol"), [
    (MLP_NET, "32-true", True, 1e-6),
    (MLP_NET, "32-true", False, 1e-6),
    (BN_NET, "64-true", True, 1e-10),  # float32 rounding of grouped vs plain convolutions grows chaotically
])
def test_zoo_members_equal_separate_runs(net: dict, precision: str, resident: bool, tol: float,
                                         fake_fmnist_root: Path, tmp_path: Path) -> None:
    """Member k = the run with model seed 5 + k and data seed 10 + k (init, data order, BN statistics)."""
    zoo = EndpointModule(**net, optim=OPTIM, seed=5, num_models=3)
    _fit(zoo, fake_fmnist_root, tmp_path / "zoo", data_seed=10, resident=resident, precision=precision)
    for k in range(3):
        single = EndpointModule(**net, optim=OPTIM, seed=5 + k)
        _fit(single, fake_fmnist_root, tmp_path / f"s{k}", data_seed=10 + k, resident=resident, precision=precision)
        expected = single.net.state_dict()
        assert _max_diff(zoo.member(k).state_dict(), expected) <= tol
        # The member's own checkpoint file, in the single-network layout (load_net builds float32 nets).
        assert _max_diff(load_net(tmp_path / "zoo" / "zoo" / f"model_{k:02d}" / "last.ckpt").state_dict(),
                         expected) <= max(tol, 1e-6)
    assert _max_diff(zoo.member(0).state_dict(), zoo.member(1).state_dict()) > 1e-2  # seeds differ


def test_zoo_checkpoint_loads_members_resume_continues_exactly(fake_fmnist_root: Path, tmp_path: Path) -> None:
    """A 3-epoch run interrupted after epoch 1 and resumed equals an uninterrupted one, bit for bit."""

    class StopAfterFirstEpoch(pl.Callback):
        def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            trainer.should_stop = True

    full = EndpointModule(**MLP_NET, optim=OPTIM, seed=0, num_models=3)
    _fit(full, fake_fmnist_root, tmp_path / "full", epochs=3)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = EndpointModule(**MLP_NET, optim=OPTIM, seed=0, num_models=3)
    _fit(first, fake_fmnist_root, tmp_path / "a", epochs=3, callbacks=[StopAfterFirstEpoch(), ckpt])
    assert first.current_epoch == 1
    last = tmp_path / "ckpt" / "last.ckpt"
    resumed = EndpointModule(**MLP_NET, optim=OPTIM, seed=0, num_models=3)
    _fit(resumed, fake_fmnist_root, tmp_path / "b", epochs=3, ckpt_path=str(last),
         callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt2", save_last=True)])
    for k in range(3):
        assert _max_diff(resumed.member(k).state_dict(), full.member(k).state_dict()) == 0.0
        # The Lightning checkpoint by index, and the member files beside it (the ModelCheckpoint folder).
        assert _max_diff(load_net(tmp_path / "ckpt2" / "last.ckpt", index=k).state_dict(),
                         full.member(k).state_dict()) == 0.0
        assert _max_diff(load_net(tmp_path / "ckpt2" / f"model_{k:02d}" / "last.ckpt").state_dict(),
                         full.member(k).state_dict()) == 0.0
    with pytest.raises(ValueError, match="zoo checkpoint of 3 networks: pass index"):
        load_net(last)
    with pytest.raises(ValueError, match="out of range"):
        load_net(last, index=3)


def test_zoo_barrier_between_member_pairs(fake_fmnist_root: Path, tmp_path: Path) -> None:
    zoo = EndpointModule(**MLP_NET, optim=OPTIM, seed=0, num_models=4)
    barrier = InterpolationBarrier(reference="zoo", every_n_epochs=1, num_points=5)
    _fit(zoo, fake_fmnist_root, tmp_path, epochs=1, callbacks=[barrier])
    h = barrier.history[-1]
    pairs = [h["barrier/loss_00_01"], h["barrier/loss_02_03"]]
    assert h["barrier/loss"] == pytest.approx(sum(pairs) / 2, abs=1e-9)
    # The pair's barrier equals the one-pair measurement on two plain networks trained as those members.
    from lmc_lightning.weights.evaluate import evaluate_path, seeded_subset
    from lmc_lightning.weights.paths import Linear

    data = FashionMNISTDataModule(root=str(fake_fmnist_root))
    data.setup()
    a, b = zoo.member(0).eval(), zoo.member(1).eval()
    result = evaluate_path(Linear(a.state_dict(), b.state_dict()), a,
                           seeded_subset(data.split_tensors("test"), 10_000, seed=0), num_points=5, device="cpu")
    assert h["barrier/loss_00_01"] == pytest.approx(float(result.loss_barrier), abs=1e-5)
    with pytest.raises(ValueError, match="needs a zoo"):
        _fit(EndpointModule(**MLP_NET), fake_fmnist_root, tmp_path / "one", epochs=1,
             callbacks=[InterpolationBarrier(reference="zoo")])


def test_zoo_logs_mean_and_member_metrics(fake_fmnist_root: Path, tmp_path: Path, monkeypatch) -> None:
    """Through the CLI: `lmc fit --model.num_models 2` logs the mean and each member; member files are written."""
    monkeypatch.chdir(Path(__file__).parents[2])
    cli = main(["fit", "--config", "configs/endpoint/fmnist_mlp.yaml", "--data.root", str(fake_fmnist_root),
                "--data.batch_size", "32", "--data.val_split", "64", "--model.net_kwargs",
                '{"depth": 1, "width": 16}', "--model.num_models", "2", "--trainer.max_epochs", "1",
                "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "2",
                "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false",
                "--trainer.enable_progress_bar", "false"])
    m = cli.trainer.callback_metrics
    assert float(m["val/acc"]) == pytest.approx((float(m["val/acc_00"]) + float(m["val/acc_01"])) / 2, abs=1e-6)
    assert {"train/loss_epoch", "train/acc", "train/acc_01", "val/loss_01"} <= set(m)
    files = sorted(tmp_path.rglob("model_*/last.ckpt"))
    assert [f.parent.name for f in files] == ["model_00", "model_01"]
    x = torch.zeros(3, 1, 28, 28)
    torch.testing.assert_close(load_net(files[1])(x), cli.model.member(1).eval()(x))


def test_classification_totals_match_direct_means() -> None:
    """Epoch loss = sample-weighted mean of batch losses, accuracy = correct / seen, per member."""
    torch.manual_seed(0)
    totals = ClassificationTotals(num_models=2)
    logits, targets, losses = [], [], []
    fast = ClassificationTotals(num_models=2)
    for n in (5, 3):
        lg, y = torch.randn(2, n, 4), torch.randint(0, 4, (2, n))
        loss = torch.nn.functional.cross_entropy(lg.transpose(1, 2), y, reduction="none").mean(1)
        totals.update(lg, y, loss)
        fast.accumulate(lg, y, loss)
        logits.append(lg), targets.append(y), losses.append(loss * n)
    loss, acc = totals.compute()
    torch.testing.assert_close(loss, (losses[0] + losses[1]).float() / 8)
    torch.testing.assert_close(acc, (torch.cat(logits, 1).argmax(-1) == torch.cat(targets, 1)).float().mean(1))
    # accumulate() is update() without torchmetrics' wrapper: same sums, same update count.
    assert fast.update_count == totals.update_count == 2
    assert all(torch.equal(a, b) for a, b in zip(fast.compute(), (loss, acc), strict=True))


def test_stacked_nets_member_roundtrip() -> None:
    nets = [EndpointModule(**BN_NET, seed=s).net for s in (0, 1)]
    zoo = StackedNets(nets)
    x = torch.randn(4, 1, 28, 28)
    zoo.eval()
    out = zoo(x, shared=True)
    for k, net in enumerate(nets):
        torch.testing.assert_close(out[k], net.eval()(x), atol=1e-5, rtol=1e-5)
        assert _max_diff(zoo.member(k).state_dict(), net.state_dict()) == 0.0
    with pytest.raises(ValueError, match="one batch per member"):
        zoo(x)


@pytest.mark.parametrize("make", [
    lambda: MLP(10, 1, 28, depth=2, width=24),
    lambda: MLP(10, 1, 28, depth=0),
    lambda: MLP(10, 1, 28, widths=[20, 12], bias=False),
    lambda: torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 12), torch.nn.ReLU(),
                                torch.nn.Sequential(torch.nn.Linear(12, 10))),
])
def test_linear_chain_forward_equals_vmap_bit_for_bit(make, monkeypatch) -> None:
    """MLP zoos skip vmap: same logits and gradients to the last bit, per-member batches and a shared one."""
    torch.manual_seed(0)
    zoo = StackedNets([make() for _ in range(3)])
    assert zoo._chain is not None
    x = torch.randn(3, 8, 1, 28, 28)
    for shared in (False, True):
        results = []
        for fast in (True, False):
            monkeypatch.setattr(StackedNets, "fast_chain", fast)
            zoo.zero_grad()
            out = zoo(x[0] if shared else x, shared=shared)
            out.square().sum().backward()
            results.append([out.detach()] + [p.grad.clone() for p in zoo.parameters()])
        assert results[0][0].shape == (3, 8, 10)
        assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))
    assert StackedNets([tiny_bn_cnn(), tiny_bn_cnn()])._chain is None  # conv + BN: through vmap


@pytest.mark.cpu_ddp
def test_zoo_under_two_process_ddp_splits_the_data(fake_fmnist_root: Path, tmp_path: Path) -> None:
    """Every rank holds all members and half of each member's batch: 2 ranks x 16 equal one process x 32."""
    strategy = "ddp_spawn" if torch.cuda.is_initialized() else "ddp_fork"
    ddp = EndpointModule(**MLP_NET, optim=OPTIM, seed=0, num_models=2)
    trainer = pl.Trainer(max_epochs=2, limit_train_batches=3, limit_val_batches=0, accelerator="cpu", devices=2,
                         strategy=strategy, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, default_root_dir=tmp_path / "ddp")
    trainer.fit(ddp, datamodule=FashionMNISTDataModule(root=str(fake_fmnist_root), batch_size=16, seed=0,
                                                       device_resident=True))
    ckpt = tmp_path / "ddp" / "zoo"
    one = EndpointModule(**MLP_NET, optim=OPTIM, seed=0, num_models=2)
    _fit(one, fake_fmnist_root, tmp_path / "one", batch_size=32)
    for k in range(2):  # the per-member files rank 0 wrote (the forked ranks' modules are not this process's)
        assert _max_diff(load_net(ckpt / f"model_{k:02d}" / "last.ckpt").state_dict(),
                         one.member(k).state_dict()) <= 1e-6
