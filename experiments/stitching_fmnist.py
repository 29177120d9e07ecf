"""Stitching and representation similarity of two Fashion-MNIST CNNs (the modelsym seed's experiments, small).

1. Two Myrtle CNNs (``mcnn``, width 0.25) from different seeds, the seed's zoo optimiser (Adam 1e-3, wd 1e-4).
2. Stitching penalty at every ReLU for identity (untrained), affine, rank-1 and Birkhoff (G_ReLU) stitches
   (``stitch_sweep``), endpoints and stitched nets under the same no-grad BN protocol.
3. G_ReLU- vs orthogonal-Procrustes similarity and G_ReLU / linear CKA per layer (``SimilarityModule``).
4. Sanity test: a random G_ReLU or orthogonal map folded into a conv of a BN-free ``mcnn_k``, the layers up to it
   frozen, the rest retrained (``transform_layer`` + ``EndpointModule(init=..., freeze=...)``).

Environment: ``LMC_EPOCHS`` (endpoint/retrain epochs, default 3), ``LMC_STITCH_EPOCHS`` (default 2 x LMC_EPOCHS),
``LMC_SUBSET`` (training images, default 20000), ``LMC_REUSE=1`` (keep endpoints already in LMC_OUT),
``LMC_WIDTH`` (net width, default 0.25), ``LMC_SIM_SAMPLES``
(test images of the similarity metrics, default 10000), ``LMC_OUT`` (output folder), ``LMC_DATA`` (Fashion-MNIST).

    OMP_NUM_THREADS=1 LMC_EPOCHS=2 LMC_SUBSET=2000 LMC_WIDTH=0.125 python experiments/stitching_fmnist.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning.pytorch as pl
import torch

from lmc_lightning import load_net
from lmc_lightning.checkpoint import save_net
from lmc_lightning.data import FashionMNISTDataModule
from lmc_lightning.modules import EndpointModule, OptimConfig, SimilarityModule
from lmc_lightning.stitch_sweep import stitch_sweep
from lmc_lightning.weights.symmetry import transform_layer

EPOCHS = int(os.environ.get("LMC_EPOCHS", 3))
STITCH_EPOCHS = int(os.environ.get("LMC_STITCH_EPOCHS", 2 * EPOCHS))
SUBSET = int(os.environ.get("LMC_SUBSET", 20_000))
WIDTH = float(os.environ.get("LMC_WIDTH", 0.25))
SIM_SAMPLES = int(os.environ.get("LMC_SIM_SAMPLES", 10_000))
OUT = Path(os.environ.get("LMC_OUT", "runs/stitching"))
ROOT = os.environ.get("LMC_DATA", "/usr/share/datasets/fashion-mnist")
ZOO = OptimConfig(optimizer="adam", lr=1e-3, weight_decay=1e-4, scheduler="multistep",
                  milestones=[EPOCHS / 4 * k for k in (1, 2, 3)], gamma=0.5)


def data(batch_size: int = 32) -> FashionMNISTDataModule:
    return FashionMNISTDataModule(root=ROOT, batch_size=batch_size, eval_batch_size=1000, train_subset=SUBSET)


def trainer(epochs: int) -> pl.Trainer:
    return pl.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=str(OUT))


def train(net: str, seed: int, path: Path, init: str | None = None, freeze: str | None = None) -> float:
    """Train (or retrain) an endpoint, save it, return its test accuracy."""
    pl.seed_everything(seed, verbose=False)
    dm = data(128)
    reuse = init is None and path.exists() and os.environ.get("LMC_REUSE") == "1"
    model = EndpointModule(net=net, net_kwargs={"width": WIDTH}, num_classes=10, input_shape=(1, 28, 28), optim=ZOO,
                           seed=seed, init=str(path) if reuse else init, freeze=freeze)
    t = trainer(EPOCHS)
    if reuse:  # LMC_REUSE=1: keep an endpoint already trained in LMC_OUT
        return float(t.test(model, datamodule=dm, verbose=False)[0]["test/acc"])
    t.fit(model, datamodule=dm)
    save_net(path, model.net.state_dict(), {"name": net, "num_classes": 10, "in_channels": 1, "input_size": 28,
                                            "width": WIDTH})
    return float(t.test(model, datamodule=dm, verbose=False)[0]["test/acc"])


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    results: dict = {"epochs": EPOCHS, "stitch_epochs": STITCH_EPOCHS, "subset": SUBSET, "width": WIDTH,
                     "similarity_samples": SIM_SAMPLES}
    # 1. endpoints
    ends = [OUT / f"mcnn_{s}.ckpt" for s in (0, 1)]
    results["endpoint_acc"] = [train("mcnn", s, p) for s, p in zip((0, 1), ends, strict=True)]
    # 2. stitching sweep (seed protocol, shortened: warm-up = half the epochs)
    rows = stitch_sweep([str(p) for p in ends], data(32), ["identity", "affine", "lowrank", "birkhoff"],
                        epochs=STITCH_EPOCHS, output_dir=OUT, rank=1, alpha=0.1, warmup_epochs=STITCH_EPOCHS // 2)
    results["stitch"] = rows
    # 3. similarity per layer
    sim = SimilarityModule(endpoints=[str(p) for p in ends], output_dir=str(OUT), num_samples=SIM_SAMPLES,
                           metrics=["grelu_procrustes", "orthogonal_procrustes", "grelu_cka", "linear_cka"],
                           input_shape=(1, 28, 28))
    trainer(1).test(sim, datamodule=data(1000), verbose=False)
    results["similarity"] = {m: v.tolist() for m, v in sim.results.items()}
    results["points"] = sim.point_names[0]
    # 4. sanity test on a BN-free mcnn_k
    base_path = OUT / "mcnn_k.ckpt"
    base = train("mcnn_k", 0, base_path)
    sanity = {"base_acc": base}
    for layer in ("0", "2", "5"):
        for group in ("grelu", "orthogonal"):
            moved = transform_layer(load_net(base_path), layer, group, seed=1, input_shape=(1, 28, 28))
            path = OUT / f"mcnn_k_{group}_{layer}.ckpt"
            save_net(path, moved.state_dict(), {"name": "mcnn_k", "num_classes": 10, "in_channels": 1,
                                                "input_size": 28, "width": WIDTH})
            acc = train("mcnn_k", 0, path, init=str(path), freeze=layer)
            sanity[f"{group}_{layer}"] = {"acc": acc, "penalty": base - acc}
            print(f"sanity: {group} map at layer {layer}: penalty {base - acc:.4f}", flush=True)
    results["sanity"] = sanity
    (OUT / "results.json").write_text(json.dumps(results, indent=1, default=float))
    print(json.dumps({k: v for k, v in results.items() if k != "stitch"}, indent=1, default=float)[:3000])


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 1)))
    main()
