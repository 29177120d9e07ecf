"""StitchModule: CLI fit/test on tiny endpoints, penalty of a net stitched to itself, the seed's protocol."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from lmc_lightning.checkpoint import save_net
from lmc_lightning.cli import main
from lmc_lightning.nets import get_net

SPEC = {"name": "mcnn", "num_classes": 10, "in_channels": 1, "input_size": 28, "width": 0.0625}


@pytest.fixture(scope="module")
def endpoints(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    root = tmp_path_factory.mktemp("stitch_endpoints")
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        net = get_net("mcnn", in_channels=1, input_size=28, width=SPEC["width"])
        paths.append(str(save_net(root / f"{seed}.ckpt", net.state_dict(), SPEC)))
    return paths


def _args(root: Path, out: Path, endpoints: list[str], *extra: str) -> list[str]:
    return ["--model", "StitchModule", "--model.endpoints", f"[{endpoints[0]},{endpoints[1]}]",
            "--data", "FashionMNISTDataModule", "--data.root", str(root), "--data.batch_size", "32",
            "--data.val_split", "64", "--model.bn_batches", "2",
            "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "2",
            "--trainer.limit_test_batches", "2",
            "--trainer.default_root_dir", str(out), "--trainer.logger", "false", "--trainer.enable_progress_bar",
            "false", "--trainer.enable_checkpointing", "false", "--trainer.num_sanity_val_steps", "0", *extra]


def test_birkhoff_stitch_fit_logs_the_seed_metrics(fake_fmnist_root: Path, tmp_path: Path, endpoints) -> None:
    cli = main(["fit", *_args(fake_fmnist_root, tmp_path, endpoints, "--model.layer", "birkhoff", "--model.point",
                              "5", "--model.warmup_epochs", "1", "--trainer.max_epochs", "2")])
    model, metrics = cli.model, cli.trainer.callback_metrics
    assert model.stitcher.scalars_on  # switched on after the warm-up epoch
    w = model.stitcher.weight.detach()
    torch.testing.assert_close(w.sum(1), torch.ones(len(w)), atol=1e-4, rtol=0)  # projected after each step
    for key in ("accuracy", "penalty", "accuracy_soft", "rounding_cost", "perm_distance", "row_max"):
        assert f"stitch/{key}" in metrics, key
    ends = model.endpoint_acc[0]
    assert abs(float(metrics["stitch/penalty"]) - (float(ends.mean()) - float(metrics["stitch/accuracy"]))) < 1e-6
    # only the stitcher moved: the endpoints' weights are those of the checkpoints
    ref = torch.load(endpoints[1], weights_only=True)["state_dict"]
    torch.testing.assert_close(model.stitched.b.get_submodule("7").weight.cpu(), ref["net.7.weight"])
    # ... but B's BN layers ran in train mode during training (the seed): running statistics moved from the checkpoint
    moved = (model.stitched.b.get_submodule("8").running_mean.cpu() - ref["net.8.running_mean"]).abs().max()
    assert moved > 1e-3, float(moved)


def test_identity_stitch_of_a_net_with_itself_has_zero_penalty(fake_fmnist_root: Path, tmp_path: Path,
                                                               endpoints) -> None:
    same = [endpoints[0], endpoints[0]]
    cli = main(["test", *_args(fake_fmnist_root, tmp_path, same, "--model.layer", "identity", "--model.point", "9")])
    metrics = cli.trainer.callback_metrics
    assert float(metrics["test/stitch/penalty"]) == pytest.approx(0.0, abs=1e-6)
    assert float(metrics["test/stitch/accuracy"]) == pytest.approx(float(metrics["test/stitch/endpoint_acc_a"]))


def test_bad_arguments_are_clear_errors(fake_fmnist_root: Path, tmp_path: Path, endpoints) -> None:
    from lmc_lightning.modules import StitchModule

    with pytest.raises(ValueError, match="layer must be one of"):
        StitchModule(layer="conv")
    with pytest.raises(ValueError, match="two endpoints"):
        StitchModule(endpoints=["a.ckpt"])
    with pytest.raises(ValueError, match="Unknown stitch point '77'"):
        main(["validate", *_args(fake_fmnist_root, tmp_path, endpoints, "--model.point", "77")])
    with pytest.raises(ValueError, match="no parameters to train"):
        main(["fit", *_args(fake_fmnist_root, tmp_path, endpoints, "--model.layer", "identity",
                            "--trainer.max_epochs", "1")])


def test_similarity_module_writes_matrix_csv_and_heat_maps(fake_fmnist_root: Path, tmp_path: Path,
                                                           endpoints) -> None:
    import csv

    from lmc_lightning.metrics.functional import grelu_cka
    from lmc_lightning.weights.permutation.batches import capture_module

    args = ["--model", "SimilarityModule", "--model.endpoints", f"[{endpoints[0]},{endpoints[1]}]",
            "--model.metrics", "[grelu_cka,grelu_procrustes]", "--model.num_samples", "40",
            "--model.output_dir", str(tmp_path), "--data", "FashionMNISTDataModule", "--data.root",
            str(fake_fmnist_root), "--data.batch_size", "32", "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false"]
    cli = main(["test", *args])
    rows = list(csv.DictReader(open(tmp_path / "similarity.csv")))
    assert len(rows) == 2 * 4 * 4
    assert (tmp_path / "similarity_grelu_cka.png").stat().st_size > 0
    # the module's value equals the functional on the same 40 test images
    x = cli.datamodule.split_tensors("test")[0][:40]
    nets = [capture_module(__import__("lmc_lightning").load_net(p), ["5"]) for p in endpoints]
    want = float(grelu_cka(nets[0](x)[0], nets[1](x)[0]))
    got = next(float(r["value"]) for r in rows if r["metric"] == "grelu_cka" and r["point_a"] == r["point_b"] == "5")
    assert got == pytest.approx(want, abs=1e-5)
    assert float(cli.trainer.callback_metrics["similarity/grelu_cka/5"]) == pytest.approx(want, abs=1e-5)



def test_crossvalidated_birkhoff_picks_the_best_alpha_on_the_validation_split(fake_fmnist_root: Path, tmp_path: Path,
                                                                              endpoints) -> None:
    from lmc_lightning.data import FashionMNISTDataModule
    from lmc_lightning.stitch_sweep import CV_ALPHAS, crossval_stitch, stitch_sweep

    torch.testing.assert_close(torch.tensor(CV_ALPHAS), torch.logspace(-3, 1, 5))  # the seed's grid
    limits = {"limit_train_batches": 2, "limit_val_batches": 1, "limit_test_batches": 1}
    plain = FashionMNISTDataModule(root=str(fake_fmnist_root), batch_size=32, eval_batch_size=64)
    with pytest.raises(ValueError, match="validation split"):
        crossval_stitch(endpoints, plain, "5")
    data = FashionMNISTDataModule(root=str(fake_fmnist_root), batch_size=32, eval_batch_size=64, val_split=0.2)
    row = crossval_stitch(endpoints, data, "5", epochs=2, output_dir=tmp_path, trainer_kwargs=limits, bn_batches=1)
    assert sorted(row["val_accuracy"]) == sorted(CV_ALPHAS)
    assert row["alpha"] == max(row["val_accuracy"], key=row["val_accuracy"].get)  # the best validation accuracy
    assert row["best_val_accuracy"] == pytest.approx(max(row["val_accuracy"].values()))
    assert row["layer"] == "birkhoff_cv" and row["epochs"] == 2
    assert row["penalty"] == pytest.approx((row["endpoint_acc_a"] + row["endpoint_acc_b"]) / 2 - row["accuracy"])
    assert 0 <= row["perm_distance"] <= 1 and len(row["perm_history"]) == 2
    # the sweep driver runs it as the layer "birkhoff_cv" next to the others and writes CSV + plot
    rows = stitch_sweep(endpoints, plain, ["identity", "birkhoff_cv"], ["5"], epochs=1, output_dir=tmp_path,
                        trainer_kwargs=limits, cv_datamodule=data, cv_epochs=1, bn_batches=1)
    assert [r["layer"] for r in rows] == ["identity", "birkhoff_cv"]
    csv = (tmp_path / "stitch_sweep.csv").read_text().splitlines()
    assert csv[0].endswith(",alpha") and len(csv) == 3 and (tmp_path / "stitch_sweep.png").stat().st_size > 0


def test_bn_pass_over_train_then_val(fake_fmnist_root: Path, tmp_path: Path, endpoints) -> None:
    from lmc_lightning.data import FashionMNISTDataModule
    from lmc_lightning.modules import StitchModule

    with pytest.raises(ValueError, match="bn_splits"):
        StitchModule(bn_splits=["test"])
    data = FashionMNISTDataModule(root=str(fake_fmnist_root), batch_size=32, val_split=0.25)
    model = StitchModule(endpoints=endpoints, point="5", layer="identity", bn_splits=["train", "val"])
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, default_root_dir=str(tmp_path))
    trainer.test(model, datamodule=data, verbose=False)
    batches = model._bn_inputs()
    assert len(batches) == 192 // 32 + 64 // 32  # every training batch, then the validation split in batches of 32
    torch.testing.assert_close(batches[-1], data.split_tensors("val")[0][32:])
