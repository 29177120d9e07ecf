"""Data in any form (one materialisation helper for evaluate_path and align), input-shape checks, non-finite values."""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path as FilePath

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lmc_lightning import align, load_weights
from lmc_lightning.checkpoint import save_net
from lmc_lightning.nets import get_net
from lmc_lightning.weights import data as data_mod
from lmc_lightning.weights.data import check_fits, materialize
from lmc_lightning.weights.evaluate import evaluate_path
from lmc_lightning.weights.paths import Linear
from lmc_lightning.weights.result import PathResult

pytestmark = pytest.mark.usefixtures("one_thread")


def _mlp(seed: int, in_channels: int = 1, size: int = 8):
    torch.manual_seed(seed)
    return get_net("mlp", num_classes=5, in_channels=in_channels, input_size=size, depth=1, width=16).eval()


@pytest.fixture(scope="module")
def xy():
    g = torch.Generator().manual_seed(0)
    return torch.randn(90, 1, 8, 8, generator=g), torch.randint(0, 5, (90,), generator=g)


class TinyDataModule:
    """A Lightning-style datamodule without split_tensors: read through setup() and test_dataloader()."""

    def __init__(self, x, y):
        self.x, self.y, self.stages = x, y, []

    def setup(self, stage=None):
        self.stages.append(stage)

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.x, self.y), batch_size=16, shuffle=True)

    def test_dataloader(self):
        return DataLoader(TensorDataset(self.x, self.y), batch_size=32)


def test_every_form_gives_the_same_tensors(xy) -> None:
    x, y = xy
    forms = {
        "pair": (x, y),
        "loader": DataLoader(TensorDataset(x, y), batch_size=32),
        "dataset": TensorDataset(x, y),
        "list of batches": [(x[:50], y[:50]), (x[50:], y[50:])],
        "generator": ((x[i:i + 40], y[i:i + 40]) for i in range(0, 90, 40)),
        "dict batches": [{"x": x[:45], "y": y[:45]}, {"x": x[45:], "y": y[45:]}],
        "datamodule": TinyDataModule(x, y),
    }
    for name, form in forms.items():
        got_x, got_y = materialize(form, "test")
        assert torch.equal(got_x, x) and torch.equal(got_y, y), name
    assert materialize(x, labels=False)[1] is None
    with pytest.raises(ValueError, match="no labels"):
        materialize(x)
    with pytest.raises(ValueError, match="no samples"):
        materialize((x[:0], y[:0]))
    with pytest.raises(ValueError, match="integer"):
        materialize((x, y.float()))
    with pytest.raises(TypeError, match="DataLoader"):
        materialize(3.5)


def test_evaluate_path_takes_a_dataloader_and_align_a_datamodule(xy) -> None:
    x, y = xy
    a, b = _mlp(0), _mlp(1)
    path = Linear(a.state_dict(), b.state_dict())
    kw = dict(num_points=3, precision="32", device="cpu")
    ref = evaluate_path(path, a, (x, y), **kw)
    for form in (DataLoader(TensorDataset(x, y), batch_size=7), iter(DataLoader(TensorDataset(x, y), batch_size=9)),
                 TinyDataModule(x, y)):
        np.testing.assert_allclose(evaluate_path(path, a, form, **kw).loss, ref.loss, rtol=1e-6)
    dm = TinyDataModule(x, y)
    perms = [align(a, b, "activation", data=d)[1] for d in (x, dm, TensorDataset(x, y))]
    assert dm.stages == ["fit"]  # the training split, set up once
    assert all(torch.equal(p[g], perms[0][g]) for p in perms[1:] for g in p)


def test_data_that_does_not_fit_on_the_device_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1000, 10_000))
    with pytest.raises(MemoryError, match=r"GiB but cuda:0 has .* free: pass a subset"):
        check_fits([torch.zeros(1000)], "cuda:0", "data")  # 4000 bytes > 90% of 1000
    check_fits([torch.zeros(100)], "cuda:0")  # 400 bytes fit
    check_fits([torch.zeros(10**6)], "cpu")  # not checked off CUDA


def test_net_and_data_of_different_input_shapes_fail_naming_the_shape(xy) -> None:
    x, y = xy
    a = _mlp(0, in_channels=3, size=4)
    with pytest.raises(ValueError, match=r"cannot run on inputs of shape \(1, 8, 8\)"):
        evaluate_path(Linear(a.state_dict(), a.state_dict()), a, (x, y), num_points=2, device="cpu")


def test_non_finite_endpoint_weights_are_an_error_naming_the_key(xy, tmp_path: FilePath) -> None:
    x, y = xy
    a, b = _mlp(0), _mlp(1)
    bad = {k: v.clone() for k, v in b.state_dict().items()}
    key = next(iter(bad))
    bad[key][0, 0] = float("inf")
    with pytest.raises(ValueError, match=rf"path endpoint 1 has non-finite weights \(Inf\) in '{key}'"):
        evaluate_path(Linear(a.state_dict(), bad), a, (x, y), num_points=3, device="cpu")
    spec = {"name": "mlp", "num_classes": 5, "in_channels": 1, "input_size": 8, "depth": 1, "width": 16}
    bad[key][0, 0] = float("nan")
    save_net(tmp_path / "bad.ckpt", bad, spec)
    with pytest.raises(ValueError, match=rf"bad.ckpt \(net\) has non-finite weights \(NaN\) in '{key}'"):
        load_weights(tmp_path / "bad.ckpt")


def test_non_finite_loss_is_null_and_a_warning_never_a_barrier(xy, tmp_path: FilePath) -> None:
    x, y = xy
    a, b = _mlp(0), _mlp(1)
    big = {k: v * 1e18 if v.dim() > 1 else v for k, v in a.state_dict().items()}  # finite, but logits overflow
    with pytest.warns(RuntimeWarning, match=r"Non-finite loss at 2 of 3 point\(s\) \(coordinates \(0.0,\), \(0.5,\)\)"):
        res = evaluate_path(Linear(big, b.state_dict()), a, (x * 1e6, y), num_points=3, device="cpu",
                            precision="32")
    assert not np.isfinite(res.loss[0])
    assert all(v is None for v in res.barriers().values()) and math.isnan(res.loss_barrier)
    d = json.loads(res.to_json(tmp_path / "p.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert d["loss"][0] is None and d["loss_barrier"] is None and d["accuracy_barrier_mean"] is None
    back = PathResult.from_json(tmp_path / "p.json")
    assert np.isnan(back.loss[0]) and back.barriers()["loss_barrier"] is None
    # one bad point among finite ones: still no barrier, the finite values are kept
    partial = PathResult([0, 0.5, 1], [0.1, np.inf, 0.2], [0.9, 0.1, 0.8])
    assert partial.barriers() == dict.fromkeys(partial.barriers())
    with pytest.warns(RuntimeWarning, match=r"1 of 3 point\(s\) \(coordinates \(0.5,\)"):
        assert partial.warn_nonfinite()
    assert json.loads(json.dumps(partial.to_dict(), allow_nan=False))["loss"] == [0.1, None, 0.2]


def test_result_and_plots_do_not_import_each_other() -> None:
    """weights.result depends on plots; plots imports nothing of the weights package."""
    source = FilePath(data_mod.__file__).parents[1] / "plots.py"
    imported = {n.module for n in ast.walk(ast.parse(source.read_text())) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(ast.parse(source.read_text())) if isinstance(n, ast.Import)
                 for a in n.names}
    assert not any(m and m.startswith("lmc_lightning.weights") for m in imported), imported


def test_evaluate_path_under_inference_mode_equals_outside() -> None:
    """Lightning's test loop runs in inference mode; the evaluator (fused BN included) must give the same numbers."""
    torch.manual_seed(0)
    a, b = (get_net("vgg11_bn", num_classes=5, in_channels=1, input_size=8, width=0.0625) for _ in range(2))
    x, y = torch.randn(64, 1, 8, 8), torch.randint(0, 5, (64,))
    kw = dict(num_points=3, bn="reset", train_data=x, bn_batches=2, bn_batch_size=16, device="cpu", fuse_norms=True,
              strategy="loop")
    outside = evaluate_path(Linear(a.state_dict(), b.state_dict()), a, (x, y), **kw)
    with torch.inference_mode():
        inside = evaluate_path(Linear(a.state_dict(), b.state_dict()), a, (x, y), **kw)
    np.testing.assert_array_equal(inside.loss, outside.loss)
