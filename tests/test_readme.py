"""What a new user runs: every row of the README's API/CLI table, the `lmc` script's exit codes, every shipped config.

The CLI rows are read from README.md and run as written (plus tiny-data overrides) through ``run``, the function the
``lmc`` console script calls; one test chains ``lmc fit ... && lmc test ...`` as subprocesses of that script.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmc_lightning.cli import main, run

ROOT = Path(__file__).parents[1]
# configs/experiments/<seed>/*.yaml are `lmc reproduce` chains (tests/test_reproduce.py parses each of their steps).
CONFIGS = sorted(c for c in (ROOT / "configs").rglob("*.yaml") if c.parent.parent.name != "experiments")
TINY_NET = '{"depth": 1, "width": 16}'
COMMON = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
          "--trainer.accelerator", "cpu"]


def readme_rows() -> list[tuple[str, str, str | None]]:
    """``(task, python, cli)`` per row of the README's API/CLI table (``cli`` None where there is no command)."""
    text = (ROOT / "README.md").read_text()
    lines = text[text.index("| Task | Python (notebook) | CLI |"):].splitlines()[2:]
    rows = []
    for line in lines:
        if not line.startswith("|"):
            break
        task, python, cli = (c.strip() for c in line.strip().strip("|").split("|")[:3])
        command = re.search(r"`(lmc [^`]+)`", cli)
        rows.append((task, python, command.group(1) if command else None))
    return rows


def tiny(command: str, data_root: Path) -> list[str]:
    """The README command's arguments plus overrides for tiny data and a few steps."""
    args = shlex.split(command)[1:]
    if "--help" in command or ".help" in command:
        return args
    extra = ["--data.root", str(data_root), *COMMON]
    if "configs/endpoint/" in command:
        extra += ["--model.net_kwargs", TINY_NET, "--data.val_split", "32"]
    if args[0] == "fit":
        extra += ["--trainer.max_epochs", "1", "--trainer.max_steps", "3", "--trainer.limit_val_batches", "1"]
    if "configs/interpolation/" in command or "configs/curve/" in command:
        extra += ["--model.num_points", "3"]
    return args + extra


@pytest.fixture(scope="module")
def workspace(fake_fmnist_root: Path, tmp_path_factory: pytest.TempPathFactory):
    """A fresh folder with the shipped configs, as the current directory (a new user's clone)."""
    folder = tmp_path_factory.mktemp("clone")
    (folder / "configs").symlink_to(ROOT / "configs")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        yield folder


@pytest.fixture(scope="module")
def rows() -> dict[str, tuple[str, str | None]]:
    return {task: (python, cli) for task, python, cli in readme_rows()}


@pytest.fixture(scope="module")
def trained(workspace: Path, rows, fake_fmnist_root: Path) -> list[Path]:
    """The "Train a mode" row for seeds 0 and 1; returns the two last.ckpt files where the README says they are."""
    command = rows["Train a mode"][1]
    for seed in (0, 1):
        seeded = command.replace("--seed_everything 0", f"--seed_everything {seed}").replace("seed0", f"seed{seed}")
        assert run(tiny(seeded, fake_fmnist_root)) == 0, seeded
    ckpts = [workspace / f"runs/EndpointModule/seed{seed}/checkpoints/last.ckpt" for seed in (0, 1)]
    assert all(c.is_file() for c in ckpts), sorted(map(str, workspace.rglob("*.ckpt")))
    return ckpts


def test_readme_table_has_the_rows_we_run(rows) -> None:
    assert {"Train a mode", "Test it", "Load a mode", "Linear barrier", "Align, then interpolate",
            "Fit a Bezier curve", "List architectures"} <= set(rows)


@pytest.fixture(scope="module")
def curve_ckpt(trained, rows, workspace: Path, fake_fmnist_root: Path) -> Path:
    """The "Fit a Bezier curve" row (between the two trained modes); returns its last.ckpt."""
    assert run(tiny(rows["Fit a Bezier curve"][1], fake_fmnist_root)) == 0
    (ckpt,) = (workspace / "runs/curve").rglob("last.ckpt")
    return ckpt


def test_cli_rows_exit_zero_and_write_where_the_readme_says(trained, curve_ckpt, rows, workspace: Path,
                                                              fake_fmnist_root: Path, capsys, caplog) -> None:
    import lmc_lightning

    assert run(tiny(rows["Test it"][1], fake_fmnist_root)) == 0
    lightning_log = logging.getLogger("lightning.pytorch")  # Lightning's messages do not propagate to the root
    lightning_log.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
            assert run(tiny(rows["Linear barrier"][1], fake_fmnist_root)) == 0
    finally:
        lightning_log.removeHandler(caplog.handler)
    barrier = sorted((workspace / "runs/interpolation").rglob("path.json"))
    assert len(barrier) == 1
    result = json.loads(barrier[0].read_text())
    assert len(result["loss"]) == 3 and math.isfinite(result["loss_barrier"])
    assert f"to {barrier[0].parent}" in caplog.text  # `lmc test` says where the files went
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(barrier[0].stat().st_mode) == 0o666 & ~umask  # the usual mode, like Lightning's files
    assert run(tiny(rows["Align, then interpolate"][1], fake_fmnist_root)) == 0
    aligned = sorted((workspace / "runs/interpolation").rglob("path.json"))[-1]
    assert json.loads(aligned.read_text())["meta"]["bn"] == "repair"
    assert curve_ckpt.is_file()
    with pytest.raises(SystemExit) as exit_info:
        main(tiny(rows["List architectures"][1], fake_fmnist_root))
    assert exit_info.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert all(name in help_text for name in lmc_lightning.nets.available())  # --model.net lists the nets


def test_curve_checkpoint_is_self_contained_and_checked(curve_ckpt: Path, workspace: Path, fake_fmnist_root: Path,
                                                        tmp_path: Path, capsys, monkeypatch) -> None:
    """`lmc test --ckpt_path` elsewhere needs no endpoint files; wrong or mistyped paths are one-line errors."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the endpoints' relative paths (runs/EndpointModule/...) do not resolve here
    base = ["test", "--config", str(ROOT / "configs/curve/fmnist_mlp.yaml"), "--model.num_points", "3",
            "--data.root", str(fake_fmnist_root), *COMMON]
    assert run([*base, "--ckpt_path", str(curve_ckpt)]) == 0
    (result,) = elsewhere.rglob("path.json")
    assert len(json.loads(result.read_text())["loss"]) == 3
    capsys.readouterr()
    assert run([*base, "--ckpt_path", str(curve_ckpt.with_name("lst.ckpt"))]) == 1
    assert f"lmc: error: FileNotFoundError: --ckpt_path {curve_ckpt.with_name('lst.ckpt')} does not exist" in (
        capsys.readouterr().err)
    endpoint = workspace / "runs/EndpointModule/seed0/checkpoints/last.ckpt"
    assert run([*base, "--ckpt_path", str(endpoint)]) == 1
    assert "was written by EndpointModule, but the config selects CurveModule" in capsys.readouterr().err


def test_python_rows(trained, rows, fake_fmnist_root: Path) -> None:
    import lmc_lightning
    from lmc_lightning.data import FashionMNISTDataModule
    from lmc_lightning.weights.paths import Linear

    assert 'load_net("runs/EndpointModule/seed0/checkpoints/last.ckpt")' in rows["Load a mode"][0]
    a, b = (lmc_lightning.load_net(c) for c in trained)
    data = FashionMNISTDataModule(root=str(fake_fmnist_root))
    result = lmc_lightning.evaluate_path(Linear(a.state_dict(), b.state_dict()), a, data, bn="auto", num_points=3,
                                         device="cpu")
    assert result.meta["bn"] is None and math.isfinite(result.loss_barrier)  # auto: an MLP has nothing to reset
    b2, perm = lmc_lightning.align(a, b, method="weight")
    x = torch.randn(4, 1, 28, 28)
    torch.testing.assert_close(b2(x), b(x))  # the same function, permuted
    assert "mlp" in lmc_lightning.nets.available()


def _console_script(folder: Path) -> Path:
    """An ``lmc`` script as pip writes it from pyproject's ``[project.scripts]`` entry."""
    scripts = (ROOT / "pyproject.toml").read_text().split("[project.scripts]", 1)[1]
    target = re.search(r'^lmc\s*=\s*"([^"]+)"', scripts, re.M).group(1)  # (tomllib needs Python 3.11)
    module, func = target.split(":")
    script = folder / "lmc"
    script.write_text(f"#!{sys.executable}\nimport sys\nfrom {module} import {func}\nsys.exit({func}())\n")
    script.chmod(0o755)
    return script


def test_lmc_script_chains_fit_and_test_and_reports_errors_in_one_line(fake_fmnist_root: Path,
                                                                        tmp_path: Path) -> None:
    _console_script(tmp_path)
    python_path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": python_path,
           "OMP_NUM_THREADS": "1"}
    args = " ".join(shlex.quote(a) for a in tiny("lmc fit --config configs/endpoint/fmnist_mlp.yaml", fake_fmnist_root))
    out = tmp_path / "out"
    fit = f"lmc {args} --trainer.default_root_dir {out}"
    test = (f"lmc {args.replace('fit', 'test', 1)} --trainer.default_root_dir {out} "
            f"--ckpt_path {out}/EndpointModule/version_0/checkpoints/last.ckpt")
    done = subprocess.run(["bash", "-c", f"{fit} && {test} && echo CHAINED"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "CHAINED" in done.stdout, done.stderr[-3000:]
    assert "LMCLightningCLI object" not in done.stderr
    assert (out / "EndpointModule/version_1/metrics.csv").is_file()  # the test run: default_root_dir honoured


def test_errors_are_one_line_first_traceback_on_request(fake_fmnist_root: Path, tmp_path: Path, capsys) -> None:
    args = ["test", "--model", "InterpolationModule", "--data", "FashionMNISTDataModule", "--data.root",
            str(fake_fmnist_root), "--trainer.default_root_dir", str(tmp_path), *COMMON]
    assert run(args) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("lmc:")]
    assert lines[0] == ("lmc: error: ValueError: InterpolationModule has no endpoints: pass "
                        "--model.endpoints [a.ckpt,b.ckpt].")
    assert "Traceback" not in err
    assert run([*args, "--traceback"]) == 1
    err = capsys.readouterr().err
    assert err.index("lmc: error: ValueError") < err.index("Traceback")


def _init(args: list[str]) -> tuple[dict[str, torch.Tensor], int]:
    cli = main(["fit", *args, "--trainer.max_steps", "0", "--trainer.logger", "false"])
    return {k: v.clone() for k, v in cli.model.net.state_dict().items()}, cli.datamodule.seed


def test_seed_everything_varies_the_run_and_explicit_seeds_win(fake_fmnist_root: Path, tmp_path: Path) -> None:
    base = tiny("lmc fit --config configs/endpoint/fmnist_mlp.yaml", fake_fmnist_root)[1:]
    base = [str(ROOT / a) if a.startswith("configs/") else a for a in base]
    base += ["--trainer.default_root_dir", str(tmp_path)]
    (one, seed_one), (again, _), (two, seed_two) = (_init([*base, "--seed_everything", s]) for s in "112")
    assert (seed_one, seed_two) == (1, 2)  # the data order and hold-out follow the run's seed
    assert all(torch.equal(one[k], again[k]) for k in one)
    assert any(not torch.equal(one[k], two[k]) for k in one)
    pinned = [_init([*base, "--seed_everything", s, "--model.seed", "7", "--data.seed", "3"]) for s in "12"]
    assert all(torch.equal(pinned[0][0][k], pinned[1][0][k]) for k in one) and pinned[0][1] == pinned[1][1] == 3


@pytest.mark.parametrize("config", CONFIGS, ids=[str(c.relative_to(ROOT / "configs")) for c in CONFIGS])
def test_shipped_config_prints(config: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code == 0
    assert "class_path: lmc_lightning" in capsys.readouterr().out


def test_bare_import_reaches_the_subpackages() -> None:
    import lmc_lightning

    # the module-level __getattr__ that `lmc_lightning.nets` falls back to after a bare `import lmc_lightning`
    assert "mlp" in lmc_lightning.__getattr__("nets").available()
    with pytest.raises(AttributeError, match="no attribute 'nots'"):
        lmc_lightning.__getattr__("nots")


def test_path_test_logs_a_summary_a_figure_and_shows_progress(trained, fake_fmnist_root: Path, tmp_path: Path,
                                                             capsys) -> None:
    """`lmc test` on a path: barriers and endpoint values as scalars, the curve as an image, bars over matching and
    points."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = ["test", "--model", "InterpolationModule", "--model.endpoints", f"[{trained[0]},{trained[1]}]",
            "--model.num_points", "5", "--data", "FashionMNISTDataModule", "--data.root", str(fake_fmnist_root),
            "--trainer.logger", "TensorBoardLogger", "--trainer.logger.init_args.save_dir", str(tmp_path),
            "--trainer.accelerator", "cpu", "--model.align", "weight"]
    cli = main(args)
    metrics = set(cli.trainer.callback_metrics)
    assert metrics == {f"barrier/{n}" for n in ("loss", "accuracy", "loss_mean", "accuracy_mean")} | {
        f"endpoint/{m}_t={t}" for m in ("loss", "acc") for t in ("0.00", "1.00")}
    events = EventAccumulator(str(next(tmp_path.rglob("events.out.tfevents.*")).parent))
    events.Reload()
    assert "path" in events.Tags()["images"]
    err = capsys.readouterr().err
    assert "InterpolationModule: test points" in err  # the bar over the 5 points
    assert re.search(r"InterpolationModule: weight matching: [0-9]+round", err)  # and one over matching rounds
    main([*args, "--trainer.enable_progress_bar", "false"])
    err = capsys.readouterr().err
    assert "test points" not in err and "weight matching:" not in err
