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


def random_grayscale(x: Tensor, p: float, generator: torch.Generator | None = None) -> Tensor:
    """Turn each 3-channel image grey with probability ``p`` (``transforms.RandomGrayscale``).

    Grey is ``0.2989 R + 0.587 G + 0.114 B`` (torchvision's weights) in all three channels; ``uint8`` images are
    rounded back to ``uint8``. Images with one channel are already grey and come back unchanged.
    """
    if p <= 0 or x.shape[1] != 3:
        return x
    pick = torch.rand(x.shape[0], generator=generator, device=x.device) < p
    weights = torch.tensor([0.2989, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)
    grey = (x.float() * weights).sum(1, keepdim=True).expand_as(x)
    grey = grey.round().clamp(0, 255).to(x.dtype) if x.dtype == torch.uint8 else grey.to(x.dtype)
    return torch.where(pick[:, None, None, None], grey, x)


def random_erasing(x: Tensor, p: float, scale: tuple[float, float] = (0.02, 0.25),
                   ratio: tuple[float, float] = (0.3, 3.3), value: float = 0.0, attempts: int = 10,
                   generator: torch.Generator | None = None) -> Tensor:
    """Erase one random rectangle per image with probability ``p`` (``transforms.RandomErasing``, vectorised).

    As torchvision: the rectangle's area is ``U(scale)`` of the image and its aspect ratio log-uniform in ``ratio``;
    of ``attempts`` draws the first that fits inside the image is used (none fits: the image stays whole), at a
    uniform position; its pixels (all channels) become ``value``.

    Args:
        x: Images ``[B, C, H, W]`` (float; ``value`` in the same units).
        p: Probability of erasing an image.
        scale: Range of the erased fraction of the area.
        ratio: Range of the aspect ratio (height / width).
        value: Fill value.
        attempts: Draws per image before giving up.
        generator: Random generator on ``x``'s device.
    """
    if p <= 0:
        return x
    b, _, h, w = x.shape
    dev = x.device
    area = h * w * (scale[0] + (scale[1] - scale[0]) * torch.rand(b, attempts, generator=generator, device=dev))
    log_r = torch.log(torch.tensor(ratio, device=dev))
    aspect = torch.exp(log_r[0] + (log_r[1] - log_r[0]) * torch.rand(b, attempts, generator=generator, device=dev))
    eh = torch.sqrt(area * aspect).round().long()
    ew = torch.sqrt(area / aspect).round().long()
    fits = (eh < h) & (ew < w)
    first = torch.where(fits.any(1), fits.float().argmax(1), torch.zeros(b, dtype=torch.long, device=dev))
    rows = torch.arange(b, device=dev)
    eh, ew = eh[rows, first], ew[rows, first]
    erase = fits.any(1) & (torch.rand(b, generator=generator, device=dev) < p)
    top = (torch.rand(b, generator=generator, device=dev) * (h - eh + 1).clamp(min=1)).long()
    left = (torch.rand(b, generator=generator, device=dev) * (w - ew + 1).clamp(min=1)).long()
    ys = torch.arange(h, device=dev)[None, :]
    xs = torch.arange(w, device=dev)[None, :]
    in_rows = (ys >= top[:, None]) & (ys < (top + eh)[:, None])
    in_cols = (xs >= left[:, None]) & (xs < (left + ew)[:, None])
    mask = (in_rows[:, :, None] & in_cols[:, None, :] & erase[:, None, None])[:, None]
    return torch.where(mask, torch.as_tensor(value, dtype=x.dtype, device=dev), x)


class BatchTransform:
    """Turns a stored ``(images, labels)`` batch into model input: optional crop + flip, float, normalisation.

    Order (MCSurface's training transform): crop, flip, grayscale (on the stored images), conversion to floats in
    ``[0, 1]``, random erasing (value 0 before normalisation, as ``RandomErasing`` after ``ToTensor``), normalisation.

    Args:
        mean: Per-channel mean of the data in ``[0, 1]`` units.
        std: Per-channel standard deviation in ``[0, 1]`` units.
        normalize: Subtract ``mean`` and divide by ``std``; otherwise images are floats in ``[0, 1]``.
        augment: Apply :func:`random_crop` and :func:`random_hflip`.
        padding: Crop padding used when augmenting.
        erasing: Probability of :func:`random_erasing` (torchvision's scale and ratio defaults); 0: off.
        grayscale: Probability of :func:`random_grayscale`; 0: off.
    """

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        normalize: bool = True,
        augment: bool = False,
        padding: int = 4,
        erasing: float = 0.0,
        grayscale: float = 0.0,
    ) -> None:
        if len(mean) != len(std):
            raise ValueError(f"mean has {len(mean)} channels but std has {len(std)}")
        if not (0 <= erasing <= 1 and 0 <= grayscale <= 1):
            raise ValueError(f"erasing and grayscale are probabilities in [0, 1], got {erasing} and {grayscale}.")
        self.erasing = float(erasing)
        self.grayscale = float(grayscale)
        self.normalize = normalize
        self.augment = augment
        self.padding = padding
        std_t = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.scale = 1.0 / std_t
        self.shift = -torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1) / std_t

    @property
    def stochastic(self) -> bool:
        """Whether any random transform is on (the loaders then seed a generator for it)."""
        return self.augment or self.erasing > 0 or self.grayscale > 0

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
        x = random_grayscale(x, self.grayscale, generator)
        x = x.float().div_(255) if x.dtype == torch.uint8 else x.to(torch.float32, copy=True)
        x = random_erasing(x, self.erasing, generator=generator)
        if self.normalize:
            if self.scale.device != x.device:
                self.scale, self.shift = self.scale.to(x.device), self.shift.to(x.device)
            x = torch.addcmul(self.shift, x, self.scale)
        return x, y
