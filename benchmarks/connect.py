"""Benchmark: a step-wise WA path (Anokhin & Yarotsky's ``PointFinderStepWiseButterflyConvWBiasWA`` with the final
layer step, our ``stepwise_wa``) between two Garipov VGG16s, ours against the seed's way, in the same run.

(a) the seed's way, per point: the partial net's features for the re-fitted layer computed through a DataLoader
    from host memory (batch 128, ``.cpu().numpy()`` per batch, patches cut by Python loops over the padded map, every
    second kept), ``np.linalg.pinv`` of the float32 features on the host, ``W F1^T pinv(F2^T)``, then the point's
    loss and accuracy through a host DataLoader. Net 1's features ``F1`` are precomputed once (as the seed does in
    ``__init__``), outside the timing. Timed on a few points (``--seed-points``) spread over the steps; the table
    gives seconds per point and the projection to all points.
(b) ours: :func:`lmc_lightning.weights.connect.connector_path` (targets cached on the device, WA by
    ``torch.linalg.lstsq`` in float64 on the device) precomputed at every point
    (:meth:`~lmc_lightning.weights.paths.NonlinearPath.precompute`), then evaluated by
    :func:`lmc_lightning.weights.evaluate.evaluate_path`; and the same path evaluated directly (weights computed
    inside the evaluator, point by point).

Data: CIFAR-10 is not on the GPU machine, so real Fashion-MNIST images are zero-padded to 32x32 and repeated to three
channels (CIFAR-shaped). Endpoints: two VGG16s (seeds 0 and 1) trained first on ``--fit`` images for ``--epochs``
epochs (capped at ``--train-seconds`` each; bf16 autocast on CUDA): on untrained nets the WA re-fits are
ill-conditioned and the path diverges. Then ``--train`` training images for the WA features, ``--test`` images for
evaluation, everything in float32 (no autocast, TF32 off). Both ways compute the same WA solve (up to float32 pinv
vs float64 lstsq); the table reports the largest test-loss and accuracy differences at the timed points, and
``--out`` writes them, the timings and the whole path to ``connect.json``.

    python benchmarks/connect.py --device cuda --out runs/connect   # GPU: VGG16, 61 points
    python benchmarks/connect.py --quick                            # tiny CPU run (VGG16 x1/8, 13 points)
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lmc_lightning.nets import get_net
from lmc_lightning.weights.connect import StepwisePath, connect, connector_path, out_samples
from lmc_lightning.weights.evaluate import evaluate_path


def fmnist_cifar_shaped(n_train: int, n_test: int) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """Real Fashion-MNIST, normalised, zero-padded to 32x32 and repeated to 3 channels."""
    from lmc_lightning.data import FashionMNISTDataModule

    dm = FashionMNISTDataModule(root="data", train_subset=n_train)
    dm.setup("fit")
    dm.setup("test")

    def shape(xy: tuple[Tensor, Tensor], n: int) -> tuple[Tensor, Tensor]:
        x, y = xy[0][:n], xy[1][:n]
        return F.pad(x, (2, 2, 2, 2)).repeat(1, 3, 1, 1).contiguous(), y

    return shape(dm.split_tensors("train"), n_train), shape(dm.split_tensors("test"), n_test)


def _seed_patches(funcs: Tensor, kernel: int = 3, padding: int = 1) -> list[np.ndarray]:
    """The seed's ``get_funcs`` patch cut for one batch (Python loops over positions, position-major)."""
    every = max(funcs.shape[-1] // 2, 1)
    funcs = F.pad(funcs, (padding,) * 4)
    _, _, width, high = funcs.shape
    out = [funcs[:, :, i:i + kernel, j:j + kernel] for i in range(0, width - kernel + 1, every)
           for j in range(0, high - kernel + 1, every)]
    cat = torch.cat(out, 0)
    return list(cat.reshape(cat.shape[0], -1).cpu().numpy())


def seed_features(net: nn.Module, weights: dict[str, Tensor], loader: DataLoader, layer_name: str, conv: bool,
                  device: torch.device) -> np.ndarray:
    """Features at the input of ``layer_name`` through a host loader, as the seed gathers them."""
    model = net.to(device)
    model.load_state_dict(weights)
    module = model.get_submodule(layer_name)
    caught: list[Tensor] = []
    handle = module.register_forward_pre_hook(lambda m, args: caught.append(args[0]))
    rows: list[np.ndarray] = []
    with torch.no_grad():
        for (x,) in loader:
            caught.clear()
            model(x.to(device))
            f = caught[0]
            rows.extend(_seed_patches(f) if conv else list(f.reshape(len(f), -1).cpu().numpy()))
    handle.remove()
    out = np.array(rows)
    return out[::2] if conv else out


def seed_point(path: StepwisePath, net: nn.Module, t: float, train_loader: DataLoader,
               test_loader: DataLoader, f1: dict[int, np.ndarray], device: torch.device) -> tuple[float, float]:
    """One point of the seed's step-wise conv WA finder, then its test loss and accuracy through a host loader."""
    chain = path.chain
    layer = min(int(math.floor(t)), len(chain) - 1)
    s = t - layer
    w = {k: v.to(device) for k, v in path.a.items()}
    for k in range(layer):
        w[chain[k].weight] = path.b[chain[k].weight]
        if chain[k].bias:
            w[chain[k].bias] = path.b[chain[k].bias]
    w[chain[layer].weight] = connect(path.w_hat[layer], path.b[chain[layer].weight], s, path.method)
    if chain[layer].bias:
        w[chain[layer].bias] = connect(path.a[chain[layer].bias], path.b[chain[layer].bias], s, path.method)
    if layer + 1 < len(chain):
        nxt = chain[layer + 1]
        f2 = seed_features(net, w, train_loader, nxt.name, nxt.conv, device)
        w1 = out_samples(path.a[nxt.weight]).cpu().numpy()
        adjusted = w1 @ f1[layer + 1].T @ np.linalg.pinv(f2.T)
        w[nxt.weight] = torch.from_numpy(adjusted).reshape(path.a[nxt.weight].shape).to(device)
    model = net.to(device)
    model.load_state_dict(w)
    loss, correct, n = 0.0, 0, 0
    with torch.no_grad():
        for x, y in test_loader:
            logits = model(x.to(device))
            y = y.to(device)
            loss += F.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(-1) == y).sum().item()
            n += len(y)
    return loss / n, correct / n


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_vgg(seed: int, data: tuple[Tensor, Tensor], width: float, epochs: int, seconds: float, lr: float,
              batch_size: int, device: torch.device) -> tuple[nn.Module, dict[str, float]]:
    """A Garipov VGG16 trained from seed ``seed`` on ``data`` (SGD, momentum 0.9, wd 5e-4, linear warm-up over the
    first 5% of steps, then linear decay to 0).

    Steps: ``epochs`` epochs, or fewer when ``seconds`` would be exceeded: the speed is measured between steps 10 and
    40 and the plan (and its schedule) fixed from it. bf16 autocast and channels_last on CUDA.
    """
    torch.manual_seed(seed)
    net = get_net("vgg16_garipov", num_classes=10, in_channels=3, input_size=32, width=width).to(device)
    cuda = device.type == "cuda"
    if cuda:
        net = net.to(memory_format=torch.channels_last)
    x, y = data
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(seed)
    per_epoch = math.ceil(len(y) / batch_size)
    total, done, probe = epochs * per_epoch, 0, (10, 40)
    net.train()
    sync(device)
    start = time.perf_counter()
    probe_start = start
    while done < total:
        for idx in torch.randperm(len(y), generator=gen).split(batch_size):
            if done == total:
                break
            frac = (done + 1) / total
            for group in opt.param_groups:
                group["lr"] = lr * min(frac / 0.05, (1 - frac) / 0.95, 1.0)
            idx = idx.to(x.device)
            xb, yb = x[idx].to(device, non_blocking=True), y[idx].to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                loss = F.cross_entropy(net(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            done += 1
            if done in probe:  # fix the plan from the speed measured between the probe steps (warm)
                sync(device)
                now = time.perf_counter()
                if done == probe[0]:
                    probe_start = now
                else:
                    rate = (probe[1] - probe[0]) / (now - probe_start)
                    total = max(done + 1, min(total, done + int((seconds - (now - start)) * rate)))
    sync(device)
    net = net.to(memory_format=torch.contiguous_format).eval()
    return net, {"seconds": time.perf_counter() - start, "steps": done, "epochs": done / per_epoch,
                 "last_batch_loss": loss.item(), "lr": lr}


def accuracy(net: nn.Module, x: Tensor, y: Tensor, device: torch.device, batch_size: int = 1000) -> float:
    """Test accuracy of ``net`` in float32."""
    with torch.no_grad():
        correct = sum(int((net(xb.to(device)).argmax(-1) == yb.to(device)).sum())
                      for xb, yb in zip(x.split(batch_size), y.split(batch_size), strict=True))
    return correct / len(y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny CPU settings")
    parser.add_argument("--width", type=float, default=1.0, help="VGG16 width multiplier")
    parser.add_argument("--points", type=int, default=61)
    parser.add_argument("--fit", type=int, default=60000, help="training images for the endpoints")
    parser.add_argument("--epochs", type=int, default=6, help="endpoint training epochs (at most)")
    parser.add_argument("--train-seconds", type=float, default=40.0, help="endpoint training time cap, per net")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--min-accuracy", type=float, default=0.5,
                        help="an endpoint below this test accuracy is trained again, once, at lr / 5")
    parser.add_argument("--train", type=int, default=10000, help="training images for the WA features")
    parser.add_argument("--test", type=int, default=10000)
    parser.add_argument("--seed-points", type=int, default=3, help="points timed the seed's way")
    parser.add_argument("--out", default=None, help="folder for results.json (optional)")
    args = parser.parse_args()
    if args.quick:
        args.device, args.width, args.points, args.train, args.test, args.seed_points = "cpu", 0.125, 13, 400, 500, 2
        args.fit, args.epochs, args.batch_size, args.lr, args.min_accuracy = 3000, 1, 128, 0.02, 0.0
    device = torch.device(args.device)
    (x_fit, y_fit), (x_test, y_test) = fmnist_cifar_shaped(args.fit, args.test)
    x_train = x_fit[:args.train]
    fit_data = (x_fit.to(device), y_fit.to(device)) if device.type == "cuda" else (x_fit, y_fit)
    nets, training = [], []
    for seed in (0, 1):
        for lr in (args.lr, args.lr / 5):  # a VGG without BN can stay at chance: then once more, slower
            net, info = train_vgg(seed, fit_data, args.width, args.epochs, args.train_seconds, lr, args.batch_size,
                                  device)
            info["test_accuracy"] = accuracy(net, x_test, y_test, device)
            print(f"endpoint {seed}: {info['steps']} steps ({info['epochs']:.2f} epochs, lr {lr:g}) in "
                  f"{info['seconds']:.1f} s, test accuracy {info['test_accuracy']:.4f}")
            training.append({"seed": seed, **info})
            if info["test_accuracy"] >= args.min_accuracy:
                break
        nets.append(net)
    del fit_data
    # Everything below in full float32: no autocast, no TF32 (so both ways compute the same numbers).
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    net = nets[0]
    a, b = ({k: v.detach().to(device, copy=True) for k, v in n.state_dict().items()} for n in nets)
    seed_net = copy.deepcopy(net)  # the seed's way loads weights into its net: keep it apart from ours
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), VGG16 "
          f"x{args.width:g} ({sum(p.numel() for p in net.parameters()) / 1e6:.1f}M params), endpoints trained on "
          f"{args.fit} images, {args.train} WA images, {args.test} test images, {args.points} points; Fashion-MNIST "
          "padded to 3x32x32; evaluation in float32")

    # (b) ours
    sync(device)
    t0 = time.perf_counter()
    path = connector_path(net, a, b, "stepwise_wa", "lin", data=x_train.to(device))
    sync(device)
    t_build = time.perf_counter() - t0
    ts = torch.linspace(0, path.end_time, args.points, dtype=torch.float64)
    t0 = time.perf_counter()
    points = path.precompute(ts)
    sync(device)
    t_pre = time.perf_counter() - t0
    test = (x_test.to(device), y_test.to(device))
    t0 = time.perf_counter()
    ours = evaluate_path(points, net, test, coords=ts, device=device, precision="32")
    sync(device)
    t_eval = time.perf_counter() - t0
    t0 = time.perf_counter()
    direct = evaluate_path(path, net, test, coords=ts, device=device, precision="32")
    sync(device)
    t_direct = time.perf_counter() - t0
    print(f"endpoints' test accuracy {ours.accuracy[0]:.4f}, {ours.accuracy[-1]:.4f}; along the path: min accuracy "
          f"{np.nanmin(ours.accuracy):.4f}, max loss {np.nanmax(ours.loss):.4f}, "
          f"{int((~np.isfinite(ours.loss)).sum())} non-finite points")

    # (a) the seed's way on a few points spread over the steps
    train_loader = DataLoader(TensorDataset(x_train), batch_size=128)
    test_loader = DataLoader(TensorDataset(x_test, y_test), batch_size=128)
    picks = np.linspace(0, args.points - 1, args.seed_points + 2)[1:-1].round().astype(int)
    f1 = {}  # net 1's features, precomputed (only for the layers the timed points re-fit)
    for i in picks:
        index = min(int(math.floor(float(ts[i]))), len(path.chain) - 1) + 1
        if index < len(path.chain) and index not in f1:
            layer = path.chain[index]
            f1[index] = seed_features(seed_net, dict(path.a), train_loader, layer.name, layer.conv, device)
    seed_rows = []
    for i in picks:
        t = float(ts[i])
        sync(device)
        t0 = time.perf_counter()
        loss, acc = seed_point(path, seed_net, t, train_loader, test_loader, f1, device)
        sync(device)
        seed_rows.append({"t": t, "seconds": time.perf_counter() - t0, "loss": loss, "accuracy": acc,
                          "ours_loss": float(ours.loss[i]), "ours_accuracy": float(ours.accuracy[i])})
        r = seed_rows[-1]
        print(f"  seed's way at t={t:.2f}: {r['seconds']:.2f} s, test loss {loss:.5f} / accuracy {acc:.4f} "
              f"(ours {r['ours_loss']:.5f} / {r['ours_accuracy']:.4f})")
    per_point = float(np.mean([r["seconds"] for r in seed_rows]))
    loss_diff = max(abs(r["loss"] - r["ours_loss"]) for r in seed_rows)
    acc_diff = max(abs(r["accuracy"] - r["ours_accuracy"]) for r in seed_rows)
    ours_total = t_build + t_pre + t_eval
    print("\n| way | seconds | per point | vs seed's |\n|---|---|---|---|")
    print(f"| seed's (host loader, numpy pinv), {len(picks)} points timed | {per_point * args.points:.1f} (projected) "
          f"| {per_point:.3f} | 1.0x |")
    print(f"| ours: build {t_build:.2f} + precompute {t_pre:.2f} + evaluate {t_eval:.2f} | {ours_total:.2f} | "
          f"{ours_total / args.points:.3f} | {per_point * args.points / ours_total:.1f}x |")
    print(f"| ours, evaluated directly (weights inside the evaluator) | {t_build + t_direct:.2f} | "
          f"{(t_build + t_direct) / args.points:.3f} | {per_point * args.points / (t_build + t_direct):.1f}x |")
    pre_vs_direct = float(np.nanmax(np.abs(ours.loss - direct.loss)))
    print(f"\nseed's way vs ours at the {len(picks)} timed points: max |test loss diff| {loss_diff:.2e}, max "
          f"|accuracy diff| {acc_diff:.2e} (float32); precomputed vs direct: {pre_vs_direct:.2e}")
    print(f"test loss along the path: start {ours.loss[0]:.4f}, max {np.nanmax(ours.loss):.4f}, end "
          f"{ours.loss[-1]:.4f}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        result = {"args": vars(args), "device": str(device), "training": training,
                  "path": {"t": ts.tolist(), "loss": _finite(ours.loss), "accuracy": _finite(ours.accuracy)},
                  "seed_points": seed_rows, "max_loss_diff": loss_diff, "max_accuracy_diff": acc_diff,
                  "precomputed_vs_direct_loss_diff": pre_vs_direct,
                  "seconds": {"seed_per_point": per_point, "seed_projected": per_point * args.points,
                              "build": t_build, "precompute": t_pre, "evaluate": t_eval, "direct": t_direct},
                  "speedup": per_point * args.points / ours_total}
        (out / "connect.json").write_text(json.dumps(result, indent=2) + "\n")


def _finite(values: np.ndarray) -> list[float | None]:
    return [float(v) if np.isfinite(v) else None for v in values]


if __name__ == "__main__":
    main()
