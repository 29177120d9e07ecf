"""A minutes-long CPU version of ``stitching_fmnist.py`` on tensors (no Lightning loop), for the README figures.

Same library pieces (``stitch``, the stitching layers, ``bn_pass``, ``similarity_matrix``, ``transform_layer``,
``freeze_until``), shortened: mcnn width 0.125, endpoints trained 2 epochs on 10k images (Adam 1e-3, wd 1e-4),
stitches trained 2 epochs on ``N_STITCH`` images at batch 64 with Adam 1e-3 (Birkhoff: 1 warm-up epoch without the
scalars, then 1 with them), each evaluated on the first 2000 test images after the seed's no-grad BN pass (over the
stitch training images) with the endpoints under the same pass. Results go to ``LMC_OUT`` (``quick.json``).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from lmc_lightning.data.idx import read_idx
from lmc_lightning.metrics.similarity_functional import similarity_matrix
from lmc_lightning.modules.stitch import bn_pass
from lmc_lightning.nets import get_net
from lmc_lightning.nets.order import freeze_until
from lmc_lightning.stitching import _Rounded, make_layer, point_shapes, stitch, stitch_points
from lmc_lightning.weights.permutation.batches import capture_module
from lmc_lightning.weights.symmetry import transform_layer

ROOT = Path(os.environ.get("LMC_DATA", "/usr/share/datasets/fashion-mnist"))
OUT = Path(os.environ.get("LMC_OUT", "runs/stitching_quick"))
WIDTH = float(os.environ.get("LMC_WIDTH", 0.125))
N_STITCH = int(os.environ.get("LMC_N_STITCH", 4000))
SEEDS = [int(s) for s in os.environ.get("LMC_SEEDS", "0,1").split(",")]


def load(prefix: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(read_idx(ROOT / f"{prefix}-images-idx3-ubyte.gz")[:n]).float().div(255)
    y = torch.from_numpy(read_idx(ROOT / f"{prefix}-labels-idx1-ubyte.gz")[:n]).long()
    return ((x - 0.2860) / 0.3530).unsqueeze(1), y


def fit(params, model, x, y, epochs, batch, seed, on_epoch=None, after_step=None, extra_loss=None) -> None:
    opt = torch.optim.Adam(params, lr=1e-3, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        if on_epoch:
            on_epoch(epoch)
        model.train()
        for idx in torch.randperm(len(x), generator=gen).split(batch):
            loss = F.cross_entropy(model(x[idx]), y[idx]) + (extra_loss() if extra_loss else 0.0)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if after_step:
                after_step()


@torch.no_grad()
def accuracy(model, x, y) -> float:
    model.eval()
    return float(torch.cat([model(c).argmax(1) for c in x.split(500)]).eq(y).float().mean())


def main() -> None:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 1)))
    OUT.mkdir(parents=True, exist_ok=True)
    xtr, ytr = load("train", 10_000)
    xte, yte = load("t10k", 2000)
    xs, ys = xtr[:N_STITCH], ytr[:N_STITCH]
    bn_batches = list(xs.split(64))
    res: dict = {"width": WIDTH, "n_stitch": N_STITCH}
    nets = []
    for seed in SEEDS:
        torch.manual_seed(seed)
        net = get_net("mcnn", in_channels=1, input_size=28, width=WIDTH)
        fit(net.parameters(), net, xtr, ytr, 2, 64, seed)
        nets.append(net.eval())
    ends = []
    for net in nets:  # endpoints under the same BN pass as the stitched nets
        copy_ = copy.deepcopy(net)
        bn_pass(copy_, bn_batches)
        ends.append(accuracy(copy_, xte, yte))
    res["endpoint_acc"] = ends
    print("endpoints", ends, flush=True)
    shapes = point_shapes(nets[0], (1, 28, 28))
    rows = []
    for point in stitch_points(nets[0]):
        for kind in ("identity", "affine", "lowrank", "birkhoff"):
            torch.manual_seed(0)
            a, b = copy.deepcopy(nets[0]), copy.deepcopy(nets[1])
            for p in [*a.parameters(), *b.parameters()]:
                p.requires_grad_(False)
            layer = make_layer(kind, shapes[point][0], rank=1, alpha=0.1)
            model = stitch(a, b, point, layer)
            history = []
            if kind != "identity":
                def on_epoch(epoch, layer=layer, history=history):
                    if isinstance(layer, _Rounded):
                        layer.scalars_on = epoch >= 1
                        history.append(layer.distance_to_permutation())
                fit(list(layer.parameters()), model, xs, ys, 2, 64, 0, on_epoch, layer.project, layer.penalty)
            row = {"point": point, "layer": kind}
            state = {k: v.clone() for k, v in model.state_dict().items()}
            if isinstance(layer, _Rounded):
                layer.hard = False
                bn_pass(model, bn_batches, [layer])
                row["accuracy_soft"] = accuracy(model, xte, yte)
                layer.hard = True
                model.load_state_dict(state)
                row.update(layer.distance_to_permutation())
                row["history"] = history
            bn_pass(model, bn_batches, [layer])
            row["accuracy"] = accuracy(model, xte, yte)
            row["penalty"] = sum(ends) / 2 - row["accuracy"]
            rows.append(row)
            print(row, flush=True)
    res["stitch"] = rows
    feats = []
    for net in nets:
        gm = capture_module(net.eval(), stitch_points(net))
        with torch.no_grad():
            outs = [gm(c) for c in xte.split(500)]
        feats.append([torch.cat(p) for p in zip(*outs, strict=True)])
    res["similarity"] = {m: similarity_matrix(feats[0], feats[1], m).tolist()
                         for m in ("grelu_procrustes", "orthogonal_procrustes", "grelu_cka", "linear_cka")}
    print({m: [round(v[i][i], 3) for i in range(len(v))] for m, v in res["similarity"].items()}, flush=True)
    # sanity test: BN-free mcnn_k, a random map folded into conv l, layers <= l frozen, the rest retrained 1 epoch
    torch.manual_seed(0)
    base = get_net("mcnn_k", in_channels=1, input_size=28, width=WIDTH)
    fit(base.parameters(), base, xtr, ytr, 2, 64, 0)
    base_acc = accuracy(base, xte, yte)
    sanity = {"base_acc": base_acc}
    for layer_name in ("0", "2", "5"):
        for group in ("none", "grelu", "orthogonal"):  # "none": the same retraining without a map (control)
            moved = (copy.deepcopy(base) if group == "none"
                     else transform_layer(base, layer_name, group, seed=1, input_shape=(1, 28, 28)))
            before = accuracy(moved, xte, yte)
            freeze_until(moved, layer_name, (1, 28, 28))
            fit([p for p in moved.parameters() if p.requires_grad], moved, xtr, ytr, 1, 64, 0)
            acc = accuracy(moved, xte, yte)
            sanity[f"{group}_{layer_name}"] = {"before_retrain": before, "acc": acc, "penalty": base_acc - acc}
            print("sanity", group, layer_name, sanity[f"{group}_{layer_name}"], flush=True)
    res["sanity"] = sanity
    (OUT / "quick.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
