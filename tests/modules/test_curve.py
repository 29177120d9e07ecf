"""CurveModule / SurfaceModule: `lmc fit` trains control points only, `lmc test` evaluates grids, checkpoints, BN."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

from lmc_lightning.checkpoint import load_net
from lmc_lightning.cli import main
from lmc_lightning.data import FashionMNISTDataModule
from lmc_lightning.modules import InterpolationModule, OptimConfig
from lmc_lightning.modules.curve import CurveModule
from lmc_lightning.modules.surface import SurfaceModule
from lmc_lightning.weights.curves import Bezier, BezierSurface, MidpointQuadratic
from lmc_lightning.weights.paths import Linear

COMMON = ["--data", "FashionMNISTDataModule", "--data.batch_size", "64", "--trainer.enable_progress_bar", "false",
          "--trainer.enable_model_summary", "false", "--trainer.accelerator", "cpu"]  # fp32 numbers on GPU machines too
NO_DECAY = OptimConfig(lr=0.1, weight_decay=0.0, scheduler="constant")


def _logger(out: Path) -> list[str]:
    return ["--trainer.default_root_dir", str(out), "--trainer.logger.class_path", "CSVLogger",
            "--trainer.logger.init_args.save_dir", str(out)]


def _trainer(tmp_path: Path, **kwargs) -> pl.Trainer:
    kwargs.setdefault("logger", False)
    kwargs.setdefault("accelerator", "cpu")  # CPU tests: the same numbers (and devices) on a GPU machine
    return pl.Trainer(enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                      default_root_dir=tmp_path, limit_val_batches=0, **kwargs)


@pytest.fixture(scope="module")
def modes(fake_fmnist_root: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Four tiny MLP endpoints (seeds 0..3), each trained for a few steps through `lmc fit`."""
    out = tmp_path_factory.mktemp("modes")
    paths = []
    for seed in range(4):
        main(["fit", "--model", "EndpointModule", "--model.net", "mlp", "--model.net_kwargs",
              '{"depth": 1, "width": 16}', "--model.seed", str(seed), "--data.seed", str(seed),
              "--data.root", str(fake_fmnist_root), "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3",
              *COMMON, *_logger(out / f"seed{seed}")])
        paths.append(sorted((out / f"seed{seed}").rglob("*.ckpt"))[0])
    return paths


def _data(root: Path) -> FashionMNISTDataModule:
    dm = FashionMNISTDataModule(root=str(root), batch_size=64)
    dm.setup("fit")
    dm.setup("test")
    return dm


def _direct_loss(ckpt: Path, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return F.cross_entropy(load_net(ckpt)(x), y).item()


def test_lmc_fit_then_test_trains_bends_and_keeps_endpoints(modes: list[Path], fake_fmnist_root: Path,
                                                            tmp_path: Path) -> None:
    out = tmp_path / "curve"
    ends = f"[{modes[0]},{modes[1]}]"
    # num_points is given at fit time too: LightningCLI applies a checkpoint's hparams over the command line.
    main(["fit", "--model", "CurveModule", "--model.endpoints", ends, "--model.num_bends", "2",
          "--model.num_samples", "2", "--model.num_points", "5", "--model.optim.lr", "0.1",
          "--data.root", str(fake_fmnist_root),
          "--trainer.max_epochs", "2", *COMMON, *_logger(out)])
    ckpt = sorted(out.rglob("*.ckpt"))[0]
    raw = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert all(k.startswith("path.") for k in raw["state_dict"])  # control points only, no template

    cli = main(["test", "--model", "CurveModule", "--model.endpoints", ends, "--model.num_bends", "2",
                "--model.num_points", "5", "--ckpt_path", str(ckpt), "--data.root", str(fake_fmnist_root),
                *COMMON, *_logger(tmp_path / "test")])
    model = cli.model
    assert isinstance(model.path, Bezier) and model.path.num_bends == 2
    assert model.path.distance_to_linear().item() > 1e-4  # the bends were trained
    for i, p in enumerate(modes[:2]):  # the endpoints were not
        torch.testing.assert_close(model.path.endpoint(i), dict(load_net(p).state_dict()), rtol=0, atol=0)
    files = {p.name: p for p in (tmp_path / "test").rglob("path.*")}
    assert set(files) == {"path.csv", "path.json", "path.png"}
    rows = list(csv.DictReader(files["path.csv"].open()))
    assert [float(r["t"]) for r in rows] == pytest.approx([0, 0.25, 0.5, 0.75, 1])
    x, y = _data(fake_fmnist_root).split_tensors("test")
    assert [float(rows[i]["loss"]) for i in (0, -1)] == pytest.approx([_direct_loss(p, x, y) for p in modes[:2]],
                                                                      abs=1e-5)
    assert model.result.meta["bn"] is None  # bn="auto" on an MLP: nothing to reset
    assert "barrier/loss" in cli.trainer.callback_metrics


def test_untrained_curve_is_the_linear_path(modes: list[Path], fake_fmnist_root: Path, tmp_path: Path) -> None:
    data = FashionMNISTDataModule(root=str(fake_fmnist_root), batch_size=64)
    curve = CurveModule(endpoints=[str(p) for p in modes[:2]], num_bends=3, num_points=5)
    line = InterpolationModule(endpoints=[str(p) for p in modes[:2]], num_points=5)
    for model in (curve, line):
        _trainer(tmp_path).test(model, datamodule=data, verbose=False)
    assert curve.result.loss == pytest.approx(line.result.loss, abs=1e-5)


def test_training_lowers_the_curve_loss_and_checkpoint_round_trips(modes: list[Path], fake_fmnist_root: Path,
                                                                   tmp_path: Path) -> None:
    data = _data(fake_fmnist_root)
    x, y = data.split_tensors("train")
    model = CurveModule(endpoints=[str(p) for p in modes[:2]], num_points=5, optim=NO_DECAY, num_samples=4)
    model.setup("test")
    torch.manual_seed(0)
    ts = torch.rand(16, 1, dtype=torch.float64)

    def mean_loss() -> float:
        from lmc_lightning.weights.fit import path_loss

        with torch.no_grad():
            return path_loss(model.path, model.net.eval(), x, y, ts).item()

    before = mean_loss()
    trainer = _trainer(tmp_path, max_epochs=4)
    trainer.fit(model, datamodule=data)
    assert mean_loss() < before - 0.05
    ckpt = tmp_path / "curve.ckpt"
    trainer.save_checkpoint(ckpt)
    restored = CurveModule.load_from_checkpoint(ckpt, endpoints=None)
    assert restored.bn == "auto" and restored.num_samples == 4
    for key in model.path.float_keys:
        torch.testing.assert_close(restored.path.control_points(key), model.path.control_points(key).cpu())


def test_midpoint_objective_trains_a_quadratic_through_m(modes: list[Path], fake_fmnist_root: Path,
                                                         tmp_path: Path) -> None:
    model = CurveModule(endpoints=[str(p) for p in modes[:2]], objective="midpoint", reg=0.01, optim=NO_DECAY)
    _trainer(tmp_path, max_epochs=1).fit(model, datamodule=FashionMNISTDataModule(root=str(fake_fmnist_root),
                                                                                  batch_size=64))
    assert isinstance(model.path, MidpointQuadratic)
    m = model.path.midpoint()
    a, b = model.path.endpoint(0), model.path.endpoint(1)
    line_mid = Linear(a, b)(0.5)
    assert max((m[k] - line_mid[k]).abs().max().item() for k in model.path.float_keys) > 1e-4  # m moved
    bezier = Bezier.through_midpoint(a, b, m)
    for t in (0.2, 0.5, 0.9):
        got, want = model.path(t), bezier(t)
        assert max((got[k] - want[k]).abs().max().item() for k in model.path.float_keys) < 1e-5


def test_bn_curve_trains_with_batch_stats_and_resets_at_test(fake_fmnist_root: Path, tmp_path: Path) -> None:
    from lmc_lightning.nets import get_net

    kwargs = {"num_classes": 10, "in_channels": 1, "input_size": 28, "width": 0.0625}
    files = []
    for i in range(2):
        torch.manual_seed(i)
        net = get_net("vgg11_bn", **kwargs)
        net.train()(torch.randn(64, 1, 28, 28) * (i + 1))  # non-trivial running statistics
        files.append(tmp_path / f"bn{i}.pt")
        torch.save(net.state_dict(), files[-1])
    model = CurveModule(endpoints=[str(f) for f in files], net="vgg11_bn", net_kwargs={"width": 0.0625},
                        num_points=3, bn_batches=2, bn_batch_size=64, output_dir=str(tmp_path / "out"))
    data = FashionMNISTDataModule(root=str(fake_fmnist_root), batch_size=64)
    trainer = _trainer(tmp_path, max_epochs=1, limit_train_batches=2)
    trainer.fit(model, datamodule=data)
    stats = {k: v.clone() for k, v in model.path.named_buffers()}
    free_stats = model.path.free_store.get_parameter("features__1__running_mean")
    assert not free_stats.requires_grad
    trainer.test(model, datamodule=data, verbose=False)
    assert model.result.meta["bn"] == "reset"
    for k, v in model.path.named_buffers():  # neither training nor the BN reset touched the stored statistics
        assert torch.equal(v, stats[k]), k
    assert not model.net.training


def test_surface_fit_with_edge_warmup_then_test_heat_maps(modes: list[Path], fake_fmnist_root: Path,
                                                          tmp_path: Path) -> None:
    class Snapshot(Callback):
        def __init__(self) -> None:
            self.free: list[dict[str, torch.Tensor]] = []

        def on_train_epoch_end(self, trainer, module) -> None:
            self.free.append({k: p.detach().clone() for k, p in module.path.free_store.named_parameters()})

    model = SurfaceModule(endpoints=[str(p) for p in modes], num_bends=2, num_samples=3, init_epochs=1,
                          num_points=4, optim=NO_DECAY, output_dir=str(tmp_path / "out"))
    data = FashionMNISTDataModule(root=str(fake_fmnist_root), batch_size=64)
    snap = Snapshot()
    trainer = _trainer(tmp_path, max_epochs=2, callbacks=[snap])
    trainer.fit(model, datamodule=data)
    surface: BezierSurface = model.path
    interior = torch.tensor([not e for e in surface.on_edge])
    bilinear = BezierSurface([surface.endpoint(i) for i in range(4)], 2)
    for key, p in bilinear.free_store.named_parameters():
        # Warm-up epoch: only edge points moved; interior points were still exactly bilinear.
        assert torch.equal(snap.free[0][key][interior], p.detach()[interior]), key
        assert not torch.equal(snap.free[0][key][~interior], p.detach()[~interior]), key
    assert any(not torch.equal(snap.free[1][k][interior], v[interior]) for k, v in snap.free[0].items())

    trainer.test(model, datamodule=data, verbose=False)
    rows = list(csv.DictReader((tmp_path / "out" / "path.csv").open()))
    assert len(rows) == 16 and (tmp_path / "out" / "path.png").stat().st_size > 1000
    x, y = _data(fake_fmnist_root).split_tensors("test")
    corner_rows = {(float(r["u"]), float(r["v"])): float(r["loss"]) for r in rows}
    for (u, v), p in zip([(0, 0), (1, 0), (0, 1), (1, 1)], modes, strict=True):
        assert corner_rows[(u, v)] == pytest.approx(_direct_loss(p, x, y), abs=1e-5)


def test_untrained_surface_is_the_bilinear_patch(modes: list[Path], fake_fmnist_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "bilinear"
    cli = main(["test", "--model", "SurfaceModule", "--model.endpoints", f"[{','.join(map(str, modes))}]",
                "--model.num_points", "3", "--data.root", str(fake_fmnist_root), *COMMON, *_logger(out)])
    surface = cli.model.path
    corners = [surface.endpoint(i) for i in range(4)]
    centre = surface(0.5, 0.5)
    for key in surface.float_keys:
        torch.testing.assert_close(centre[key], sum(c[key] for c in corners) / 4)
    assert {p.name for p in out.rglob("path.*")} == {"path.csv", "path.json", "path.png"}
    assert len(cli.model.result.loss) == 9


def test_bad_arguments_are_clear_errors(modes: list[Path]) -> None:
    ends = [str(p) for p in modes]
    with pytest.raises(ValueError, match="exactly 2 endpoints"):
        CurveModule(endpoints=ends[:3])
    with pytest.raises(ValueError, match="num_bends=1"):
        CurveModule(objective="midpoint", num_bends=2)
    with pytest.raises(ValueError, match="num_bends must be a positive integer"):
        CurveModule(num_bends=0)
    with pytest.raises(ValueError, match="num_samples"):
        CurveModule(num_samples=0)
    with pytest.raises(ValueError, match="reg must be"):
        CurveModule(reg=-1.0)
    with pytest.raises(ValueError, match="curve must be"):
        CurveModule(curve="spline")
    with pytest.raises(ValueError, match="exactly 4 corner endpoints"):
        SurfaceModule(endpoints=ends[:2])
    with pytest.raises(ValueError, match="a surface needs"):
        SurfaceModule(bn="repair")
    with pytest.raises(ValueError, match="init_epochs"):
        SurfaceModule(init_epochs=-1)


class DDPCheck(Callback):
    """Checks run on every rank (module level, so that ddp_spawn can pickle it)."""

    def on_train_start(self, trainer, module) -> None:
        ignored = trainer.strategy.model.parameters_to_ignore
        assert {f"path.{n}" for n, _ in module.path.named_buffers()} <= ignored

    def on_train_end(self, trainer, module) -> None:
        total = torch.stack([p.detach().double().sum() for p in module.trainable_parameters()]).sum()
        gathered = trainer.strategy.all_gather(total)
        assert torch.allclose(gathered, gathered[0].expand_as(gathered), rtol=0, atol=1e-9), gathered
        assert module.path.distance_to_linear().item() > 1e-6  # the bend was trained


@pytest.mark.cpu_ddp
def test_curve_under_two_process_ddp(modes: list[Path], fake_fmnist_root: Path, tmp_path: Path) -> None:
    """Gradients of the bends are all-reduced (ranks agree); the frozen endpoints are not broadcast every step."""
    ddp = "ddp_spawn" if torch.cuda.is_initialized() else "ddp_fork"
    model = CurveModule(endpoints=[str(p) for p in modes[:2]], optim=NO_DECAY)
    trainer = _trainer(tmp_path, max_epochs=-1, max_steps=3, strategy=ddp, devices=2, accelerator="cpu",
                       callbacks=[DDPCheck()])
    trainer.fit(model, datamodule=FashionMNISTDataModule(root=str(fake_fmnist_root), batch_size=32))
    assert trainer.state.finished  # the callback's checks ran on both ranks
