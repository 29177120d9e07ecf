"""Global magnitude pruning (exact sparsity, made permanent, external pruners) and PruneModule under `lmc test`."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from torch import nn

from lmc_lightning.checkpoint import save_net
from lmc_lightning.cli import main
from lmc_lightning.modules import PruneModule
from lmc_lightning.nets import get_net
from lmc_lightning.prune import magnitude_masks, prunable_keys, prune, register_pruner, sparsity_of

pytestmark = pytest.mark.usefixtures("one_thread")


def net() -> nn.Module:
    torch.manual_seed(0)
    return get_net("vgg11", num_classes=10, in_channels=1, input_size=28, width=0.0625)


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.99])
def test_global_magnitude_pruning_reaches_the_sparsity_exactly(sparsity):
    model = net()
    keys = prunable_keys(model)
    assert keys[-1] == "classifier.weight" and all(k.endswith(".weight") for k in keys)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruned, masks = prune(model, sparsity)
    total = sum(before[k].numel() for k in keys)
    assert sum(int((~m).sum()) for m in masks.values()) == round(sparsity * total)
    assert sparsity_of(pruned, keys) == pytest.approx(round(sparsity * total) / total, abs=1e-12)
    # the smallest magnitudes went, globally: every pruned |w| <= every kept |w|
    flat_w = torch.cat([before[k].abs().reshape(-1) for k in keys])
    flat_m = torch.cat([masks[k].reshape(-1) for k in keys])
    if 0 < sparsity:
        assert flat_w[~flat_m].max() <= flat_w[flat_m].min()
    # made permanent: plain zeros, biases untouched, the net's own weights untouched
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
        if k not in keys:
            assert torch.equal(pruned[k], v)
    # the same as torch.nn.utils.prune.global_unstructured(L1Unstructured) + prune.remove
    ref = net()
    params = [(ref.get_submodule(k.rsplit(".", 1)[0]), "weight") for k in keys]
    torch.nn.utils.prune.global_unstructured(params, pruning_method=torch.nn.utils.prune.L1Unstructured,
                                             amount=sparsity)
    for module, name in params:
        torch.nn.utils.prune.remove(module, name)
    for k in keys:
        assert torch.equal(ref.state_dict()[k] == 0, pruned[k] == 0)


def test_external_pruner_hook_and_errors():
    model = net()

    def first_layer_only(net_, weights, keys, sparsity):
        masks = {k: torch.ones_like(weights[k], dtype=torch.bool) for k in keys}
        masks[keys[0]] = magnitude_masks(net_, weights, keys[:1], sparsity)[keys[0]]
        return masks

    register_pruner("first_layer_only", first_layer_only, overwrite=True)
    pruned, _ = prune(model, 0.5, pruner="first_layer_only")
    keys = prunable_keys(model)
    assert sparsity_of(pruned, keys[:1]) == pytest.approx(0.5, abs=0.02) and sparsity_of(pruned, keys[1:]) == 0
    with pytest.raises(ValueError, match="Unknown pruner"):
        prune(model, 0.5, pruner="woodfisher")
    with pytest.raises(ValueError, match="sparsity"):
        prune(model, 1.0)
    with pytest.raises(ValueError, match="no mask"):
        prune(model, 0.5, pruner=lambda *a: {})


def test_prune_module_writes_accuracy_vs_sparsity(fake_fmnist_root: Path, tmp_path: Path):
    model = net()
    ckpt = save_net(tmp_path / "dense.ckpt", model.state_dict(),
                    {"name": "vgg11", "num_classes": 10, "in_channels": 1, "input_size": 28, "width": 0.0625})
    out = tmp_path / "run"
    main(["test", "--model", "PruneModule", "--model.endpoints", f"[{ckpt}]", "--model.sparsity", "[0.5,0.9]",
          "--model.renorm", "rescale", "--model.num_samples", "64", "--model.output_dir", str(out),
          "--data", "FashionMNISTDataModule", "--data.root", str(fake_fmnist_root), "--trainer.accelerator", "cpu",
          "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
          "--trainer.default_root_dir", str(tmp_path)])
    rows = list(csv.DictReader(open(out / "prune.csv")))
    assert [float(r["sparsity"]) for r in rows] == [0.5, 0.9]
    assert all(r["renorm"] == "rescale" for r in rows)
    assert float(rows[1]["actual_sparsity"]) == pytest.approx(0.9, abs=1e-3)
    assert len({r["acc_dense"] for r in rows}) == 1
    assert (out / "prune.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="renorm must be"):
        PruneModule(renorm="bn")
    with pytest.raises(ValueError, match="sparsity"):
        PruneModule(sparsity=[0.5, 1.0])
    with pytest.raises(ValueError, match="one network"):
        PruneModule(endpoints=["a.ckpt", "b.ckpt"])
