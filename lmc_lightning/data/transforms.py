"""Batched, vectorised image transforms that run on whichever device the batch lives on.

Images are ``[B, C, H, W]`` tensors, ``uint8`` in ``[0, 255]`` or float in ``[0, 1]``. Augmentation works on the
stored dtype (cheap on ``uint8``); conversion to float and channel normalisation come last.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def random_crop(x: Tensor, padding: int, generator: torch.Generator | None = None) -> Tensor:
    """Zero-pad every image by ``padding`` pixels and crop it back to its size at an independent random offset.

    Args:
        x: Images ``[B, C, H, W]``.
        padding: Pixels of zero padding on each side; 0 returns ``x`` unchanged.
        generator: Random generator on ``x``'s device (``None``: the global one).
    """
    if padding == 0:
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    offsets = torch.randint(0, 2 * padding + 1, (2, b), generator=generator, device=x.device)
    rows = offsets[0, :, None] + torch.arange(h, device=x.device)  # [B, H]
    cols = offsets[1, :, None] + torch.arange(w, device=x.device)  # [B, W]
    batch = torch.arange(b, device=x.device)[:, None, None]
    # Advanced indices around a slice put the indexed dims first: [B, H, W, C].
    return padded[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


def random_hflip(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Mirror each image left-right with probability 1/2."""
    flip = torch.rand(x.shape[0], generator=generator, device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


class BatchTransform:
    """Turns a stored ``(images, labels)`` batch into model input: optional crop + flip, float, normalisation.

    Args:
        mean: Per-channel mean of the data in ``[0, 1]`` units.
        std: Per-channel standard deviation in ``[0, 1]`` units.
        normalize: Subtract ``mean`` and divide by ``std``; otherwise images are floats in ``[0, 1]``.
        augment: Apply :func:`random_crop` and :func:`random_hflip`.
        padding: Crop padding used when augmenting.
    """

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        normalize: bool = True,
        augment: bool = False,
        padding: int = 4,
    ) -> None:
        if len(mean) != len(std):
            raise ValueError(f"mean has {len(mean)} channels but std has {len(std)}")
        self.normalize = normalize
        self.augment = augment
        self.padding = padding
        std_t = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.scale = 1.0 / std_t
        self.shift = -torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1) / std_t

    def to(self, device: torch.device | str) -> BatchTransform:
        """A copy whose normalisation constants live on ``device`` (no per-batch copies there)."""
        moved = copy.copy(self)
        moved.scale, moved.shift = self.scale.to(device), self.shift.to(device)
        return moved

    def __call__(self, batch: tuple[Tensor, Tensor], generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Transform one batch; ``generator`` must be on the batch's device."""
        x, y = batch
        if self.augment:
            x = random_hflip(random_crop(x, self.padding, generator), generator)
        x = x.float().div_(255) if x.dtype == torch.uint8 else x.to(torch.float32, copy=True)
        if self.normalize:
            if self.scale.device != x.device:
                self.scale, self.shift = self.scale.to(x.device), self.shift.to(x.device)
            x = torch.addcmul(self.shift, x, self.scale)
        return x, y
