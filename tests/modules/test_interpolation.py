"""InterpolationModule / PathModule: `lmc test` on two endpoints trained by `lmc fit`, checkpoints, bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from lmc_lightning.checkpoint import load_net
from lmc_lightning.cli import main
from lmc_lightning.data import FashionMNISTDataModule
from lmc_lightning.modules import InterpolationModule

CONFIG = Path(__file__).parents[2] / "configs" / "interpolation" / "fmnist_mlp.yaml"
COMMON = ["--data", "FashionMNISTDataModule", "--data.batch_size", "64", "--trainer.enable_progress_bar", "false",
          "--trainer.enable_model_summary", "false", "--trainer.accelerator", "cpu"]


def _logger(out: Path) -> list[str]:
    return ["--trainer.default_root_dir", str(out), "--trainer.logger.class_path", "CSVLogger",
            "--trainer.logger.init_args.save_dir", str(out)]


@pytest.fixture(scope="module")
def endpoints(fake_fmnist_root: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two tiny MLP endpoints (seeds 0 and 1), each trained for a few steps through `lmc fit`."""
    out = tmp_path_factory.mktemp("endpoints")
    paths = []
    for seed in (0, 1):
        main(["fit", "--model", "EndpointModule", "--model.net", "mlp", "--model.net_kwargs",
              '{"depth": 1, "width": 16}', "--model.seed", str(seed), "--data.seed", str(seed),
              "--data.root", str(fake_fmnist_root), "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3",
              *COMMON, *_logger(out / f"seed{seed}")])
        paths.append(sorted((out / f"seed{seed}").rglob("*.ckpt"))[0])
    return paths


def _test_trainer(tmp_path: Path) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False,
                      enable_model_summary=False, default_root_dir=tmp_path)


def _test_split(root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    dm = FashionMNISTDataModule(root=str(root))
    dm.setup("test")
    return dm.split_tensors("test")


def test_lmc_test_writes_path_files(endpoints: list[Path], fake_fmnist_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "interp"
    cli = main(["test", "--config", str(CONFIG), "--model.endpoints", f"[{endpoints[0]},{endpoints[1]}]",
                "--model.num_points", "5", "--data.root", str(fake_fmnist_root), "--trainer.accelerator", "cpu",
                *_logger(out)])
    files = {p.name: p for p in out.rglob("path.*")}
    assert set(files) == {"path.csv", "path.json", "path.png"}
    assert files["path.png"].stat().st_size > 1000

    # The endpoints of the path are the two networks: same loss and accuracy as evaluating them directly.
    x, y = _test_split(fake_fmnist_root)
    with torch.no_grad():
        logits = [load_net(p)(x) for p in endpoints]
    direct_loss = [F.cross_entropy(lg, y).item() for lg in logits]
    direct_acc = [(lg.argmax(1) == y).double().mean().item() for lg in logits]
    rows = list(csv.DictReader(files["path.csv"].open()))
    assert [float(r["t"]) for r in rows] == pytest.approx([0, 0.25, 0.5, 0.75, 1])
    assert [float(rows[i]["loss"]) for i in (0, -1)] == pytest.approx(direct_loss, abs=1e-5)
    assert [float(rows[i]["accuracy"]) for i in (0, -1)] == pytest.approx(direct_acc, abs=1e-9)

    # Logged metrics match the written result; the barrier is max over t of loss minus the endpoints' line.
    saved = json.loads(files["path.json"].read_text())
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    loss = torch.tensor(saved["loss"], dtype=torch.float64)
    line = torch.linspace(0, 1, 5, dtype=torch.float64) * (loss[-1] - loss[0]) + loss[0]
    assert metrics["barrier/loss"] == pytest.approx((loss - line).max().item(), abs=1e-6)
    assert metrics["barrier/loss"] == pytest.approx(saved["loss_barrier"], abs=1e-6)
    assert metrics["endpoint/loss_t=1.00"] == pytest.approx(saved["loss"][-1], abs=1e-6)
    assert {"barrier/accuracy", "barrier/loss_mean", "barrier/accuracy_mean", "endpoint/acc_t=0.00"} <= set(metrics)
    assert not any(k.startswith("path/") for k in metrics)  # per-point values live in path.csv/json, not in metrics


def test_checkpoint_restores_path_without_endpoint_files(endpoints: list[Path], fake_fmnist_root: Path,
                                                         tmp_path: Path) -> None:
    model = InterpolationModule(endpoints=[str(p) for p in endpoints], num_points=3)
    data = FashionMNISTDataModule(root=str(fake_fmnist_root), batch_size=64)
    trainer = _test_trainer(tmp_path)
    trainer.test(model, datamodule=data, verbose=False)
    ckpt = tmp_path / "interp.ckpt"
    trainer.save_checkpoint(ckpt)
    raw = torch.load(ckpt, map_location="cpu", weights_only=True)  # plain types only
    assert all(not k.startswith("net.") for k in raw["state_dict"])  # the template is not stored

    # Evaluation settings are not restored from the checkpoint (they come from the caller / command line).
    assert "num_points" not in raw["hyper_parameters"] and "bn" not in raw["hyper_parameters"]
    restored = InterpolationModule.load_from_checkpoint(ckpt, endpoints=None, num_points=3)  # no endpoint files
    for i, p in enumerate(endpoints):
        expected = load_net(p).state_dict()
        torch.testing.assert_close(restored.path.endpoint(i), dict(expected), rtol=0, atol=0)
    _test_trainer(tmp_path).test(restored, datamodule=data, verbose=False)
    assert restored.result.loss == pytest.approx(model.result.loss, abs=1e-6)


def test_bn_reset_on_plain_state_dicts_equals_direct_evaluation(fake_fmnist_root: Path, tmp_path: Path) -> None:
    from lmc_lightning.nets import get_net
    from lmc_lightning.weights.evaluate import evaluate_path
    from lmc_lightning.weights.paths import Linear

    kwargs = {"num_classes": 10, "in_channels": 1, "input_size": 28, "width": 0.0625}
    nets = [get_net("vgg11_bn", **kwargs) for _ in range(2)]
    for i, net in enumerate(nets):  # give the BN layers non-trivial running statistics
        net.train()(torch.randn(64, 1, 28, 28) * (i + 1))
        torch.save(net.state_dict(), tmp_path / f"bn{i}.pt")
    model = InterpolationModule(endpoints=[str(tmp_path / f"bn{i}.pt") for i in range(2)], net="vgg11_bn",
                                net_kwargs={"width": 0.0625}, num_points=3, bn="reset", bn_batches=2,
                                bn_batch_size=64, output_dir=str(tmp_path / "out"))
    data = FashionMNISTDataModule(root=str(fake_fmnist_root), batch_size=64)
    _test_trainer(tmp_path).test(model, datamodule=data, verbose=False)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["path.csv", "path.json", "path.png"]
    direct = evaluate_path(Linear(nets[0].state_dict(), nets[1].state_dict()), nets[0], data.split_tensors("test"),
                           num_points=3, bn="reset", train_data=data.split_tensors("train"), bn_batches=2,
                           bn_batch_size=64, device="cpu")
    assert model.result.loss == pytest.approx(direct.loss, abs=1e-6)
    unreset = evaluate_path(Linear(nets[0].state_dict(), nets[1].state_dict()), nets[0], data.split_tensors("test"),
                            num_points=3, device="cpu")
    assert abs(unreset.loss[1] - direct.loss[1]) > 1e-3  # the reset changed the midpoint


def test_weight_matching_alignment_keeps_endpoint_function(endpoints: list[Path]) -> None:
    from torch.func import functional_call

    model = InterpolationModule(endpoints=[str(p) for p in endpoints], align="weight")
    model.setup("test")
    net_b = load_net(endpoints[1])
    aligned = model.path.endpoint(1)
    x = torch.randn(16, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(functional_call(model.net, aligned, (x,)), net_b(x), atol=1e-5, rtol=1e-5)
    assert not torch.equal(aligned["hidden.0.weight"], net_b.state_dict()["hidden.0.weight"])  # units permuted


def test_aligned_endpoint_is_saved_and_loadable(endpoints: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "aligned.ckpt"
    model = InterpolationModule(endpoints=[str(p) for p in endpoints], align="weight", save_aligned=str(out))
    model.setup("test")
    saved = load_net(out)
    torch.testing.assert_close(saved.state_dict(), dict(model.path.endpoint(1)), rtol=0, atol=0)
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(saved(x), load_net(endpoints[1])(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="save_aligned needs an alignment method"):
        InterpolationModule(endpoints=[str(p) for p in endpoints], save_aligned=str(out))


def test_plain_state_dicts_need_and_take_the_architecture(endpoints: list[Path], tmp_path: Path) -> None:
    plain = []
    for i, p in enumerate(endpoints):
        plain.append(tmp_path / f"plain{i}.pt")
        torch.save(load_net(p).state_dict(), plain[-1])
    with pytest.raises(ValueError, match="--model.net"):
        InterpolationModule(endpoints=[str(p) for p in plain]).load_endpoints()
    module = InterpolationModule(endpoints=[str(p) for p in plain], net="mlp", net_kwargs={"depth": 1, "width": 16})
    thetas = module.load_endpoints()
    torch.testing.assert_close(thetas[1], dict(load_net(endpoints[1]).state_dict()), rtol=0, atol=0)


def test_mismatched_endpoints_name_the_tensor(endpoints: list[Path], tmp_path: Path) -> None:
    from lmc_lightning.nets import get_net

    wide = tmp_path / "wide.pt"
    torch.save(get_net("mlp", num_classes=10, in_channels=1, input_size=28, depth=1, width=32).state_dict(), wide)
    module = InterpolationModule(endpoints=[str(endpoints[0]), str(wide)])
    with pytest.raises(ValueError, match=r"hidden\.0\.weight.*\(32, 784\)"):
        module.load_endpoints()


def test_bad_arguments_are_clear_errors(endpoints: list[Path]) -> None:
    with pytest.raises(ValueError, match="exactly 2 endpoints"):
        InterpolationModule(endpoints=[str(endpoints[0])])
    with pytest.raises(ValueError, match="num_points"):
        InterpolationModule(num_points=1)
    with pytest.raises(ValueError, match="bn must be"):
        InterpolationModule(bn="batch")
    with pytest.raises(ValueError, match="precision"):
        InterpolationModule(precision="fp8")
    with pytest.raises(ValueError, match="no endpoints"):
        InterpolationModule().load_endpoints()
    with pytest.raises(ValueError, match="nothing to train"):
        InterpolationModule(endpoints=[str(p) for p in endpoints]).setup("fit")
