"""Re-normalisation modes as the rethink-re-basin seed defines them, against direct per-channel computations."""

from __future__ import annotations

import pytest
import torch
from net_factory import trained_like
from torch import nn
from torch.func import functional_call

from lmc_lightning.nets import get_net
from lmc_lightning.weights import renorm
from lmc_lightning.weights.evaluate import evaluate_path
from lmc_lightning.weights.paths import Linear

pytestmark = pytest.mark.usefixtures("one_thread")


def small_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(5 * 6 * 6, 3)).eval()


def conv0_out(net: nn.Module, w: dict, x: torch.Tensor) -> torch.Tensor:
    return functional_call(net[0], {k[2:]: v for k, v in w.items() if k.startswith("0.")}, (x,)).double()


def direct(mode: str, y: torch.Tensor, goal_mean: torch.Tensor, goal_std: torch.Tensor, eps: float) -> torch.Tensor:
    """The seed's formulas written out per channel (mu, var over batch and pixels, biased)."""
    mu = y.mean((0, 2, 3), keepdim=True)
    sigma = torch.sqrt(y.var((0, 2, 3), unbiased=False, keepdim=True) + eps)
    gm, gs = goal_mean.view(1, -1, 1, 1), goal_std.view(1, -1, 1, 1)
    return {"repair": (y - mu) / sigma * gs + gm, "rescale": y / sigma * gs, "reshift": y - mu + gm,
            "rescale_centered": (y - mu) / sigma * gs + mu}[mode]


@pytest.mark.parametrize("mode", renorm.MODES)
def test_each_mode_matches_its_per_channel_formula(mode):
    net = small_net(0)
    x = torch.randn(64, 1, 6, 6)
    w = dict(net.state_dict())
    goal = {"0": (torch.tensor([0.5, -1.0, 2.0, 0.1], dtype=torch.float64),
                  torch.tensor([0.3, 2.0, 1.0, 0.7], dtype=torch.float64))}
    eps = 1e-5
    out = renorm.renormalize_to(net, w, goal, [x], mode, rule=["0"], eps=eps)
    y = conv0_out(net, w, x)
    torch.testing.assert_close(conv0_out(net, out, x), direct(mode, y, *goal["0"], eps), rtol=1e-4, atol=1e-5)
    # and the formulas really differ from each other on this data
    assert not torch.allclose(direct("rescale", y, *goal["0"], eps), direct("repair", y, *goal["0"], eps), atol=1e-2)


def test_rescale_to_own_std_and_reshift_to_own_mean_are_the_identity():
    net = small_net(1)
    x = torch.randn(80, 1, 6, 6)
    w = dict(net.state_dict())
    own = renorm.site_statistics(net, [x], w, rule="post_norm")
    xe = torch.randn(16, 1, 6, 6)
    ref = functional_call(net, w, (xe,))
    for mode in ("rescale", "reshift"):
        out = renorm.renormalize_to(net, w, own, [x], mode, rule="post_norm")
        torch.testing.assert_close(functional_call(net, out, (xe,)), ref, rtol=1e-4, atol=1e-5)
    # a goal std twice the own one doubles the first site's whole output under RESCALE (mean included)
    doubled = renorm.renormalize_to(net, w, own, [x], "rescale", rule=["0"], factor=2.0)
    torch.testing.assert_close(conv0_out(net, doubled, xe), 2 * conv0_out(net, w, xe), rtol=1e-4, atol=1e-5)


def test_average_goal_and_factor_as_in_the_seed():
    goal = {"s": (torch.tensor([1.0, -3.0, 2.0]), torch.tensor([1.0, 2.0, 6.0]))}
    mu, sigma = renorm.adjust_goal(goal, average=True, factor=0.5)["s"]
    torch.testing.assert_close(mu, 0.5 * torch.tensor([2.0, -2.0, 2.0]))
    torch.testing.assert_close(sigma, 0.5 * torch.tensor([3.0, 3.0, 3.0]))


def test_n_model_goal_and_seed_statistics():
    nets = [small_net(s) for s in range(3)]
    x = torch.randn(60, 1, 6, 6)
    batches = [x[:20], x[20:40], x[40:]]
    stats = [renorm.site_statistics(nets[0], batches, dict(n.state_dict()), rule="post_norm", statistics="seed")
             for n in nets]
    # seed statistics: average of per-batch means and of per-batch unbiased variances, no eps
    y = [conv0_out(nets[1], dict(nets[1].state_dict()), b) for b in batches]
    mean = torch.stack([b.mean((0, 2, 3)) for b in y]).mean(0)
    var = torch.stack([b.var((0, 2, 3), unbiased=True) for b in y]).mean(0)
    torch.testing.assert_close(stats[1]["0"][0], mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats[1]["0"][1], var.sqrt(), rtol=1e-5, atol=1e-6)
    alpha = [0.2, 0.3, 0.5]
    goal = renorm.mix_statistics(stats, alpha)
    for name in goal:
        for j in (0, 1):
            torch.testing.assert_close(goal[name][j], sum(a * s[name][j] for a, s in zip(alpha, stats, strict=True)))
    # the merged net reaches the mixed goal (one statistics batch: exact)
    merged = {k: sum(a * n.state_dict()[k] for a, n in zip(alpha, nets, strict=True)) for k in nets[0].state_dict()}
    out = renorm.renormalize_to(nets[0], merged, goal, [x], "repair", rule="post_norm", eps=0.0)
    after = renorm.site_statistics(nets[0], [x], out, rule="post_norm", eps=0.0)
    for name in goal:
        torch.testing.assert_close(after[name][0], goal[name][0], rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(after[name][1], goal[name][1], rtol=1e-3, atol=1e-4)
    with pytest.raises(ValueError, match="one per model"):
        renorm.mix_statistics(stats, [0.5, 0.5])


def test_sequential_equals_one_pass_on_one_batch_and_reaches_the_goal():
    a, b = small_net(0), small_net(1)
    x = torch.randn(50, 1, 6, 6)
    ta, tb = dict(a.state_dict()), dict(b.state_dict())
    mid = Linear(ta, tb)(0.5)
    one = renorm.renormalize(a, ta, tb, mid, 0.5, [x], "rescale", rule="post_norm")
    seq = renorm.renormalize(a, ta, tb, mid, 0.5, [x], "rescale", rule="post_norm", sequential=True)
    for k in one:
        torch.testing.assert_close(seq[k], one[k], rtol=1e-4, atol=1e-5)
    sa, sb = (renorm.site_statistics(a, [x], th, rule="post_norm") for th in (ta, tb))
    after = renorm.site_statistics(a, [x], seq, rule="post_norm")
    for name in sa:
        torch.testing.assert_close(after[name][1], (sa[name][1] + sb[name][1]) / 2, rtol=1e-3, atol=1e-4)


def test_site_rules_pre_norm_follows_the_seed():
    x = torch.randn(2, 1, 8, 8)
    vgg = get_net("vgg11_bn", num_classes=4, in_channels=1, input_size=8, width=0.0625)
    pre = renorm.find_sites(vgg, x, rule="auto")
    assert [s.name for s in pre] == [n for n, m in vgg.named_modules() if isinstance(m, nn.Conv2d)]
    assert {s.kind for s in pre} == {"layer"}
    assert {s.kind for s in renorm.find_sites(vgg, x, rule="post_norm")} == {"batchnorm"}
    res = get_net("resnet20", num_classes=4, in_channels=1, input_size=8, width=0.25)
    names = [s.name for s in renorm.find_sites(res, x, rule="pre_norm")]
    assert len(names) == 18 and all(".residual." in n for n in names)  # each block's conv1 and conv2 only
    mlp = get_net("mlp", num_classes=3, in_channels=1, input_size=8, depth=2, width=8)
    assert renorm.resolve_rule(mlp, "auto") == "post_norm"
    with pytest.raises(ValueError, match="not conv/linear"):
        renorm.find_sites(vgg, x, rule=["features.1"])
    with pytest.raises(ValueError, match="sites must be"):
        renorm.RenormOptions(sites="pre")


def test_pre_norm_repair_of_a_bn_net_is_a_bn_reset():
    a, b = (trained_like("vgg11_bn", s, num_classes=4, width=0.0625) for s in (0, 1))
    x = torch.randn(64, 1, 8, 8)
    ta, tb = dict(a.state_dict()), dict(b.state_dict())
    mid = Linear(ta, tb)(0.5)
    xe = torch.randn(16, 1, 8, 8)
    reset = functional_call(a, renorm.reset_bn(a, [x], mid), (xe,))
    for mode in ("repair", "rescale"):
        out = renorm.renormalize(a, ta, tb, mid, 0.5, [x], mode)  # auto: pre_norm for VGG
        # equal up to BN's eps, which the correction's scale moves relative to the variance
        torch.testing.assert_close(functional_call(a, out, (xe,)), reset, rtol=0, atol=3e-3)
    assert (functional_call(a, mid, (xe,)) - reset).abs().max() > 0.05  # without the reset it is another function


def test_evaluate_path_modes_and_data_independent_reset():
    a, b = small_net(0), small_net(1)
    x, y = torch.randn(100, 1, 6, 6), torch.randint(0, 3, (100,))
    path = Linear(a.state_dict(), b.state_dict())
    kw = dict(num_points=3, train_data=x, bn_batches=1, bn_batch_size=100, device="cpu")
    for mode in ("reshift", "rescale_centered"):
        res = evaluate_path(path, a, (x, y), bn=mode, renorm_options={"sites": "post_norm", "average": True}, **kw)
        assert res.meta["renorm_options"]["average"] is True
    with pytest.raises(ValueError, match="Unknown re-normalisation"):
        evaluate_path(path, a, (x, y), bn="rescale", renorm_options={"avg": True}, **kw)
    # data-independent RESET: BN normalises each test batch by its own statistics
    bn_net = get_net("vgg11_bn", num_classes=3, in_channels=1, input_size=8, width=0.0625).eval()
    torch.manual_seed(2)
    other = get_net("vgg11_bn", num_classes=3, in_channels=1, input_size=8, width=0.0625).eval()
    xt, yt = torch.randn(40, 1, 8, 8), torch.randint(0, 3, (40,))
    res = evaluate_path(Linear(bn_net.state_dict(), other.state_dict()), bn_net, (xt, yt), bn="reset_test",
                        num_points=2, batch_size=20, device="cpu")
    ref = bn_net.train()
    with torch.no_grad():
        logits = torch.cat([ref(xt[:20]), ref(xt[20:])])
    assert res.accuracy[0] == pytest.approx((logits.argmax(1) == yt).double().mean().item())
    assert res.loss[0] == pytest.approx(nn.functional.cross_entropy(logits, yt).item(), rel=1e-5)


def test_homogeneous_bias_interpolation():
    a, b = small_net(0), small_net(1)
    ta, tb = dict(a.state_dict()), dict(b.state_dict())
    path = Linear(ta, tb, homogeneous=True)
    assert path.degrees == {"2.bias": 2, "5.bias": 3}  # conv0.bias has h = 1: linear
    t = 0.3
    w = path(t)
    torch.testing.assert_close(w["5.bias"], (1 - t) ** 3 * ta["5.bias"] + t**3 * tb["5.bias"])
    torch.testing.assert_close(w["2.weight"], (1 - t) * ta["2.weight"] + t * tb["2.weight"])
    torch.testing.assert_close(path.stacked([0.0, t, 1.0])["2.bias"][1], w["2.bias"])
    # towards the zero net, a bias-carrying 3-layer ReLU net scales homogeneously: f_t = (1 - t)^3 f
    zero = Linear(ta, {k: torch.zeros_like(v) for k, v in ta.items()}, homogeneous=True)
    x = torch.randn(4, 1, 6, 6)
    torch.testing.assert_close(functional_call(a, zero(t), (x,)), (1 - t) ** 3 * a(x), rtol=1e-4, atol=1e-6)
    plain = Linear(ta, {k: torch.zeros_like(v) for k, v in ta.items()})
    assert not torch.allclose(functional_call(a, plain(t), (x,)), (1 - t) ** 3 * a(x), rtol=1e-2)
    res = evaluate_path(path, a, (x, torch.zeros(4, dtype=torch.long)), num_points=3, device="cpu")
    assert res.loss.shape == (3,)
