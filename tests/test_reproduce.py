"""`lmc reproduce`: the chain runs, figures are judged against published values; every shipped entry parses."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from lmc_lightning.cli import main, run
from lmc_lightning.reproduce import EXPERIMENTS, Check, Experiment, list_experiments, metric_statistics, path_statistics

TINY = {
    "title": "tiny chain",
    "seed": "test",
    "data": "fake Fashion-MNIST",
    "steps": [
        {"id": "mode", "foreach": [0, 1], "command": "fit",
         "config": {"seed_everything": 0,
                    "trainer": {"max_epochs": 1, "limit_train_batches": 2, "enable_progress_bar": False,
                                "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                               "init_args": {"save_last": True}}]},
                    "model": {"class_path": "lmc_lightning.modules.EndpointModule",
                              "init_args": {"net": "mlp", "net_kwargs": {"depth": 1, "width": 16}}},
                    "data": {"class_path": "lmc_lightning.data.FashionMNISTDataModule",
                             "init_args": {"batch_size": 64}}},
         "args": ["--model.seed", "{i}", "--data.seed", "{i}"]},
        {"id": "line", "command": "test", "config": "configs/interpolation/fmnist_mlp.yaml",
         "args": ["--model.endpoints", "[{ckpt:mode0},{ckpt:mode1}]", "--model.num_points", "5",
                  "--model.output_dir", "{dir}", "--trainer.enable_progress_bar", "false"]},
    ],
    "checks": [
        {"name": "endpoint accuracy is a percentage", "value": "line.endpoint_acc", "tolerance": {"min": 0.0},
         "source": "test"},
        {"name": "barrier equals itself", "value": "line.acc_barrier - line.acc_barrier", "published": 0.0,
         "tolerance": {"abs": 0.001}, "source": "test"},
    ],
}


def _write(root: Path, spec: dict) -> None:
    (root / "tiny").mkdir(parents=True, exist_ok=True)
    (root / "tiny" / "chain.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))


def test_chain_runs_and_passes_then_fails_on_a_tighter_tolerance(tmp_path: Path, fake_fmnist_root: Path,
                                                                 capsys) -> None:
    root, out = tmp_path / "experiments", tmp_path / "out"
    _write(root, TINY)
    assert main(["reproduce", "--list", "--root", str(root)]) == 0
    assert "tiny/chain" in capsys.readouterr().out
    extra = ["--", "--data.root", str(fake_fmnist_root)]
    assert main(["reproduce", "tiny/chain", "--root", str(root), "--out", str(out), *extra]) == 0
    printed = capsys.readouterr().out
    assert "PASSED: 2/2" in printed and "endpoint accuracy is a percentage" in printed
    report = json.loads((out / "report.json").read_text())
    stats = path_statistics(out / "line" / "path.json")
    assert report["rows"][0]["measured"] == pytest.approx(stats["endpoint_acc"])
    assert stats["endpoint_acc"] == pytest.approx((stats["acc_start"] + stats["acc_end"]) / 2)
    assert len(list(out.rglob("last.ckpt"))) == 2

    failing = {**TINY, "checks": [{**TINY["checks"][0], "tolerance": {"min": 100.1}}]}
    _write(root, failing)  # the finished steps are reused (.done); only the figures are judged again
    assert run(["reproduce", "tiny/chain", "--root", str(root), "--out", str(out), *extra]) == 1  # console script
    printed = capsys.readouterr().out
    assert "FAIL" in printed and "skipped" in printed and "FAILED: 0/1" in printed


def test_bad_entries_are_clear_errors(tmp_path: Path, capsys) -> None:
    root = tmp_path / "experiments"
    _write(root, {**TINY, "checks": [{"name": "x", "value": "1", "tolerance": {"about": 1}}]})
    with pytest.raises(ValueError, match="tolerance of one of"):
        Experiment.from_yaml(root / "tiny" / "chain.yaml", "tiny/chain")
    assert main(["reproduce", "nope/none", "--root", str(root)]) == 2
    assert "No experiment 'nope/none'" in capsys.readouterr().err
    check = Check("x", "v", {"abs": 0.5}, published=7.75)
    assert check.judge(8.2) and not check.judge(8.3) and not check.judge(float("nan"))


def test_connector_chain_reads_logged_metrics_and_the_path_range(tmp_path: Path, fake_fmnist_root: Path) -> None:
    """A connector step (t on [0, 2]) and its metrics.csv: endpoints are t = 0 and t = 2, logged metrics are named."""
    connect = {"id": "wa", "command": "test", "config": "configs/connect/fmnist_mlp1_connect.yaml",
               "args": ["--model.endpoints", "[{ckpt:mode0},{ckpt:mode1}]", "--model.finder", "with_bias_wa",
                        "--model.method", "lin", "--model.num_points", "5", "--model.wa_samples", "128",
                        "--model.output_dir", "{dir}", "--trainer.enable_progress_bar", "false"]}
    spec = {**TINY, "steps": [TINY["steps"][0], connect], "checks": [
        {"name": "max error from the path", "value": "wa.max_err - (100 - 100 * wa.summary_test_accuracy_min)",
         "published": 0.0, "tolerance": {"abs": 1e-3}, "source": "test"}]}
    root, out = tmp_path / "experiments", tmp_path / "out"
    _write(root, spec)
    assert main(["reproduce", "tiny/chain", "--root", str(root), "--out", str(out), "--", "--data.root",
                 str(fake_fmnist_root)]) == 0
    stats = json.loads((out / "report.json").read_text())["statistics"]["wa"]
    path = json.loads((out / "wa" / "path.json").read_text())
    assert path["coords"][-1] == [2.0]
    acc = path["accuracy"]
    assert stats["endpoint_acc"] == pytest.approx(50 * (acc[0] + acc[-1]))  # t = 1 is not an endpoint
    assert stats["train_acc_end"] == pytest.approx(100 * path["sets"]["train"]["accuracy"][-1])


def test_statistics_of_sets_metrics_and_zero_barriers(tmp_path: Path) -> None:
    sets = {"clean": {"loss": [0.5, 0.4, 0.3], "accuracy": [0.8, 0.9, 0.7], "loss_barrier": 0.0,
                      "accuracy_barrier": 0.0},
            "rand_image": {"loss": [2.3, 1.9, 1.5], "accuracy": [0.1, 0.3, 0.5], "loss_barrier": None,
                           "accuracy_barrier": None}}
    (tmp_path / "path.json").write_text(json.dumps({"coords": [[0.0], [0.5], [1.0]], **sets["clean"], "sets": sets}))
    stats = path_statistics(tmp_path / "path.json")
    assert stats["loss_barrier"] == 0.0 and stats["clean_loss_barrier"] == 0.0  # not "missing"
    assert stats["rand_image_acc_start"] == pytest.approx(10.0) and stats["rand_image_acc_end"] == pytest.approx(50.0)
    assert stats["clean_max_err"] == pytest.approx(30.0) and stats["rand_image_mid_acc"] == pytest.approx(30.0)
    assert np.isnan(stats["rand_image_loss_barrier"])
    logs = tmp_path / "lightning_logs" / "version_0"
    logs.mkdir(parents=True)
    (logs / "metrics.csv").write_text("epoch,step,train/loss,test/rand_image/acc,test/stitch/penalty\n"
                                      "0,9,0.7,,\n1,19,0.5,,\n1,19,,0.355,0.12\n")
    assert metric_statistics(tmp_path) == {"train_loss": 0.5, "test_rand_image_acc": 0.355,
                                           "test_stitch_penalty": 0.12}
    assert metric_statistics(tmp_path / "lightning_logs" / "none") == {}


SHIPPED = list(list_experiments(EXPERIMENTS))
SEEDS = ("000_mmc", "001_mcsurface", "002_distribution_connectors", "003_modelsym", "004_rethink_rebasin",
         "garipov_curves")


def test_every_seed_has_entries() -> None:
    for seed in SEEDS:  # a CPU entry on Fashion-MNIST and one on the seed's own data
        data = [Experiment.from_yaml(list_experiments(EXPERIMENTS)[n], n).data for n in SHIPPED
                if n.startswith(f"{seed}/")]
        assert any(d.startswith("Fashion-MNIST") for d in data), seed
        assert any(not d.startswith("Fashion-MNIST") for d in data), seed
    for name, path in list_experiments(EXPERIMENTS).items():
        exp = Experiment.from_yaml(path, name)
        assert exp.checks and all(c.source for c in exp.checks), name


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_entry_configs_parse(name: str, tmp_path: Path) -> None:
    assert main(["reproduce", name, "--print_config", "--out", str(tmp_path)]) == 0
