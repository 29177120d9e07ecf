"""timm's ViT through the traced spec: fused qkv (query/key one group, value/output another, heads as blocks).

The function tests use timm's own ``VisionTransformer`` class (the block, attention and MLP code of ViT-S/16) at
depth 2, width 96 and 6 heads (ViT-S/16 has depth 12, width 384, 6 heads), so that they run in seconds on a CPU;
the registry's full ``timm_vit_small_patch16_224`` is checked for its spec.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from lmc_lightning.weights.permutation import (
    SpecDerivationError,
    align_weights,
    apply_permutation,
    derive_spec,
)
from lmc_lightning.weights.permutation.apply import random_permutation
from lmc_lightning.weights.permutation.spec import Segment

timm = pytest.importorskip("timm")
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
DIM, HEADS = 96, 6


def small_vit(seed: int) -> nn.Module:
    """timm's VisionTransformer, ViT-S/16's blocks at depth 2 and width 96, every 1-d parameter randomised (timm
    initialises LayerNorms to 1/0 and biases to 0, which would hide a wrong permutation of them)."""
    torch.manual_seed(seed)
    net = VisionTransformer(img_size=32, patch_size=16, in_chans=3, num_classes=5, embed_dim=DIM, depth=2,
                            num_heads=HEADS)
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim == 1:
                p.normal_(1.0 if p.abs().sum() == p.numel() else 0.0, 0.3)
        net.cls_token.normal_()
        net.pos_embed.normal_()
    return net.eval()


def images(n: int = 4) -> Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def run64(net: nn.Module, theta: dict[str, Tensor], x: Tensor) -> Tensor:
    with torch.no_grad():
        return torch.func.functional_call(net.double(), {k: v.double() for k, v in theta.items()}, (x.double(),))


def test_fused_qkv_rows_split_into_query_key_and_value_groups() -> None:
    spec = derive_spec(small_vit(0))
    qk, vo = spec.groups["P_res_blocks.0.attn.qkv[0]"], spec.groups["P_blocks.0.attn.qkv[2]"]
    assert Segment("blocks.0.attn.qkv.weight", 0, 1, 0, DIM) in qk
    assert Segment("blocks.0.attn.qkv.weight", 0, 1, DIM, DIM) in qk  # keys share the queries' permutation
    assert Segment("blocks.0.attn.qkv.bias", 0, 1, DIM, DIM) in qk
    assert Segment("blocks.0.attn.qkv.weight", 0, 1, 2 * DIM, DIM) in vo
    assert ("blocks.0.attn.proj.weight", 1, 1) in vo
    heads = spec.heads["P_res_blocks.0.attn.qkv[0]"]
    assert heads.n_heads == HEADS and heads.tie == spec.heads["P_blocks.0.attn.qkv[2]"].tie
    assert ("blocks.0.attn.qkv.weight", 1, 1) in spec.groups["P_res_patch_embed.proj"]  # qkv reads the stream
    assert sorted(spec.activations["P_res_blocks.0.attn.qkv[0]"]) == [
        f"blocks.0.attn.qkv@2[0:{DIM}]", f"blocks.0.attn.qkv@2[{DIM}:{2 * DIM}]"]
    assert len(spec.groups) == 1 + 2 * 3  # residual stream; per block QK, VO, MLP


def test_a_random_permutation_moves_whole_heads_and_keeps_the_function() -> None:
    net = small_vit(0)
    theta = net.state_dict()
    spec = derive_spec(net)
    perm = random_permutation(spec, theta, torch.Generator().manual_seed(0))
    moved = apply_permutation(theta, spec, perm)
    keys = {a.key for axes in spec.groups.values() for a in axes}
    assert keys == set(theta) - {"head.bias"}  # everything but the output's bias is permuted ...
    assert all(not torch.equal(theta[k], moved[k]) for k in keys)  # ... and changes
    q = perm["P_res_blocks.0.attn.qkv[0]"].view(HEADS, -1) // (DIM // HEADS)
    assert all(len(set(row.tolist())) == 1 for row in q)
    x = images()
    assert (run64(net, theta, x) - run64(net, moved, x)).abs().max() < 1e-10


@pytest.mark.parametrize("method", ["weight", "activation"])
def test_matching_two_timm_vits_preserves_the_function(method: str) -> None:
    a, b = small_vit(0), small_vit(1)
    ta, tb = a.state_dict(), b.state_dict()
    x = images(8)
    aligned, perm = align_weights(a, ta, tb, method=method, data=torch.randn(64, 3, 32, 32), probe=x)  # checked
    assert (run64(a, tb, x) - run64(a, aligned, x)).abs().max() < 1e-5
    assert any(not torch.equal(p, torch.arange(len(p))) for p in perm.values())
    if method == "weight":
        dist = {n: sum(float((ta[k] - th[k]).square().sum()) for k in ta) for n, th in (("b", tb), ("al", aligned))}
        assert dist["al"] < 0.95 * dist["b"]


def test_unfused_attention_is_refused_naming_the_node() -> None:
    net = small_vit(0)
    for block in net.blocks:
        block.attn.fused_attn = False  # timm's explicit q @ k^T softmax path
    with pytest.raises(SpecDerivationError, match="at node '"):
        derive_spec(net)


def test_the_registry_vit_small_patch16_224_derives_its_spec() -> None:
    from lmc_lightning.nets import get_net

    net = get_net("timm_vit_small_patch16_224", num_classes=10, in_channels=3, input_size=32)
    spec = derive_spec(net)  # through the input resize to 224
    assert len(spec.groups) == 1 + 12 * 3
    assert {h.n_heads for h in spec.heads.values()} == {6}
    sizes = spec.sizes(net.state_dict())
    assert sizes["P_res_model.patch_embed.proj"] == 384 and sizes["P_model.blocks.11.mlp.fc1"] == 1536
