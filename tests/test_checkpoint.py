"""load_net: Lightning checkpoints, plain state dicts, and the documented errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmc_lightning import get_net, load_net, load_weights
from lmc_lightning.modules import EndpointModule


def _save_ckpt(tmp_path: Path, **kwargs) -> tuple[Path, EndpointModule]:
    import lightning.pytorch as pl

    model = EndpointModule(net="mlp", net_kwargs={"depth": 1, "width": 8}, **kwargs)
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, max_epochs=0)
    trainer.strategy.connect(model)
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    return path, model


def test_lightning_checkpoint_round_trip(tmp_path: Path) -> None:
    path, model = _save_ckpt(tmp_path, seed=3)
    net = load_net(path)
    x = torch.randn(4, 1, 28, 28)
    torch.testing.assert_close(net(x), model.net.eval()(x), rtol=0, atol=0)
    # the checkpoint is readable with weights_only=True (plain hparams only)
    torch.load(path, weights_only=True)


def test_plain_state_dict_needs_and_uses_the_net_name(tmp_path: Path) -> None:
    net = get_net("mlp", num_classes=10, in_channels=1, input_size=28, depth=1, width=8)
    path = tmp_path / "sd.pt"
    torch.save(net.state_dict(), path)
    with pytest.raises(ValueError, match="plain state dict"):
        load_net(path)
    loaded = load_net(path, net="mlp", num_classes=10, in_channels=1, input_size=28, depth=1, width=8)
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(loaded(x), net.eval()(x))


def test_mismatch_names_the_tensor_and_both_shapes(tmp_path: Path) -> None:
    path, _ = _save_ckpt(tmp_path)
    with pytest.raises(ValueError, match=r"layers\.0\.weight.*\(8, 784\).*\(16, 784\)|'.*weight'.*\(8, 784\)"):
        load_net(path, width=16)


def test_corrupt_and_missing_checkpoints(tmp_path: Path) -> None:
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match="Could not read checkpoint"):
        load_net(bad)
    with pytest.raises(FileNotFoundError, match="Checkpoint not found"):
        load_net(tmp_path / "missing.ckpt")
    path, _ = _save_ckpt(tmp_path)
    with pytest.raises(ValueError, match="no weights under 'net_a'"):
        load_weights(path, prefix="net_a")


def test_unknown_net_name_lists_available() -> None:
    with pytest.raises(ValueError, match="Available: .*mlp"):
        get_net("no_such_net")
