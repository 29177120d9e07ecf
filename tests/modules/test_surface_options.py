"""MCSurface options of SurfaceModule / BezierSurface: degree, corner order, sequential steps, two-edge warm-up."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lmc_lightning.data import FashionMNISTDataModule
from lmc_lightning.modules import OptimConfig
from lmc_lightning.modules.surface import SurfaceModule, grid_extrema
from lmc_lightning.nets import get_net
from lmc_lightning.weights.curves import BezierSurface, bernstein
from lmc_lightning.weights.fit import path_loss
from lmc_lightning.weights.result import PathResult

pytestmark = pytest.mark.usefixtures("one_thread")
NET = {"num_classes": 10, "in_channels": 1, "input_size": 28, "depth": 1, "width": 8}
PLAIN_SGD = OptimConfig(lr=0.1, momentum=0.0, weight_decay=0.0, scheduler="constant")


def _corners(n: int = 4) -> list[dict[str, torch.Tensor]]:
    out = []
    for seed in range(n):
        torch.manual_seed(seed)
        out.append(get_net("mlp", **NET).state_dict())
    return out


@pytest.fixture(scope="module")
def corner_files(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    root = tmp_path_factory.mktemp("corners")
    files = []
    for i, state in enumerate(_corners()):
        torch.save(state, root / f"c{i}.pt")
        files.append(str(root / f"c{i}.pt"))
    return files


def _module(files: list[str], **kwargs) -> SurfaceModule:
    kwargs.setdefault("optim", PLAIN_SGD)
    return SurfaceModule(endpoints=files, net="mlp", net_kwargs={"depth": 1, "width": 8}, **kwargs)


def _trainer(tmp_path: Path, **kwargs) -> pl.Trainer:
    # CPU: the tests replay steps with direct CPU computations (exact comparisons)
    return pl.Trainer(accelerator="cpu", enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=False, logger=False, default_root_dir=tmp_path, limit_val_batches=0,
                      **kwargs)


def test_degree_is_mcsurface_num_bends() -> None:
    corners = _corners()
    surf = BezierSurface(corners, degree=2)  # MCSurface's num_bends: 2 -> a 3x3 grid with 5 free points
    assert (surf.grid_size, surf.num_free, surf.num_bends, surf.degree) == (3, 5, 1, 2)
    same = BezierSurface(corners, num_bends=1)
    assert same.grid_size == 3 and BezierSurface(corners, degree=3).grid_size == 4
    with pytest.raises(ValueError, match="pass only one"):
        BezierSurface(corners, num_bends=2, degree=2)
    with pytest.raises(ValueError, match="degree must be"):
        BezierSurface(corners, degree=0)
    assert SurfaceModule(degree=2).num_bends == 1 and SurfaceModule(num_bends=2).degree == 3
    assert SurfaceModule().num_bends == 1
    with pytest.raises(ValueError, match="degree >= 2"):
        SurfaceModule(degree=1)
    # The surface is sum_ij B_i^n(u) B_j^n(v) P_ij over the (n+1)^2 grid, checked against a direct sum.
    with torch.no_grad():
        for p in surf.free_store.parameters():
            p.add_(torch.randn_like(p))
    u, v = 0.3, 0.8
    bu, bv = (bernstein(torch.tensor([t], dtype=torch.float64), 2)[0] for t in (u, v))
    key = surf.float_keys[0]
    direct = sum(float(bu[i] * bv[j]) * surf.grid_point(key, i, j) for i in range(3) for j in range(3))
    torch.testing.assert_close(surf(u, v)[key], direct, rtol=1e-5, atol=1e-6)


def test_corner_order() -> None:
    corners = _corners()
    key = next(iter(corners[0]))
    ours = BezierSurface(corners, degree=2)
    seed = BezierSurface(corners, degree=2, corner_order="mcsurface")
    for (u, v), k_ours, k_seed in [((0, 0), 0, 0), ((1, 0), 1, 2), ((0, 1), 2, 1), ((1, 1), 3, 3)]:
        torch.testing.assert_close(ours(u, v)[key], corners[k_ours][key])
        torch.testing.assert_close(seed(u, v)[key], corners[k_seed][key])
    with pytest.raises(ValueError, match="corner_order"):
        BezierSurface(corners, corner_order="xy")


def test_sequential_sampling_takes_one_step_per_point(corner_files: list[str], fake_fmnist_root: Path,
                                                      tmp_path: Path) -> None:
    """num_samples optimiser steps per batch, each on its own point, equal to a plain SGD loop over the points."""
    coords = torch.tensor([[0.2, 0.7], [0.9, 0.1], [0.5, 0.5]], dtype=torch.float64)
    model = _module(corner_files, degree=2, num_samples=3, sample_mode="sequential", num_points=3,
                    output_dir=str(tmp_path / "out"))
    assert not model.automatic_optimization
    model.sample_groups = lambda: list(coords[:, None])  # fixed points, so a direct loop can replay them

    class Record(Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
            self.batch = [t.clone() for t in batch]
            self.start = copy.deepcopy(module.path)

    rec = Record()
    data = FashionMNISTDataModule(root=str(fake_fmnist_root), batch_size=64)
    trainer = _trainer(tmp_path, max_epochs=1, limit_train_batches=1, callbacks=[rec])
    trainer.fit(model, datamodule=data)
    assert trainer.global_step == 3  # one optimiser step per sampled point

    path, (x, y) = rec.start, rec.batch
    net = copy.deepcopy(model.net).train()
    params = [p for p in path.free_store.parameters() if p.requires_grad]
    for c in coords:
        loss = path_loss(path, net, x, y, c[None])
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                p.sub_(0.1 * g)
    trained = dict(model.path.free_store.named_parameters())
    for name, p in path.free_store.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(trained[name].detach(), p.detach(), rtol=1e-5, atol=1e-6)

    trainer.test(model, datamodule=data, verbose=False)
    meta = json.loads((tmp_path / "out" / "path.json").read_text())["meta"]
    assert meta["extrema"]["min_loss"] == pytest.approx(float(model.result.loss.min()))
    assert meta["extrema"]["max_accuracy"] == pytest.approx(float(model.result.accuracy.max()))


def test_mean_mode_takes_one_step_per_batch(corner_files: list[str], fake_fmnist_root: Path, tmp_path: Path) -> None:
    model = _module(corner_files, degree=2, num_samples=3)
    trainer = _trainer(tmp_path, max_epochs=1, limit_train_batches=2)
    trainer.fit(model, datamodule=FashionMNISTDataModule(root=str(fake_fmnist_root), batch_size=64))
    assert model.automatic_optimization and trainer.global_step == 2


def test_two_edge_warmup_trains_edges_u0_u1_only_and_fills_nothing(corner_files: list[str], fake_fmnist_root: Path,
                                                                    tmp_path: Path) -> None:
    class Snapshot(Callback):
        def __init__(self) -> None:
            self.grids: list[dict[str, torch.Tensor]] = []

        def on_train_epoch_end(self, trainer, module) -> None:
            self.grids.append({k: p.detach().clone() for k, p in module.path.free_store.named_parameters()})

    model = _module(corner_files, degree=2, num_samples=2, sample_mode="sequential", init_epochs=1,
                    warmup="two_edges", corner_order="mcsurface")
    assert not model.fill_interior
    snap = Snapshot()
    trainer = _trainer(tmp_path, max_epochs=2, limit_train_batches=2, callbacks=[snap])
    trainer.fit(model, datamodule=FashionMNISTDataModule(root=str(fake_fmnist_root), batch_size=64))
    surf: BezierSurface = model.path
    start = BezierSurface([_corners()[k] for k in range(4)], degree=2, corner_order="mcsurface")
    cells = [divmod(k, 3) for k in surf.free_index]  # (i along u, j along v)
    moved_rows = torch.tensor([i in (0, 2) for i, _ in cells])  # bends of the edges u = 0 and u = 1
    key = "layers__0__weight" if "layers__0__weight" in snap.grids[0] else next(iter(snap.grids[0]))
    init = start.free_store.get_parameter(key).detach()
    warm = snap.grids[0][key]
    assert not torch.equal(warm[moved_rows], init[moved_rows])
    torch.testing.assert_close(warm[~moved_rows], init[~moved_rows], rtol=0, atol=0)  # v-edges, centre untouched
    after = snap.grids[1][key]
    assert not torch.equal(after[~moved_rows], init[~moved_rows])  # the whole surface trains after the warm-up


def test_grid_ensemble_equals_direct_mean_softmax(corner_files: list[str], fake_fmnist_root: Path,
                                                  tmp_path: Path) -> None:
    """num_points=2: the grid is the four corners, so the ensemble is the mean softmax of the four corner nets."""
    model = _module(corner_files, degree=2, num_points=2, bn=None, ensemble=True, output_dir=str(tmp_path / "out"))
    data = FashionMNISTDataModule(root=str(fake_fmnist_root), batch_size=64)
    _trainer(tmp_path).test(model, datamodule=data, verbose=False)
    x, y = data.split_tensors("test")
    with torch.no_grad():
        probs = []
        for state in _corners():
            net = get_net("mlp", **NET)
            net.load_state_dict(state)
            probs.append(net.eval()(x).softmax(-1))
    mean = torch.stack(probs).mean(0)
    ens = json.loads((tmp_path / "out" / "path.json").read_text())["meta"]["ensemble"]
    assert ens["members"] == 4
    assert ens["accuracy"] == pytest.approx((mean.argmax(-1) == y).float().mean().item(), abs=1e-6)
    assert ens["loss"] == pytest.approx(-mean[torch.arange(len(y)), y].log().mean().item(), rel=1e-4)
    assert "ensemble" not in model.hparams  # an evaluation setting, not restored from checkpoints


def test_grid_extrema_direct() -> None:
    coords = np.array([[0, 0], [0, 1], [1, 0], [1, 1], [0.5, 0.5]], dtype=float)
    result = PathResult(coords, loss=[0.5, 0.4, 0.9, 0.6, 0.3], accuracy=[0.8, 0.91, 0.7, 0.92, 0.85])
    e = grid_extrema(result)
    assert (e["min_loss"], e["min_loss_u"], e["min_loss_v"]) == (0.3, 0.5, 0.5)
    assert (e["max_accuracy"], e["max_accuracy_u"], e["max_accuracy_v"]) == (0.92, 1.0, 1.0)


def test_bad_options_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="sample_mode"):
        SurfaceModule(sample_mode="batch")
    with pytest.raises(ValueError, match="warmup"):
        SurfaceModule(warmup="edges")
    with pytest.raises(ValueError, match="corner_order"):
        SurfaceModule(corner_order="vu")
