"""CLI: `lmc fit` then `lmc test` through main([...]), help output, and bad-config errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmc_lightning import load_net
from lmc_lightning.cli import main


def _fit_args(root: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--config", "configs/endpoint/fmnist_mlp.yaml",
        "--data.root", str(root), "--data.batch_size", "32", "--data.val_split", "64",
        "--model.net_kwargs", '{"depth": 1, "width": 16}',
        "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "2",
        "--trainer.default_root_dir", str(out), "--trainer.logger.class_path", "CSVLogger",
        "--trainer.logger.init_args.save_dir", str(out), "--trainer.enable_progress_bar", "false", *extra,
    ]


def test_fit_then_test_writes_checkpoint_and_metrics(fake_fmnist_root: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(Path(__file__).parents[1])
    main(["fit", *_fit_args(fake_fmnist_root, tmp_path)])
    ckpts = sorted(tmp_path.rglob("last.ckpt"))
    assert ckpts, "fit wrote no last.ckpt"
    net = load_net(ckpts[0])
    assert net(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    cli = main(["test", *_fit_args(fake_fmnist_root, tmp_path), "--ckpt_path", str(ckpts[0])])
    metrics = cli.trainer.callback_metrics
    assert {"test/loss", "test/acc"} <= set(metrics)
    assert 0.0 <= float(metrics["test/acc"]) <= 1.0


def test_fast_dev_run_fit(fake_fmnist_root: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(Path(__file__).parents[1])
    cli = main(["fit", *_fit_args(fake_fmnist_root, tmp_path, "--trainer.fast_dev_run", "true")])
    assert cli.trainer.state.finished
    assert cli.trainer.state.finished
    # num_classes and input_shape were linked from the datamodule into the model
    assert cli.model.num_classes == 10 and cli.model.input_shape == (1, 28, 28)


@pytest.mark.parametrize("logger", ["CSVLogger", "TensorBoardLogger"])
def test_loggers_write_to_the_run_folder(logger: str, fake_fmnist_root: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(Path(__file__).parents[1])
    args = [(logger if a == "CSVLogger" else a) for a in _fit_args(fake_fmnist_root, tmp_path)]
    cli = main(["fit", *args])
    assert type(cli.trainer.logger).__name__ == logger
    pattern = "metrics.csv" if logger == "CSVLogger" else "events.out.tfevents.*"
    assert list(tmp_path.rglob(pattern)), f"{logger} wrote no {pattern}"


def test_help_lists_model_arguments(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--model.help", "EndpointModule"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--model.net NET" in out and "--model.optim.help" in out


def test_unknown_net_in_config_is_a_clear_error(fake_fmnist_root: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(Path(__file__).parents[1])
    with pytest.raises(ValueError, match="Unknown net 'resnet999'"):
        main(["fit", *_fit_args(fake_fmnist_root, tmp_path, "--model.net", "resnet999")])


def test_wandb_logger_offline_or_clear_error(fake_fmnist_root: Path, tmp_path: Path, monkeypatch) -> None:
    """With wandb installed an offline run is written; without it, the error names the extra to install."""
    import importlib.util

    monkeypatch.chdir(Path(__file__).parents[1])
    args = [("WandbLogger" if a == "CSVLogger" else a) for a in _fit_args(fake_fmnist_root, tmp_path)]
    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(SystemExit, match=r"lmc_lightning\[wandb\]"):
            main(["fit", *args, "--trainer.fast_dev_run", "true"])
        return
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    cli = main(["fit", *args, "--trainer.logger.init_args.offline", "true"])
    assert type(cli.trainer.logger).__name__ == "WandbLogger"
    assert list(tmp_path.rglob("offline-run-*")), "no offline wandb run was written"


def test_fit_from_init_with_frozen_layers(fake_fmnist_root: Path, tmp_path: Path, monkeypatch) -> None:
    """`lmc fit --model.init a.ckpt --model.freeze hidden`: starts from a.ckpt, the frozen layer does not move."""
    monkeypatch.chdir(Path(__file__).parents[1])
    main(["fit", *_fit_args(fake_fmnist_root, tmp_path / "a")])
    first = sorted((tmp_path / "a").rglob("last.ckpt"))[0]
    net_a = load_net(first)
    frozen = "hidden"
    cli = main(["fit", *_fit_args(fake_fmnist_root, tmp_path / "b", "--model.init", str(first),
                                  "--model.freeze", frozen)])
    net_b = cli.model.net
    for name, param in net_b.named_parameters():
        same = torch.equal(param.detach().cpu(), net_a.state_dict()[name])
        assert same == name.startswith(frozen + "."), name


def test_default_progress_bar_refreshes_every_ten_batches(fake_fmnist_root: Path, tmp_path: Path,
                                                          monkeypatch) -> None:
    """The CLI's default bar redraws every 10 batches; a bar given in trainer.callbacks keeps its refresh rate."""
    from lightning.pytorch.callbacks import TQDMProgressBar

    monkeypatch.chdir(Path(__file__).parents[1])
    args = _fit_args(fake_fmnist_root, tmp_path)[:-2] + ["--trainer.fast_dev_run", "true"]  # progress bar on
    cli = main(["fit", *args])
    assert type(cli.trainer.progress_bar_callback) is TQDMProgressBar
    assert cli.trainer.progress_bar_callback.refresh_rate == 10
    cli = main(["fit", *args, "--trainer.callbacks+=TQDMProgressBar", "--trainer.callbacks.refresh_rate", "1"])
    assert cli.trainer.progress_bar_callback.refresh_rate == 1


@pytest.mark.parametrize("name", ["fmnist_mlp", "fmnist_resnet20"])
def test_gpu_config_trains_the_plain_configs_weights(name: str, fake_fmnist_root: Path, tmp_path: Path,
                                                     monkeypatch) -> None:
    """configs/endpoint/<name>_gpu.yaml (device-resident, 16 steps per Lightning batch) trains the same weights as
    <name>.yaml with device_resident, here on the CPU with a narrow net."""
    monkeypatch.chdir(Path(__file__).parents[1])
    kwargs = '{"depth": 1, "width": 16}' if name == "fmnist_mlp" else '{"width": 0.25, "norm": "bn"}'
    states = []
    for config, extra in ((f"{name}_gpu", []), (name, ["--data.device_resident", "true"])):
        out = tmp_path / config
        main(["fit", "--config", f"configs/endpoint/{config}.yaml", "--data.root", str(fake_fmnist_root),
              "--data.batch_size", "8", "--data.val_split", "64",
              "--model.net_kwargs", kwargs, "--trainer.accelerator", "cpu", "--trainer.max_epochs", "1",
              "--trainer.limit_val_batches", "1", "--trainer.default_root_dir", str(out), "--trainer.logger", "false",
              "--trainer.enable_progress_bar", "false", *extra])
        (ckpt,) = out.rglob("last.ckpt")
        states.append(torch.load(ckpt, map_location="cpu", weights_only=True))
    (chunked, plain) = states
    assert chunked["global_step"] == plain["global_step"] == 24  # (256 - 64) / 8 steps: chunks of 16 and 8
    assert all(torch.equal(chunked["state_dict"][k], plain["state_dict"][k]) for k in plain["state_dict"])
