"""The traced spec beyond plain CNNs: attention heads, LayerNorm residual streams, embeddings, torch.cat, grouped
and depthwise convs; the small ViT and MobileNetV2 of the registry align with their function preserved."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmc_lightning.nets import get_net
from lmc_lightning.weights.permutation import (
    EquivalenceError,
    PermutationSpec,
    SpecDerivationError,
    align,
    align_weights,
    apply_permutation,
    check_equivalence,
    derive_spec,
    weight_matching,
)
from lmc_lightning.weights.permutation.apply import random_permutation

pytestmark = pytest.mark.usefixtures("one_thread")


def vit(seed: int, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    net = get_net("vit", num_classes=5, in_channels=3, input_size=8, width=0.25, depth=2, **kwargs)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.3)
        net.cls_token.normal_()
    return net.eval()


def images(n: int = 4, side: int = 8, dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.randn(n, 3, side, side, dtype=dtype, generator=torch.Generator().manual_seed(7))


def test_vit_spec_ties_query_key_and_moves_heads_as_blocks() -> None:
    spec = derive_spec(vit(0))
    qk = spec.groups["P_res_blocks.0.attn.q"]
    assert ("blocks.0.attn.q.weight", 0, 1) in qk and ("blocks.0.attn.k.weight", 0, 1) in qk
    vo = spec.groups["P_blocks.0.attn.v"]
    assert ("blocks.0.attn.proj.weight", 1, 1) in vo
    assert spec.heads["P_res_blocks.0.attn.q"].tie == spec.heads["P_blocks.0.attn.v"].tie
    assert spec.heads["P_blocks.0.attn.v"].n_heads == 4
    stream = spec.groups["P_res_patch"]  # one residual stream: patch embedding, tokens, LayerNorms, head
    for entry in [("cls_token", 2, 1), ("pos_embed", 2, 1), ("blocks.1.norm2.weight", 0, 1), ("head.weight", 1, 1),
                  ("blocks.0.attn.proj.bias", 0, 1), ("patch.weight", 0, 1)]:
        assert entry in stream
    perm = random_permutation(spec, vit(0).state_dict(), torch.Generator().manual_seed(0))
    heads = perm["P_res_blocks.0.attn.q"].view(4, -1) // 8
    assert all(len(set(row.tolist())) == 1 for row in heads)  # whole heads move
    assert torch.equal(heads[:, 0], perm["P_blocks.0.attn.v"].view(4, -1)[:, 0] // 8)  # one head order


@pytest.mark.parametrize("method", ["weight", "activation"])
def test_vit_alignment_preserves_the_function(method: str) -> None:
    net_a, net_b = vit(0), vit(1)
    x = images(32)
    aligned, perm = align(net_a, net_b, method=method, data=x if method == "activation" else None, probe=x[:4])
    assert (aligned(x) - net_b(x)).abs().max().item() < 1e-5
    assert any(not torch.equal(p, torch.arange(len(p))) for p in perm.values())


def test_vit_weight_matching_finds_a_hidden_head_permutation() -> None:
    net = vit(0)
    spec = derive_spec(net)
    theta = net.state_dict()
    hidden = random_permutation(spec, theta, torch.Generator().manual_seed(3))
    result = weight_matching(spec, theta, apply_permutation(theta, spec, hidden))
    back = apply_permutation(apply_permutation(theta, spec, hidden), spec, result.perm)
    assert all(torch.equal(back[k], theta[k]) for k in theta)


@pytest.mark.parametrize("name", ["mobilenetv2", "mobilenetv2_grouped"])
def test_mobilenet_alignment_preserves_the_function(name: str) -> None:
    nets = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        net = get_net(name, num_classes=5, in_channels=3, input_size=8, width=0.25)
        with torch.no_grad():
            for m in net.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.normal_(0, 0.3)
                    m.running_var.uniform_(0.5, 2.0)
        nets.append(net.eval())
    spec = derive_spec(nets[0])
    depthwise = "features.3.block.3.weight" if name == "mobilenetv2" else "features.3.block.3.weight"
    assert any(a.key == depthwise and a.axis == 0 for axes in spec.groups.values() for a in axes)
    if name == "mobilenetv2_grouped":
        assert spec.heads and all(h.n_heads == 2 for h in spec.heads.values())
        assert any(not h.within for h in spec.heads.values())
    x = images()
    aligned, perm = align(nets[0], nets[1], probe=x)
    assert (aligned(x) - nets[1](x)).abs().max().item() < 1e-5


class Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 5, 1)
        self.bn = nn.BatchNorm2d(9)
        self.c = nn.Conv2d(9, 6, 3)
        self.out = nn.Linear(6 + 4, 2)

    def forward(self, x: Tensor) -> Tensor:
        a = F.relu(self.a(x))
        h = self.c(F.relu(self.bn(torch.cat([a, self.b(x)], dim=1)))).mean((2, 3))
        return self.out(torch.cat([F.relu(h), a.amax((2, 3))], 1))


class Tokens(nn.Module):
    """Embedding, LayerNorm residual stream, mean over tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.norm = nn.LayerNorm(6)
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, ids: Tensor) -> Tensor:
        x = self.embed(ids)
        x = x + self.fc2(F.gelu(self.fc1(self.norm(x))))
        return self.out(x.mean(1))


def test_concatenation_gives_each_part_a_segment() -> None:
    net = Concat().double().eval()
    with torch.no_grad():
        net.bn.running_mean.normal_()
    spec = derive_spec(net)
    assert ("c.weight", 1, 1, 0, 4) in spec.groups["P_a"] and ("c.weight", 1, 1, 4, 5) in spec.groups["P_b"]
    assert ("bn.running_mean", 0, 1, 4, 5) in spec.groups["P_b"] and ("out.weight", 1, 1, 6, 4) in spec.groups["P_a"]
    theta = net.state_dict()
    x = images(3, 6, torch.float64)
    perm = random_permutation(spec, theta, torch.Generator().manual_seed(0))
    permuted = apply_permutation(theta, spec, perm)
    assert (torch.func.functional_call(net, permuted, (x,)) - net(x)).abs().max().item() < 1e-12
    other = {k: v + 0.1 * torch.randn_like(v) if v.is_floating_point() else v for k, v in theta.items()}
    align_weights(net, theta, other, probe=x)  # runs the check
    align_weights(net, theta, other, method="activation", data=images(16, 6, torch.float64))


def test_embedding_and_token_stream() -> None:
    net = Tokens().double().eval()
    spec = derive_spec(net)
    stream = next(iter(spec.groups.values()))
    assert ("embed.weight", 1, 1) in stream and ("norm.weight", 0, 1) in stream and ("out.weight", 1, 1) in stream
    ids = torch.randint(11, (4, 7), generator=torch.Generator().manual_seed(0))
    theta = net.state_dict()
    perm = random_permutation(spec, theta, torch.Generator().manual_seed(1))
    assert check_equivalence(net, theta, spec, perm, ids) < 1e-12


class ManualAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.out = nn.Linear(4, 8), nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.out((self.q(x) @ self.k(x).transpose(1, 2)).softmax(-1) @ self.q(x))


class BadGroupNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.attn(x, x, x)[0]


@pytest.mark.parametrize(("net", "words"), [
    (ManualAttention(), ["node 'matmul'", "unsupported operation"]),
    (BadGroupNorm(), ["module 'attn'", "MultiheadAttention"]),
])
def test_unsupported_attention_forms_raise_naming_the_node(net: nn.Module, words: list[str]) -> None:
    with pytest.raises(SpecDerivationError) as info:
        derive_spec(net)
    assert all(w in str(info.value) for w in words), str(info.value)


def test_check_names_a_wrong_head_structure() -> None:
    net_a, net_b = vit(0).double(), vit(1).double()
    spec = derive_spec(net_a)
    no_heads = PermutationSpec(spec.groups, spec.activations, spec.buffers)  # heads dropped: units mix across heads
    theta_a, theta_b = net_a.state_dict(), net_b.state_dict()
    with pytest.raises(EquivalenceError) as info:
        align_weights(net_a, theta_a, theta_b, spec=no_heads, probe=images(dtype=torch.float64))
    assert "attn" in str(info.value)
