"""The seeds' checkpoint formats: wrapped state dicts, DataParallel prefixes, key maps, and the mismatch listing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from lmc_lightning import get_net, load_net, load_weights
from lmc_lightning.checkpoint import apply_key_map, key_maps
from lmc_lightning.cli import main

MLP = {"num_classes": 10, "in_channels": 1, "input_size": 28}


def _mlp(depth: int = 1, width: int = 8, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return get_net("mlp", **MLP, depth=depth, width=width).eval()


def test_mcsurface_model_state_dict_wrapper(tmp_path: Path) -> None:
    """find_modes.py saves {'epoch', 'model_state_dict', 'optimizer_state_dict', 'loss', 'accuracy'}."""
    net = _mlp()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.randn(2, 1, 28, 28)).sum().backward()
    opt.step()
    path = tmp_path / "model_epoch_160.pth"
    torch.save({"epoch": 160, "model_state_dict": net.state_dict(), "optimizer_state_dict": opt.state_dict(),
                "loss": 0.1, "accuracy": 93.2}, path)
    loaded = load_net(path, net="mlp", **MLP, depth=1, width=8)
    x = torch.randn(5, 1, 28, 28)
    torch.testing.assert_close(loaded(x), net(x), rtol=0, atol=0)


def test_dc_model_state_with_linear_one_layer_keys(tmp_path: Path) -> None:
    """distribution-connector saves {'epoch', 'model_state', 'optimizer_state'}; LinearOneLayer names fc.0 / fc.2."""
    torch.manual_seed(1)
    theirs = nn.Sequential(nn.Linear(784, 20), nn.ReLU(), nn.Linear(20, 10))
    path = tmp_path / "checkpoint-400.pt"
    torch.save({"epoch": 400, "model_state": {f"fc.{k}": v for k, v in theirs.state_dict().items()},
                "optimizer_state": {}}, path)
    with pytest.raises(ValueError, match=r"(?s)not in the checkpoint: 'hidden\.0\.weight'.*architecture lacks: "
                                         r"'fc\.0\.weight'.*key map"):
        load_net(path, net="mlp", **MLP, depth=1, width=20)
    loaded = load_net(path, net="mlp", key_map="dc_linear_one_layer", **MLP, depth=1, width=20)
    x = torch.randn(5, 1, 28, 28)
    torch.testing.assert_close(loaded(x), theirs(x.flatten(1)), rtol=0, atol=0)


def test_dc_linear_base_map_and_dataparallel_prefix(tmp_path: Path) -> None:
    torch.manual_seed(2)
    layers = [nn.Linear(784, 12, bias=False), nn.Linear(12, 12, bias=False), nn.Linear(12, 10, bias=False)]
    state = {f"module.linear_layers.{i}.weight": m.weight.detach() for i, m in enumerate(layers)}
    path = tmp_path / "fc3.pt"
    torch.save({"model_state": state}, path)
    loaded = load_net(path, net="mlp", key_map="dc_linear", **MLP, depth=2, width=12, bias=False)
    x = torch.randn(3, 1, 28, 28)
    expected = layers[2](torch.relu(layers[1](torch.relu(layers[0](x.flatten(1))))))
    torch.testing.assert_close(loaded(x), expected, rtol=1e-6, atol=1e-6)


def test_regex_rules_and_errors(tmp_path: Path) -> None:
    net = _mlp()
    renamed = {k.replace("hidden.", "body."): v for k, v in net.state_dict().items()}
    path = tmp_path / "renamed.pt"
    torch.save({"state_dict": renamed}, path)  # a non-Lightning {'state_dict': ...}
    state, spec = load_weights(path, key_map={r"^body\.": "hidden."})
    assert spec is None and set(state) == set(net.state_dict())
    with pytest.raises(ValueError, match="Unknown key map 'nope'.*dc_linear"):
        apply_key_map(renamed, "nope")
    with pytest.raises(ValueError, match="renames two keys"):
        apply_key_map(renamed, {".*": "x"})
    torch.save({"epoch": 3, "weights": [1, 2]}, tmp_path / "odd.pt")
    with pytest.raises(ValueError, match="holds no state dict under"):
        load_weights(tmp_path / "odd.pt")
    assert {"dataparallel", "dc_linear", "dc_linear_one_layer", "mcsurface_vit"} <= set(key_maps())


def test_cli_key_map_on_path_module(tmp_path: Path, fake_fmnist_root: Path) -> None:
    files = []
    for seed in (0, 1):
        net = _mlp(width=16, seed=seed)
        files.append(tmp_path / f"m{seed}.pth")
        torch.save({"model_state": {k.replace("hidden.0", "fc.0").replace("classifier", "fc.2"): v
                                    for k, v in net.state_dict().items()}}, files[-1])
    cli = main(["test", "--model", "InterpolationModule", "--model.endpoints", f"[{files[0]},{files[1]}]",
                "--model.net", "mlp", "--model.net_kwargs", '{"depth": 1, "width": 16}',
                "--model.key_map", "dc_linear_one_layer", "--model.num_points", "3",
                "--model.output_dir", str(tmp_path / "out"), "--data", "FashionMNISTDataModule",
                "--data.root", str(fake_fmnist_root), "--trainer.enable_progress_bar", "false",
                "--trainer.default_root_dir", str(tmp_path), "--trainer.accelerator", "cpu"])  # fp32, as `direct`
    x, y = cli.datamodule.split_tensors("test")
    with torch.no_grad():
        direct = nn.functional.cross_entropy(_mlp(width=16, seed=0)(x), y).item()
    assert cli.model.result.loss[0] == pytest.approx(direct, abs=1e-5)
