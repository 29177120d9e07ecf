"""The configs shipped for the rethink-re-basin seed parse (--print_config) and state its recipe."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lmc_lightning.cli import main

ROOT = Path(__file__).parents[1] / "configs"
CONFIGS = {
    "experiments/rebasin_pair_cifar10_vgg16.yaml": "fit",
    "experiments/rebasin_prune_fmnist.yaml": "test",
    "endpoint/cifar10_vgg16_bn.yaml": "fit",
    "endpoint/cifar10_resnet20.yaml": "fit",
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_config_prints(name: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([CONFIGS[name], "--config", str(ROOT / name), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"].startswith("lmc_lightning.modules.")


@pytest.mark.parametrize("name", ["experiments/rebasin_pair_cifar10_vgg16.yaml", "endpoint/cifar10_vgg16_bn.yaml",
                                  "endpoint/cifar10_resnet20.yaml"])
def test_seed_recipe(name: str) -> None:
    cfg = yaml.safe_load(open(ROOT / name))
    optim = cfg["model"]["init_args"]["optim"]
    assert (optim["lr"], optim["momentum"], optim["weight_decay"]) == (0.1, 0.9, 1.0e-4)
    # x0.1 at iterations 32k and 48k of 391 per epoch (50000 CIFAR-10 images, batch 128)
    assert optim["milestones"] == [round(32000 / 391, 2), round(48000 / 391, 2)] and optim["gamma"] == 0.1
    assert cfg["trainer"]["max_epochs"] == 160 and cfg["data"]["init_args"]["batch_size"] == 128
