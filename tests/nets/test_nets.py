"""Tests for the architecture registry: shapes, traceability, variants, width scaling, errors."""

from __future__ import annotations

import math
import operator

import pytest
import torch
from torch import nn
from torch.func import functional_call

from lmc_lightning.nets import available, get_net, register, registry

REQUIRED = ["mlp", "preresnet", "resnet18", "resnet20", "resnet20_ln", "resnet20_plain", "vgg13_mmc"] + [
    f"vgg{d}{s}" for d in (11, 13, 16, 19) for s in ("", "_bn", "_ln", "_nobias")
]
SHAPES = [(1, 28), (3, 32), (3, 64)]
STANDARD = (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.GroupNorm, nn.ReLU, nn.MaxPool2d, nn.AdaptiveAvgPool2d,
            nn.Flatten)


pytestmark = pytest.mark.usefixtures("one_thread")


def small_kwargs(name: str) -> dict:
    """Arguments that keep the big nets cheap on CPU."""
    if name.startswith("vgg") or name == "resnet18":
        return {"width": 0.25}
    if name == "preresnet":
        return {"depth": 20}
    if name == "mlp":
        return {"width": 64}
    return {}


def build(name: str, in_channels: int = 3, input_size: int = 32, seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return get_net(name, num_classes=7, in_channels=in_channels, input_size=input_size,
                   **{**small_kwargs(name), **kwargs}).eval()


def n_params(net: nn.Module, kind: type[nn.Module] | None = None) -> int:
    params = net.parameters() if kind is None else (p for m in net.modules() if isinstance(m, kind)
                                                    for p in m.parameters())
    return sum(p.numel() for p in params)


def test_available_lists_required_names() -> None:
    names = available()
    assert names == sorted(names)
    assert set(REQUIRED) <= set(names)


@pytest.mark.parametrize("name", REQUIRED)
@pytest.mark.parametrize(("channels", "size"), SHAPES)
def test_output_shape(name: str, channels: int, size: int) -> None:
    net = build(name, channels, size)
    with torch.no_grad():
        out = net(torch.randn(2, channels, size, size))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", REQUIRED)
def test_fx_trace_uses_standard_modules_only(name: str) -> None:
    net = build(name)
    traced = torch.fx.symbolic_trace(net)
    modules = dict(traced.named_modules())
    for node in traced.graph.nodes:
        if node.op == "call_module":
            assert isinstance(modules[node.target], STANDARD), f"{name}: non-standard module {node.target}"
        assert node.op in ("placeholder", "output", "call_module") or node.target is operator.add, (name, node)
    assert all(not m.inplace for m in net.modules() if isinstance(m, nn.ReLU))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), net(x), rtol=0, atol=0)


@pytest.mark.parametrize(("name", "adds"), [("resnet20", 9), ("resnet18", 8), ("preresnet", 9), ("vgg11_bn", 0)])
def test_residual_additions_in_graph(name: str, adds: int) -> None:
    graph = torch.fx.symbolic_trace(build(name)).graph
    assert sum(node.target is operator.add for node in graph.nodes) == adds


@pytest.mark.parametrize("name", REQUIRED)
def test_functional_call_runs_other_weights(name: str) -> None:
    """All state lives in the state dict: net A run with B's weights computes exactly what B computes."""
    net_a, net_b = build(name, seed=0), build(name, seed=1)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = functional_call(net_a, net_b.state_dict(), (x,))
        torch.testing.assert_close(out, net_b(x), rtol=0, atol=0)
        assert not torch.allclose(net_a(x), out)


@pytest.mark.parametrize("name", ["mlp", "vgg11_bn", "resnet20_ln", "preresnet"])
def test_vmap_over_stacked_weights(name: str) -> None:
    """Eval-mode nets run under vmap over a stack of weight dicts, matching each net run on its own."""
    nets = [build(name, seed=s) for s in range(3)]
    stacked = {k: torch.stack([n.state_dict()[k] for n in nets]) for k in nets[0].state_dict()}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = torch.func.vmap(lambda w: functional_call(nets[0], w, (x,)))(stacked)
        torch.testing.assert_close(out, torch.stack([n(x) for n in nets]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("name", "params"), [
    ("mlp", 932_362),  # 784*512+512 + 2*(512*512+512) + 512*10+10
    ("vgg16", 14_719_818),  # standard CIFAR VGG-16 (13 convs + Linear(512, 10))
    ("vgg16_bn", 14_728_266),
    ("resnet18", 11_173_962),  # standard CIFAR ResNet-18
    ("resnet20", 272_474),  # 269,722 of ResNet-20 + 2 projection shortcuts (1x1 conv + BN)
])
def test_reference_parameter_counts(name: str, params: int) -> None:
    shape = {"in_channels": 1, "input_size": 28} if name == "mlp" else {}
    assert n_params(get_net(name, num_classes=10, **shape)) == params


@pytest.mark.parametrize("name", [n for n in REQUIRED if n.endswith("_nobias")])
def test_nobias_nets_have_no_bias(name: str) -> None:
    net = build(name)
    assert not any("bias" in key for key in net.state_dict())
    assert not any(isinstance(m, nn.BatchNorm2d | nn.GroupNorm) for m in net.modules())


def test_mlp_without_bias() -> None:
    net = get_net("mlp", in_channels=1, input_size=28, depth=2, width=32, bias=False)
    assert [k for k in net.state_dict()] == ["hidden.0.weight", "hidden.2.weight", "classifier.weight"]


@pytest.mark.parametrize(("name", "norm_type"), [
    *[(f"vgg{d}_bn", nn.BatchNorm2d) for d in (11, 13, 16, 19)],
    *[(f"vgg{d}_ln", nn.GroupNorm) for d in (11, 13, 16, 19)],
    ("resnet20", nn.BatchNorm2d), ("resnet20_ln", nn.GroupNorm), ("resnet18", nn.BatchNorm2d),
])
def test_every_conv_has_its_norm(name: str, norm_type: type[nn.Module]) -> None:
    net = build(name)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    norms = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d | nn.GroupNorm)]
    assert len(norms) == len(convs) and all(isinstance(m, norm_type) for m in norms)
    assert all(m.num_groups == 1 for m in norms if isinstance(m, nn.GroupNorm))
    assert all(m.bias is None for m in convs) or name.startswith("vgg")


@pytest.mark.parametrize("name", ["vgg11", "resnet20_plain", "mlp"])
def test_plain_nets_have_no_norm(name: str) -> None:
    net = build(name)
    assert not any(isinstance(m, nn.BatchNorm2d | nn.GroupNorm) for m in net.modules())
    assert all(m.bias is not None for m in net.modules() if isinstance(m, nn.Conv2d | nn.Linear))


def test_preresnet_norms_and_bottleneck() -> None:
    net = build("preresnet", depth=20, norm="ln")
    assert sum(isinstance(m, nn.GroupNorm) for m in net.modules()) == 19  # 2 per block + final
    bottleneck = build("preresnet", depth=29, block="bottleneck")
    assert bottleneck.classifier.in_features == 256
    assert sum(isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) for m in bottleneck.modules()) == 1 + 9


@pytest.mark.parametrize(("name", "small", "big", "ratio"), [
    ("vgg11", 1, 2, 4.0), ("vgg16_bn", 0.5, 1, 4.0), ("resnet20", 1, 2, 4.0), ("resnet18", 0.25, 0.5, 4.0),
    ("preresnet", 1, 3, 9.0),
])
def test_width_scales_conv_weights(name: str, small: float, big: float, ratio: float) -> None:
    """Conv weights grow with width**2, except the stem's whose input channels are fixed (width**1)."""
    kwargs = {"depth": 20} if name == "preresnet" else {}
    w_small = n_params(get_net(name, width=small, **kwargs), nn.Conv2d)
    w_big = n_params(get_net(name, width=big, **kwargs), nn.Conv2d)
    assert 0.99 * ratio < w_big / w_small <= ratio


def test_vgg11_width2_exact_channels() -> None:
    net = get_net("vgg11", width=2)
    assert [m.out_channels for m in net.modules() if isinstance(m, nn.Conv2d)] == [128, 256, 512, 512] + [1024] * 4
    assert net.classifier.in_features == 1024


def test_kaiming_normal_init() -> None:
    torch.manual_seed(0)
    net = get_net("vgg11_bn", init="kaiming_normal")
    conv = net.features[4]  # 64 -> 128, fan_out = 128 * 9
    assert isinstance(conv, nn.Conv2d)
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / (128 * 9)), rel=0.02)
    assert net.classifier.weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert all(m.bias.abs().max() == 0 for m in net.modules() if isinstance(m, nn.Conv2d | nn.Linear))
    default = get_net("vgg11_bn")
    assert default.classifier.weight.std().item() > 0.02  # PyTorch default: U(-1/sqrt(512), 1/sqrt(512))


def test_names_are_case_insensitive() -> None:
    assert isinstance(get_net("VGG11_BN", width=0.25).features[1], nn.BatchNorm2d)


def test_unknown_name_lists_available() -> None:
    with pytest.raises(ValueError, match=r"Unknown net 'vgg12'.*Did you mean.*Available: .*resnet20_plain"):
        get_net("vgg12")


@pytest.mark.parametrize(("name", "kwargs", "error", "match"), [
    ("vgg11", {"depht": 3}, TypeError, r"unexpected argument\(s\) \['depht'\].*accepts.*width"),
    ("resnet20", {"depth": 32}, TypeError, r"\['depth'\]"),
    ("mlp", {"norm": "bn"}, TypeError, r"\['norm'\]"),
    ("vgg11_bn", {"norm": "ln"}, ValueError, r"fixes norm='bn'"),
    ("vgg11", {"depth": 16}, ValueError, r"fixes depth=11"),
    ("resnet20_plain", {"norm": "bn"}, ValueError, r"fixes norm='none'"),
    ("vgg11", {"width": 0}, ValueError, r"width must be a positive number"),
    ("resnet18", {"width": "2"}, ValueError, r"width must be a positive number"),
    ("resnet20", {"norm": "gn"}, ValueError, r"norm must be one of"),
    ("vgg11_bn", {"bias": False}, ValueError, r"bias=False .* norm='none'"),
    ("vgg11", {"init": "xavier"}, ValueError, r"init must be one of"),
    ("preresnet", {"depth": 21}, ValueError, r"depth = 6n \+ 2"),
    ("preresnet", {"depth": 26, "block": "bottleneck"}, ValueError, r"depth = 9n \+ 2"),
    ("mlp", {"depth": -1}, ValueError, r"depth must be an integer >= 0"),
    ("mlp", {"num_classes": 0}, ValueError, r"num_classes must be an integer >= 1"),
])
def test_bad_arguments(name: str, kwargs: dict, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        get_net(name, **kwargs)


@pytest.fixture
def scratch_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let a test register nets without leaking them into other tests."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))


@pytest.mark.usefixtures("scratch_registry")
def test_register_user_net() -> None:
    @register
    def tiny(num_classes: int, in_channels: int, input_size: int, hidden: int = 4) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * input_size**2, hidden), nn.ReLU(),
                             nn.Linear(hidden, num_classes))

    register("tiny_wide", hidden=16)(tiny)
    assert {"tiny", "tiny_wide"} <= set(available())
    net = get_net("tiny", num_classes=3, in_channels=1, input_size=5, hidden=8)
    assert net(torch.randn(2, 1, 5, 5)).shape == (2, 3) and net[1].out_features == 8
    assert get_net("tiny_wide", num_classes=3)[1].out_features == 16
    with pytest.raises(TypeError, match=r"\['width'\]"):
        get_net("tiny", width=2)
    with pytest.raises(ValueError, match="already registered"):
        register("tiny")(tiny)
    register("tiny", overwrite=True, hidden=2)(tiny)
    assert get_net("tiny")[1].out_features == 2


@pytest.mark.usefixtures("scratch_registry")
def test_register_rejects_bad_factories() -> None:
    with pytest.raises(TypeError, match=r"must accept keyword argument\(s\) \['input_size'\]"):
        register("bad")(lambda num_classes, in_channels: nn.Linear(in_channels, num_classes))
    register("not_a_module")(lambda num_classes, in_channels, input_size: "oops")
    with pytest.raises(TypeError, match="returned str, expected an nn.Module"):
        get_net("not_a_module")


def test_mmc_vgg13_is_the_seeds_strided_bias_free_net() -> None:
    """Seed 000's VGG-13: 10 bias-free 3x3 conv+BN+ReLU blocks, 4 of stride 2, no max-pool, a 2x2 map on 32x32."""
    net = get_net("vgg13_mmc", num_classes=10)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 10 and all(c.bias is None and c.kernel_size == (3, 3) for c in convs)
    assert [c.out_channels for c in convs] == [64, 64, 128, 128, 256, 256, 512, 512, 512, 512]
    assert [c.stride[0] for c in convs] == [1, 2, 1, 2, 1, 2, 1, 2, 1, 1]
    assert not any(isinstance(m, nn.MaxPool2d) for m in net.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) and m.affine for m in net.modules()) == 10
    with torch.no_grad():
        assert net.features(torch.zeros(1, 3, 32, 32)).shape == (1, 512, 2, 2)
    conv = 9 * (3 * 64 + 64 * 64 + 64 * 128 + 128 * 128 + 128 * 256 + 256 * 256 + 256 * 512 + 3 * 512 * 512)
    bn = 2 * (2 * 64 + 2 * 128 + 2 * 256 + 4 * 512)
    assert n_params(net) == conv + bn + 512 * 10 + 10


def test_mlp_widths_builds_the_seeds_fc_nets() -> None:
    net = get_net("mlp", num_classes=10, in_channels=3, input_size=32, widths=[6144, 2000], bias=False)
    shapes = [tuple(p.shape) for p in net.parameters()]
    assert shapes == [(6144, 3072), (2000, 6144), (10, 2000)]  # the seed's Linear3NoBias
    one = get_net("mlp", num_classes=10, in_channels=1, input_size=28, widths=[2000])
    assert [tuple(p.shape) for p in one.parameters()] == [(2000, 784), (2000,), (10, 2000), (10,)]
    with pytest.raises(ValueError, match="widths entries"):
        get_net("mlp", widths=[0])


def test_garipov_vgg16_layout_and_init() -> None:
    torch.manual_seed(0)
    net = get_net("vgg16_garipov", num_classes=10)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    assert len(convs) == 13 and [tuple(m.weight.shape) for m in linears] == [(512, 512), (512, 512), (10, 512)]
    assert all(m.bias is not None for m in convs) and not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    assert sum(isinstance(m, nn.Dropout) for m in net.modules()) == 2
    w = convs[-1].weight  # N(0, sqrt(2 / (9 * 512)))
    assert w.std().item() == pytest.approx((2 / (9 * 512)) ** 0.5, rel=0.02)
    assert sum(p.numel() for p in net.parameters()) == 15_245_130
    assert net.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert get_net("vgg16_garipov", num_classes=10, in_channels=1, input_size=28)(torch.randn(2, 1, 28, 28)).shape \
        == (2, 10)
