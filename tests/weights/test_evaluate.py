"""evaluate_path and PathResult: exact endpoints, vmap == loop == a plain loop, BN reset, REPAIR on real data, files."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from net_factory import manual_reset, trained_like
from torch import nn
from torch.utils.data import TensorDataset

from lmc_lightning.nets import get_net
from lmc_lightning.weights import fused
from lmc_lightning.weights.evaluate import choose_strategy, evaluate_path
from lmc_lightning.weights.paths import Linear, Path
from lmc_lightning.weights.result import PathResult

pytestmark = pytest.mark.usefixtures("one_thread")


def make(name: str, seed: int, **kwargs) -> nn.Module:
    return trained_like(name, seed, num_classes=5, stats_samples=64, **kwargs)


def nobias(seed: int) -> nn.Module:
    """A bias-free VGG-11 with fan-in Kaiming init, so that its logits are O(1) at init."""
    net = make("vgg11_nobias", seed, width=0.0625)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    return net


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(300, 1, 8, 8, generator=g), torch.randint(0, 5, (300,), generator=g)
    xs = torch.randn(200, 1, 8, 8, generator=g)
    return x, y, (xs, torch.zeros(200, dtype=torch.long))


@pytest.fixture(scope="module")
def bn_pair():
    return make("resnet20", 0, width=0.25), make("resnet20", 1, width=0.25)


def plain_loop(path: Path, net: nn.Module, x, y, ts, stats=None) -> np.ndarray:
    """The reference: per point, weights into a module copy, optional train-mode BN reset, one eval pass."""
    losses = []
    for t in ts:
        ref = copy.deepcopy(net)
        ref.load_state_dict(path(t) if stats is None else manual_reset(net, stats, path(t)))
        with torch.no_grad():
            losses.append(F.cross_entropy(ref(x), y).item())
    return np.array(losses)


def test_endpoints_reproduce_the_endpoint_nets_exactly(bn_pair, data):
    a, b = bn_pair
    x, y, _ = data
    res = evaluate_path(Linear(a.state_dict(), b.state_dict()), a, (x, y), num_points=2, precision="32",
                        batch_size=300, device="cpu")
    for i, net in enumerate((a, b)):
        with torch.no_grad():
            logits = net(x)
        assert res.loss[i] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-6)
        assert round(res.accuracy[i] * len(y)) == (logits.argmax(1) == y).sum().item()
    assert np.array_equal(res.ts, [0.0, 1.0])


@pytest.mark.parametrize("bn", [None, "reset"])
def test_vmap_equals_loop_equals_a_plain_loop(bn_pair, data, bn):
    a, b = bn_pair
    x, y, (xs, ys) = data
    path = Linear(a.state_dict(), b.state_dict())
    kw = dict(coords=[0.0, 0.3, 0.5, 1.0], bn=bn, train_data=(xs, ys), bn_batches=1, bn_batch_size=200,
              batch_size=128, precision="32", device="cpu")
    loop = evaluate_path(path, a, (x, y), strategy="loop", **kw)
    vm = evaluate_path(path, a, (x, y), strategy="vmap", chunk_size=3, **kw)
    ref = plain_loop(path, a, x, y, [0.0, 0.3, 0.5, 1.0], xs if bn else None)
    np.testing.assert_allclose(loop.loss, ref, rtol=0, atol=1e-4)
    np.testing.assert_allclose(vm.loss, ref, rtol=0, atol=1e-4)
    np.testing.assert_allclose(vm.accuracy, loop.accuracy, atol=1 / len(y) + 1e-9)
    assert loop.meta["strategy"] == "loop" and vm.meta["strategy"] == "vmap"
    if bn == "reset":  # statistics matter here: without the reset the midpoint is different
        plain = plain_loop(path, a, x, y, [0.5])
        assert abs(plain[0] - ref[2]) > 1e-3


@pytest.mark.parametrize("bn", ["repair", "rescale"])
def test_repair_vmap_equals_loop(data, bn):
    a, b = nobias(0), nobias(1)
    x, y, (xs, _) = data
    path = Linear(a.state_dict(), b.state_dict())
    kw = dict(num_points=3, bn=bn, train_data=xs, bn_batches=2, bn_batch_size=100, precision="32", device="cpu")
    loop = evaluate_path(path, a, (x, y), strategy="loop", **kw)
    vm = evaluate_path(path, a, (x, y), strategy="vmap", **kw)
    np.testing.assert_allclose(vm.loss, loop.loss, rtol=0, atol=1e-4)
    plain = plain_loop(path, a, x, y, [0.0, 0.5, 1.0])
    np.testing.assert_allclose(loop.loss[[0, 2]], plain[[0, 2]], atol=1e-4)  # REPAIR keeps the endpoints
    if bn == "repair":
        assert abs(loop.loss[1] - plain[1]) > 1e-3  # and changes the midpoint


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_bf16_autocast_stays_close_to_fp32(bn_pair, data, strategy):
    a, b = bn_pair
    x, y, (xs, _) = data
    path = Linear(a.state_dict(), b.state_dict())
    kw = dict(num_points=3, bn="repair", train_data=xs, bn_batches=2, bn_batch_size=100, device="cpu",
              strategy=strategy)
    fp32 = evaluate_path(path, a, (x, y), precision="32", **kw)
    bf16 = evaluate_path(path, a, (x, y), precision="bf16", **kw)
    assert bf16.meta["precision"] == "bf16" and fp32.meta["precision"] == "32"
    np.testing.assert_allclose(bf16.loss, fp32.loss, atol=2e-2)


def test_identical_endpoints_have_zero_barrier(bn_pair, data):
    a, _ = bn_pair
    x, y, _ = data
    res = evaluate_path(Linear(a.state_dict(), a.state_dict()), a, (x, y), num_points=5, precision="32", device="cpu")
    assert np.ptp(res.loss) < 1e-6
    assert abs(res.loss_barrier) < 1e-6 and abs(res.accuracy_barrier) < 1e-9
    assert abs(res.loss_barrier_mean) < 1e-6


def test_bad_inputs_are_clear_errors(bn_pair, data):
    a, b = bn_pair
    x, y, _ = data
    path = Linear(a.state_dict(), b.state_dict())
    other = get_net("resnet20", num_classes=7, in_channels=1, input_size=8, width=0.25)
    with pytest.raises(ValueError, match=r"classifier\.weight"):
        evaluate_path(path, other, (x, y))
    with pytest.raises(ValueError, match="train_data"):
        evaluate_path(path, a, (x, y), bn="reset")
    mlp = get_net("mlp", num_classes=5, in_channels=1, input_size=8, depth=1, width=8)
    with pytest.raises(ValueError, match="needs BatchNorm layers"):
        evaluate_path(Linear(mlp.state_dict(), mlp.state_dict()), mlp, (x, y), bn="reset", train_data=x)
    with pytest.raises(ValueError, match="strategy"):
        evaluate_path(path, a, (x, y), strategy="fast")
    with pytest.raises(ValueError, match="bn must be"):
        evaluate_path(path, a, (x, y), bn="renorm")
    with pytest.raises(TypeError, match="datamodule, a Dataset, or an iterable"):
        evaluate_path(path, a, "test-set")
    big_conv = get_net("resnet20", num_classes=10, in_channels=3, width=4)  # 4.3M parameters
    small_conv = get_net("resnet20_ln", num_classes=10, in_channels=3, width=0.5)  # no BatchNorm to fuse
    assert choose_strategy(mlp, "cuda") == "vmap" and choose_strategy(small_conv, "cuda") == "vmap"  # launch-bound
    assert choose_strategy(big_conv, "cuda") == "loop"
    assert choose_strategy(a, "cuda") == ("loop" if fused.supported(torch.device("cuda")) else "vmap")
    assert choose_strategy(mlp, "cpu") == "loop" and choose_strategy(a, "cpu") == "loop"


def test_auto_strategy_runs_bn_nets_fused_where_triton_can(bn_pair, monkeypatch):
    a, _ = bn_pair  # a small conv net with BatchNorm2d: the fused loop where the kernels run, else vmap
    for can, want in ((True, "loop"), (False, "vmap")):
        monkeypatch.setattr(fused, "supported", lambda device, can=can: can)
        assert choose_strategy(a, "cuda") == want


class FakeDataModule:
    def __init__(self, x, y, xs):
        self.splits = {"test": (x, y), "train": (xs, torch.zeros(len(xs), dtype=torch.long))}

    def split_tensors(self, split):
        return self.splits[split]


def test_datamodule_and_dataset_inputs(bn_pair, data):
    a, b = bn_pair
    x, y, (xs, ys) = data
    path = Linear(a.state_dict(), b.state_dict())
    kw = dict(num_points=3, bn="reset", bn_batches=1, bn_batch_size=200, precision="32", device="cpu")
    ref = evaluate_path(path, a, (x, y), train_data=(xs, ys), **kw)
    dm = evaluate_path(path, a, FakeDataModule(x, y, xs), **kw)
    ds = evaluate_path(path, a, TensorDataset(x, y), train_data=TensorDataset(xs, ys), **kw)
    np.testing.assert_allclose(dm.loss, ref.loss, rtol=1e-6)
    np.testing.assert_allclose(ds.loss, ref.loss, rtol=1e-6)


class Bilinear(Path):
    dim = 2

    def coefficients(self, coords):
        u, v = coords[:, 0], coords[:, 1]
        return torch.stack([(1 - u) * (1 - v), u * (1 - v), (1 - u) * v, u * v], dim=1)


def test_surface_grid_corners_and_files(data, tmp_path):
    x, y, (xs, _) = data
    nets = [make("resnet20", s, width=0.25) for s in range(4)]
    surf = Bilinear([n.state_dict() for n in nets])
    res = evaluate_path(surf, nets[0], (x, y), num_points=3, bn="reset", train_data=xs, bn_batches=1,
                        bn_batch_size=200, precision="32", device="cpu")
    assert res.coords.shape == (9, 2) and res.dim == 2
    corners = {(0.0, 0.0): 0, (1.0, 0.0): 1, (0.0, 1.0): 2, (1.0, 1.0): 3}
    for (u, v), i in corners.items():
        j = int(np.flatnonzero((res.coords[:, 0] == u) & (res.coords[:, 1] == v))[0])
        expected = evaluate_path(Linear(nets[i].state_dict(), nets[i].state_dict()), nets[0], (x, y), coords=[0.0],
                                 bn="reset", train_data=xs, bn_batches=1, bn_batch_size=200, precision="32",
                                 device="cpu")
        assert res.loss[j] == pytest.approx(expected.loss[0], rel=1e-5)
    assert np.isfinite(res.loss_barrier)
    with pytest.raises(ValueError, match="curve"):
        evaluate_path(surf, nets[0], (x, y), num_points=2, bn="repair", train_data=xs)
    files = [res.to_csv(tmp_path / "s.csv"), res.to_json(tmp_path / "s.json"), res.plot(tmp_path / "s.png")]
    assert all(f.stat().st_size > 0 for f in files)
    assert (tmp_path / "s.csv").read_text().splitlines()[0] == "u,v,loss,accuracy"


def test_path_result_barriers_on_hand_made_values(tmp_path):
    ts = [0.0, 0.25, 0.5, 0.75, 1.0]
    res = PathResult(np.array(ts), [1.0, 2.0, 3.5, 2.5, 2.0], [0.9, 0.7, 0.5, 0.7, 0.8], {"bn": None})
    # line from 1 to 2: 1.25, 1.5, 1.75 at the inner points -> excess 0.75, 2.0, 0.75
    assert res.loss_barrier == pytest.approx(2.0)
    # accuracy line from 0.9 to 0.8: 0.875, 0.85, 0.825 -> drops 0.175, 0.35, 0.125
    assert res.accuracy_barrier == pytest.approx(0.35)
    assert res.loss_barrier_mean == pytest.approx(3.5 - 1.5)
    assert res.accuracy_barrier_mean == pytest.approx(0.85 - 0.5)
    # surface: values = bilinear corners + a bump of 1 at the centre
    grid = np.array([(u, v) for u in (0, 0.5, 1) for v in (0, 0.5, 1)], dtype=float)
    base = 1 + grid[:, 0] + 2 * grid[:, 1]
    bump = base + ((grid[:, 0] == 0.5) & (grid[:, 1] == 0.5))
    surf = PathResult(grid, bump, np.full(9, 0.5))
    assert surf.loss_barrier == pytest.approx(1.0)
    assert surf.loss_barrier_mean == pytest.approx(bump.max() - 2.5)
    with pytest.raises(ValueError, match="curves"):
        _ = surf.ts
    # files: csv rows, json round trip, png
    res.to_csv(tmp_path / "r.csv")
    rows = (tmp_path / "r.csv").read_text().splitlines()
    assert rows[0] == "t,loss,accuracy" and len(rows) == 6 and rows[3].startswith("0.5,3.5,0.5")
    res.to_json(tmp_path / "r.json")
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["loss_barrier"] == pytest.approx(2.0)
    back = PathResult.from_json(tmp_path / "r.json")
    np.testing.assert_array_equal(back.loss, res.loss)
    assert back.meta == {"bn": None} and back.accuracy_barrier == pytest.approx(0.35)
    assert res.plot(tmp_path / "r.png").stat().st_size > 1000
    # no endpoints: barriers are undefined, and say so
    part = PathResult(np.array([0.2, 0.4]), [1.0, 2.0], [0.5, 0.5])
    with pytest.raises(ValueError, match="t=0"):
        _ = part.loss_barrier
    assert part.to_dict()["loss_barrier"] is None


@pytest.mark.slow
def test_repair_lowers_the_barrier_of_a_bias_free_net_on_fashion_mnist(fmnist, train_classifier):
    def net():
        return nn.Sequential(
            nn.MaxPool2d(2), nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.ReLU(), nn.MaxPool2d(2), nn.MaxPool2d(2, ceil_mode=True),
            nn.Flatten(), nn.Linear(16 * 16, 64, bias=False), nn.ReLU(), nn.Linear(64, 10, bias=False),
        )

    x, y = fmnist["x_train"][:3000], fmnist["y_train"][:3000]
    nets = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        nets.append(train_classifier(net(), x, y, epochs=2, lr=0.05, seed=seed))
    path = Linear(nets[0].state_dict(), nets[1].state_dict())
    test = (fmnist["x_test"][:2000], fmnist["y_test"][:2000])
    kw = dict(num_points=3, train_data=(fmnist["x_train"], fmnist["y_train"]), bn_batches=1, bn_batch_size=500,
              device="cpu")
    plain = evaluate_path(path, nets[0], test, **kw)
    repaired = evaluate_path(path, nets[0], test, bn="repair", **kw)
    rescaled = evaluate_path(path, nets[0], test, bn="rescale_centered", **kw)
    seed_rescaled = evaluate_path(path, nets[0], test, bn="rescale", **kw)
    assert plain.accuracy[[0, 2]].min() > 0.5  # the endpoints learned something
    assert plain.loss_barrier > 0.3
    np.testing.assert_allclose(repaired.loss[[0, 2]], plain.loss[[0, 2]], atol=1e-3)
    assert repaired.loss_barrier < 0.5 * plain.loss_barrier
    assert rescaled.loss_barrier < 0.6 * plain.loss_barrier
    assert seed_rescaled.loss_barrier < 0.85 * plain.loss_barrier  # measured 0.70x: the seed's form helps less here
    assert repaired.accuracy_barrier < plain.accuracy_barrier


def test_align_recovers_a_hidden_permutation_and_removes_the_barrier() -> None:
    """B is A with its hidden units shuffled: unaligned the line has a barrier, aligned it is flat (barrier ~0)."""
    from lmc_lightning.nets import get_net

    torch.manual_seed(0)
    net = get_net("mlp", num_classes=5, in_channels=1, input_size=4, depth=2, width=32).eval()
    theta_a = net.state_dict()
    perm = torch.randperm(32)
    theta_b = dict(theta_a)
    layers = [k[: -len(".weight")] for k in theta_a if k.endswith(".weight")]
    theta_b[f"{layers[0]}.weight"] = theta_a[f"{layers[0]}.weight"][perm]
    theta_b[f"{layers[0]}.bias"] = theta_a[f"{layers[0]}.bias"][perm]
    theta_b[f"{layers[1]}.weight"] = theta_a[f"{layers[1]}.weight"][:, perm]
    x = torch.randn(256, 1, 4, 4)
    y = net(x).argmax(1)  # labels the endpoints fit perfectly
    plain = evaluate_path(Linear(theta_a, theta_b), net, (x, y), num_points=5, device="cpu")
    aligned = evaluate_path(Linear(theta_a, theta_b), net, (x, y), num_points=5, device="cpu", align="weight")
    assert plain.loss_barrier > 0.01
    assert aligned.loss_barrier == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="align= works on Linear and Arc"):
        from lmc_lightning.weights.curves import Bezier

        evaluate_path(Bezier([theta_a, theta_b], num_bends=1), net, (x, y), num_points=3, align="weight")


def test_auto_batch_size_fits_a_quarter_of_free_memory(monkeypatch):
    from lmc_lightning.weights import evaluate

    assert evaluate._auto_batch_size(torch.nn.Identity(), torch.zeros(10, 3), torch.device("cpu")) == 1000
    mib = 2**20
    allocated = {"now": 100 * mib}
    fake = {
        "synchronize": lambda device=None: None,
        "reset_peak_memory_stats": lambda device=None: None,
        "memory_allocated": lambda device=None: allocated["now"],
        "max_memory_allocated": lambda device=None: allocated["now"] + 256 * mib,  # the probe: 1 MiB per sample
        "memory_reserved": lambda device=None: allocated["now"] + 24 * mib,
        "mem_get_info": lambda device=None: (2000 * mib, 80_000 * mib),
    }
    for name, fn in fake.items():
        monkeypatch.setattr(torch.cuda, name, fn)
    cuda = torch.device("cuda", 0)
    assert evaluate._auto_batch_size(torch.nn.Identity(), torch.zeros(5000, 3), cuda) == 506  # (2000 + 24) / 4
    fake["mem_get_info"] = lambda device=None: (40_000 * mib, 80_000 * mib)
    monkeypatch.setattr(torch.cuda, "mem_get_info", fake["mem_get_info"])
    assert evaluate._auto_batch_size(torch.nn.Identity(), torch.zeros(5000, 3), cuda) == 10006  # (40000 + 24) / 4
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (400_000 * mib, 800_000 * mib))
    assert evaluate._auto_batch_size(torch.nn.Identity(), torch.zeros(5000, 3), cuda) == evaluate.AUTO_BATCH_MAX
