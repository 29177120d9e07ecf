"""`lmc reproduce`: the chain runs, figures are judged against published values; every shipped entry parses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lmc_lightning.cli import main, run
from lmc_lightning.reproduce import EXPERIMENTS, Check, Experiment, list_experiments, path_statistics

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


SHIPPED = list(list_experiments(EXPERIMENTS))


def test_every_seed_has_entries() -> None:
    seeds = {name.split("/")[0] for name in SHIPPED}
    assert {"001_mcsurface", "004_rethink_rebasin", "garipov_curves"} <= seeds
    for name, path in list_experiments(EXPERIMENTS).items():
        exp = Experiment.from_yaml(path, name)
        assert exp.checks and all(c.source for c in exp.checks), name


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_entry_configs_parse(name: str, tmp_path: Path) -> None:
    assert main(["reproduce", name, "--print_config", "--out", str(tmp_path)]) == 0
