"""A small Vision Transformer for small images (pre-norm blocks, class token, learned position embeddings).

Built from ``nn.Linear``, ``nn.LayerNorm``, a patch ``nn.Conv2d``, ``F.scaled_dot_product_attention`` and
additions, so ``torch.fx`` traces it and permutation alignment derives its spec (heads, residual stream, tokens).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmc_lightning.nets.layers import check_common, check_int, check_width, scaled
from lmc_lightning.nets.registry import register


class Attention(nn.Module):
    """Multi-head self-attention with separate query, key and value projections."""

    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads = heads
        inner = heads * head_dim
        self.q, self.k, self.v = nn.Linear(dim, inner), nn.Linear(dim, inner), nn.Linear(dim, inner)
        self.proj = nn.Linear(inner, dim)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, T, dim]`` -> ``[B, T, dim]``."""
        b, t = x.shape[0], x.shape[1]
        q = self.q(x).view(b, t, self.heads, -1).transpose(1, 2)
        k = self.k(x).view(b, t, self.heads, -1).transpose(1, 2)
        v = self.v(x).view(b, t, self.heads, -1).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, t, -1))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, dim: int, heads: int, head_dim: int, mlp_dim: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, head_dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        """``[B, T, dim]`` -> ``[B, T, dim]``."""
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Patch embedding, class token, position embeddings, pre-norm blocks, final LayerNorm, linear head.

    Args:
        num_classes: Output size.
        in_channels: Input image channels.
        input_size: Input image height (= width); must be a multiple of ``patch``.
        patch: Patch side (default: ``input_size // 4``, i.e. 16 patches).
        depth: Number of blocks.
        heads: Attention heads per block.
        width: Multiplier of the head size 32 (so ``dim = heads * round(32 * width)``); the MLP is twice as wide.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, input_size: int = 32, patch: int = 0,
                 depth: int = 4, heads: int = 4, width: float = 1.0) -> None:
        super().__init__()
        check_common(num_classes, in_channels, input_size)
        check_int("depth", depth, 1)
        check_int("heads", heads, 1)
        check_int("patch", patch, 0)
        patch = patch or max(1, input_size // 4)
        if input_size % patch:
            raise ValueError(f"input_size {input_size} is not a multiple of patch {patch}; choose patch dividing it.")
        head_dim = scaled(32, check_width(width))
        dim = heads * head_dim
        tokens = (input_size // patch) ** 2 + 1
        self.patch = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.blocks = nn.Sequential(*(Block(dim, heads, head_dim, 2 * dim) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[B, num_classes]`` of images ``[B, C, H, W]``."""
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


register("vit")(ViT)
