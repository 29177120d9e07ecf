"""BN fusion (fuse_norms / FusedBatchNorm): same function, same BN reset, same path evaluation as the unfused net."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from lmc_lightning.nets import get_net
from lmc_lightning.weights import renorm
from lmc_lightning.weights.evaluate import evaluate_path
from lmc_lightning.weights.fused import FusedBatchNorm, channel_stats, fuse_norms, scale_shift
from lmc_lightning.weights.paths import Linear

NETS = [("resnet20", {"width": 0.5}), ("vgg11_bn", {"width": 0.125}), ("preresnet", {"depth": 8}),
        ("resnet18", {"width": 0.25})]


def _net(name: str, kwargs: dict, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return get_net(name, num_classes=10, in_channels=3, input_size=16, **kwargs)


@pytest.mark.parametrize(("name", "kwargs"), NETS)
def test_fused_net_resets_and_computes_like_the_net(name, kwargs):
    net = _net(name, kwargs).double().eval()
    batches = [torch.randn(12, 3, 16, 16, dtype=torch.float64) for _ in range(3)]
    gm = fuse_norms(net)
    kinds = {(m.add, m.relu) for m in gm.modules() if isinstance(m, FusedBatchNorm)}
    assert (False, True) in kinds  # BN -> ReLU chains fused
    if name.startswith("resnet"):
        assert (True, True) in kinds  # BN -> + shortcut -> ReLU
    ref = copy.deepcopy(net)
    renorm.reset_bn(ref, batches)
    renorm.reset_bn(gm, batches)  # the fused trace writes into net's own buffers
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(net.state_dict()[key], value, rtol=0, atol=1e-10)
    x = torch.randn(5, 3, 16, 16, dtype=torch.float64)
    torch.testing.assert_close(gm(x), ref(x), rtol=0, atol=1e-10)
    assert all(m.stats_hook is None for m in gm.modules() if isinstance(m, FusedBatchNorm))


def test_fused_net_shares_tensors_and_leaves_the_net_alone():
    net = _net("resnet20", {"width": 0.5}).eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    gm = fuse_norms(net)
    assert not any(isinstance(m, FusedBatchNorm) for m in net.modules())
    for key, value in gm.state_dict().items():
        assert value.data_ptr() == net.state_dict()[key].data_ptr()
        torch.testing.assert_close(value, before[key])


def test_nothing_to_fuse_gives_none():
    assert fuse_norms(get_net("mlp", num_classes=10, in_channels=1, input_size=8)) is None
    assert fuse_norms(get_net("resnet20_ln", num_classes=10, in_channels=3, input_size=16, width=0.25)) is None


def test_fused_module_checks_its_residual_input():
    bn = torch.nn.BatchNorm2d(4).eval()
    with pytest.raises(ValueError, match="residual"):
        FusedBatchNorm(bn, add=True, relu=True)(torch.randn(2, 4, 3, 3))
    with pytest.raises(RuntimeError, match="unfused"):
        FusedBatchNorm(bn.train(), add=False, relu=False)(torch.randn(2, 4, 3, 3))


def test_channel_stats_and_scale_shift_match_torch():
    x = torch.randn(6, 5, 7, 3, dtype=torch.float64) * 3 + 1
    w, b = torch.rand(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    mean, var, scale, shift = channel_stats(x, w, b, eps=1e-5)
    torch.testing.assert_close(mean, x.mean((0, 2, 3)))
    torch.testing.assert_close(var, x.var((0, 2, 3), unbiased=False))
    bn = torch.nn.functional.batch_norm(x, None, None, w, b, training=True, eps=1e-5)
    torch.testing.assert_close(scale_shift(x, scale, shift), bn)
    a, b, z = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64), torch.randn_like(x)
    want = (x * a.view(1, -1, 1, 1) + b.view(1, -1, 1, 1) + z).relu()
    torch.testing.assert_close(scale_shift(x, a, b, z, relu=True), want)


@pytest.mark.parametrize("fuse", [False, True])
def test_merged_statistics_batches_give_the_same_reset(fuse):
    """Forwarding several statistics batches at once: every BN still normalises each batch by its own statistics."""
    net = _net("resnet20", {"width": 0.5}).double().eval()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(8, 3, 16, 16, dtype=torch.float64, generator=g) * (1 + i) for i in range(5)]
    batches.append(torch.randn(3, 3, 16, 16, dtype=torch.float64, generator=g))  # a smaller last batch
    ref, merged = copy.deepcopy(net), copy.deepcopy(net)
    renorm.reset_bn(ref, batches)
    renorm.reset_bn(fuse_norms(merged) if fuse else merged, batches, merge=3)
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(merged.state_dict()[key], value, rtol=0, atol=1e-10)
    whole = copy.deepcopy(net)  # one batch of everything is a different reset: the merge is not that
    renorm.reset_bn(whole, [torch.cat(batches[:5])])
    assert not torch.allclose(whole.state_dict()["stages.0.0.residual.4.running_var"],
                              ref.state_dict()["stages.0.0.residual.4.running_var"])


def test_grouped_channel_stats_and_scale_shift_are_per_group():
    x = torch.randn(6, 5, 4, 3, dtype=torch.float64) * 3 + 1
    w, b = torch.rand(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    mean, var, scale, shift = channel_stats(x, w, b, eps=1e-5, groups=3)
    assert mean.shape == (3, 5)
    out = scale_shift(x, scale, shift, relu=True)
    for i, xg in enumerate(x.chunk(3)):
        torch.testing.assert_close(mean[i], xg.mean((0, 2, 3)))
        torch.testing.assert_close(var[i], xg.var((0, 2, 3), unbiased=False))
        bn = torch.nn.functional.batch_norm(xg, None, None, w, b, training=True, eps=1e-5).relu()
        torch.testing.assert_close(out[2 * i : 2 * i + 2], bn)
    with pytest.raises(ValueError, match="equal groups"):
        channel_stats(x, groups=4)


def test_evaluate_path_with_fused_norms_equals_the_plain_loop():
    a, b = _net("resnet20", {"width": 0.5}, 0), _net("resnet20", {"width": 0.5}, 1)
    g = torch.Generator().manual_seed(0)
    test = (torch.randn(64, 3, 16, 16, generator=g), torch.randint(0, 10, (64,), generator=g))
    train = torch.randn(96, 3, 16, 16, generator=g)
    kw = dict(num_points=4, bn="reset", train_data=train, bn_batches=3, bn_batch_size=32, device="cpu",
              strategy="loop")
    plain = evaluate_path(Linear(a.state_dict(), b.state_dict()), a, test, batch_size=32, **kw)
    # batch 96: the three statistics batches are forwarded as one
    fused = evaluate_path(Linear(a.state_dict(), b.state_dict()), a, test, fuse_norms=True, batch_size=96, **kw)
    assert fused.meta["fused_norms"] and not plain.meta["fused_norms"]
    np.testing.assert_allclose(fused.loss, plain.loss, rtol=0, atol=1e-5)
    np.testing.assert_allclose(fused.accuracy, plain.accuracy, rtol=0, atol=1e-12)


KERNEL_CHECK = """
import torch
from lmc_lightning.weights import fused
device = "cuda" if torch.cuda.is_available() else "cpu"
assert fused.triton is not None
torch.manual_seed(0)
# one tile; several channel blocks; many programs of several tiles each (the combine kernel's chunk loop)
for shape in [(5, 24, 9, 11), (3, 70, 4, 4), (4, 3, 130, 130)]:
    x = (torch.randn(shape, device=device) * 2 + 0.5).contiguous(memory_format=torch.channels_last)
    assert fused._nhwc(x)
    w, b = torch.rand(shape[1], device=device), torch.randn(shape[1], device=device)
    mean, var, scale, shift = fused.channel_stats(x, w, b, 1e-5)
    ref_var, ref_mean = torch.var_mean(x.double(), dim=[0, 2, 3], correction=0)
    torch.testing.assert_close(mean, ref_mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(var, ref_var, rtol=1e-5, atol=1e-6)
    ref_scale, ref_shift = fused._affine(ref_var, ref_mean, w, b, 1e-5, torch.float64)
    torch.testing.assert_close(scale.double(), ref_scale, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(shift.double(), ref_shift, rtol=1e-5, atol=1e-6)
    z = torch.randn_like(x)
    for xx, zz, tol in ((x, z, 1e-5), (x.bfloat16(), z.bfloat16(), 2e-2)):
        want = (xx.double() * ref_scale.view(1, -1, 1, 1) + ref_shift.view(1, -1, 1, 1) + zz.double()).relu()
        out = fused.scale_shift(xx, scale, shift, zz, relu=True)
        assert out.dtype == xx.dtype and out.stride() == xx.stride()
        torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol)
    # three groups (batches of shape[0] samples), each with its own statistics and affine map
    xg = torch.cat([x * (1 + i) + i for i in range(3)])
    mean, var, scale, shift = fused.channel_stats(xg, w, b, 1e-5, groups=3)
    assert mean.shape == (3, shape[1])
    out = fused.scale_shift(xg, scale, shift, torch.cat([z] * 3), relu=True)
    for i, part in enumerate(xg.chunk(3)):
        ref_var, ref_mean = torch.var_mean(part.double(), dim=[0, 2, 3], correction=0)
        torch.testing.assert_close(mean[i], ref_mean, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(var[i], ref_var, rtol=1e-5, atol=1e-6)
        bn = torch.nn.functional.batch_norm(part.double(), None, None, w.double(), b.double(), True, eps=1e-5)
        torch.testing.assert_close(out.chunk(3)[i].double(), (bn + z.double()).relu(), rtol=1e-4, atol=1e-4)
print("kernels ok")
"""


def test_triton_kernels_match_torch():
    """The Triton kernels on a CUDA device, or on the CPU through Triton's interpreter (TRITON_INTERPRET=1)."""
    pytest.importorskip("triton")
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    done = subprocess.run([sys.executable, "-c", KERNEL_CHECK], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and "kernels ok" in done.stdout, done.stderr[-3000:]
