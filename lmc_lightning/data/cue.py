"""Cue datasets and their counterfactual evaluation sets, as in MMC (seed 000, Lubana et al., ICML 2023).

A :class:`CueDataModule` wraps any base datamodule (MNIST, Fashion-MNIST, CIFAR-10/100, TinyImageNet) and adds a
*cue* to a deterministic share of its samples:

- ``"box"``: a ``box_size`` x ``box_size`` square drawn in normalised pixel space at a location given by
  ``label % 10`` on a 3x3 layout (0..8 = upper-left, upper-centre, upper-right, middle-left, centre, middle-right,
  lower-left, lower-centre, lower-right; centre slices ``(W - s) // 2 : (W + s) // 2``). On data with at most 10
  classes, label 9 gets **no box** (absence is the cue). With more classes, location 9 is "mid-upper-left" (the
  centre offset by ``-H // 4, -W // 4``) and the colour has hue ``(label // 10) / 10``; on 10-class data the hue is
  1.0. Colours are MMC's ``hsv_to_rgb(hue, 1, 1)[[2, 0, 1]]`` in normalised units (hue 1.0: ``(0, 1, 0)``); on
  single-channel data the box value is 1.0 (the hue cannot show; our choice, the seed has only RGB data).
- ``"dominoes"``: ``3 x 64 x 32`` inputs; the top half is a Fashion-MNIST image of the same class index (the i-th
  base sample of class c with the i-th top sample of class c, wrapping around when a class of the top data is
  shorter), as RGB, resized to 32x32 and left in [0, 1]; the bottom half is the base image. No cue: zeros on top.
- ``"none"``: the base data (with this module's normalisation); no counterfactual sets.

Which samples carry a cue is deterministic: per class, the first ``floor(n_c * cue_proportion)`` samples in dataset
order (the same rule on every split). Inputs are normalised with mean 0.5 / std 0.5 (``normalization="mmc"``, as
in the seed) or with the base's statistics (``"base"``). The seed uses no augmentation: set the base's ``augment``
to false for CIFAR (its default is on).

Evaluation sets (:meth:`CueDataModule.eval_sets`), every sample carrying its cue when ``eval_proportion`` is 1:

- ``clean``: the base images without any cue;
- ``cue``: with the label's cue;
- ``rand_cue``: the cue of a uniformly random class (box: location, and hue with more than 10 classes; on 10-class
  data location 9 means no box) or, for dominoes, a uniformly random top image: only the image is informative;
- ``rand_image``: each image replaced by a uniformly random image of the same split, the label's cue kept: only the
  cue is informative (chance is ``1 / num_classes``).

Counterfactual draws are seeded (``counterfactual_seed``, the split and the set), so every rank and every call gets
the same sets. Rendering runs on whole batches, on the device of the batch: batches carry each sample's cue as part
of an integer code (``label + num_classes * (1 + cue)``, ``cue = -1`` for none), which :class:`CueTransform` decodes.
"""

from __future__ import annotations

import colorsys
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import CombinedLoader
from torch import Tensor

import lmc_lightning.data as data_pkg
from lmc_lightning.data.base import SPLITS, BaseDataModule, Split
from lmc_lightning.data.loaders import mix_seed
from lmc_lightning.data.transforms import BatchTransform

CUES = ("box", "dominoes", "none")
EVAL_SETS = ("clean", "cue", "rand_cue", "rand_image")
TRAIN_SETS = ("clean", "cue")
NO_CUE = -1
RENDER_CHUNK = 8192
"""Samples per rendering call when whole sets are rendered (bounds the peak memory)."""


def cue_ids(y: Tensor, proportion: float, num_classes: int) -> Tensor:
    """``[N]`` bool: per class, the first ``floor(n_c * proportion)`` samples in dataset order carry a cue."""
    if not 0.0 <= proportion <= 1.0:
        raise ValueError(f"cue proportion must lie in [0, 1], got {proportion}.")
    keep = torch.floor(torch.bincount(y, minlength=num_classes).double() * proportion).long()
    return class_rank(y, num_classes) < keep[y]


def class_rank(y: Tensor, num_classes: int) -> Tensor:
    """``[N]``: the index of each sample among the samples of its class, in dataset order."""
    counts = torch.bincount(y, minlength=num_classes)
    order = torch.argsort(y, stable=True)
    rank = torch.empty_like(y)
    rank[order] = torch.arange(len(y)) - (torch.cumsum(counts, 0) - counts)[y[order]]
    return rank


def box_corners(height: int, width: int, size: int) -> Tensor:
    """``[10, 2]`` top-left ``(row, col)`` of the box at locations 0..9 (9 = mid-upper-left)."""
    if size < 1 or size > min(height, width):
        raise ValueError(f"box_size must be in [1, {min(height, width)}] for {height}x{width} images, got {size}.")
    rows = (0, (height - size) // 2, height - size)
    cols = (0, (width - size) // 2, width - size)
    corners = [(r, c) for r in rows for c in cols]
    corners.append((max(0, (height - size) // 2 - height // 4), max(0, (width - size) // 2 - width // 4)))
    return torch.tensor(corners, dtype=torch.long)


def box_colours(num_classes: int, channels: int) -> Tensor:
    """``[num_classes, channels]`` box colour per cue class in normalised units (see the module docstring)."""
    if channels != 3:
        return torch.ones(num_classes, channels)
    hues = [1.0 if num_classes <= 10 else (c // 10) / 10 for c in range(num_classes)]
    rgb = torch.tensor([colorsys.hsv_to_rgb(h, 1.0, 1.0) for h in hues], dtype=torch.float32)
    return rgb[:, [2, 0, 1]]


def render_box(x: Tensor, cue: Tensor, num_classes: int, size: int = 3, colours: Tensor | None = None) -> Tensor:
    """Draw each sample's box cue into normalised images ``x`` ``[B, C, H, W]`` (a new tensor).

    Args:
        x: Normalised images.
        cue: ``[B]`` cue class per sample (location ``cue % 10``); ``-1``: no cue.
        num_classes: Classes of the data (at most 10: cue class 9 draws nothing).
        size: Side of the square.
        colours: ``[num_classes, C]`` colours (default :func:`box_colours`), on ``x``'s device.
    """
    b, c, h, w = x.shape
    corners = box_corners(h, w, size).to(x.device)
    colours = box_colours(num_classes, c).to(x.device) if colours is None else colours
    draw = cue >= 0
    if num_classes <= 10:
        draw &= cue % 10 != 9
    cls = cue.clamp(min=0)
    r0, c0 = corners[cls % 10].unbind(1)
    rows, cols = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    in_rows = (rows >= r0[:, None]) & (rows < r0[:, None] + size)  # [B, H]
    in_cols = (cols >= c0[:, None]) & (cols < c0[:, None] + size)  # [B, W]
    mask = (in_rows[:, :, None] & in_cols[:, None, :] & draw[:, None, None])[:, None]  # [B, 1, H, W]
    return torch.where(mask, colours[cls].to(x.dtype)[:, :, None, None], x)


def render_dominoes(x: Tensor, cue: Tensor, tops: Tensor, side: int = 32) -> Tensor:
    """Stack each sample's top image (RGB, resized to ``side``, in [0, 1]; zeros without a cue) above ``x``.

    Args:
        x: Normalised bottom images ``[B, 3, side, side]``.
        cue: ``[B]`` index into ``tops``; ``-1``: no cue (zeros on top).
        tops: Top images ``[M, C, h, w]`` (uint8 in [0, 255] or float in [0, 1]), on ``x``'s device.
        side: Side of the resized top image.
    """
    top = tops[cue.clamp(min=0)]
    top = top.float().div_(255) if top.dtype == torch.uint8 else top.float()
    if top.shape[1] == 1:
        top = top.expand(-1, 3, -1, -1)
    if top.shape[-2:] != (side, side):
        top = F.interpolate(top, size=(side, side), mode="bilinear", align_corners=False)
    top = torch.where((cue >= 0)[:, None, None, None], top, torch.zeros((), device=x.device))
    return torch.cat([top.to(x.dtype), x], dim=2)


class CueTransform(BatchTransform):
    """A :class:`BatchTransform` that decodes ``label + K * (1 + cue)`` codes and renders the cue after normalising.

    Args:
        mean, std, normalize, augment, padding: As :class:`BatchTransform`.
        num_classes: ``K``.
        cue: ``"box"``, ``"dominoes"`` or ``"none"``.
        box_size: Side of the box.
        tops: Dominoes' top images (indexed by the cue), stored form.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], normalize: bool, augment: bool, padding: int,
                 num_classes: int, cue: str, box_size: int = 3, tops: Tensor | None = None) -> None:
        super().__init__(mean, std, normalize, augment, padding)
        self.num_classes, self.cue, self.box_size, self.tops = num_classes, cue, box_size, tops
        self.colours: Tensor | None = None

    def to(self, device: torch.device | str) -> CueTransform:
        """A copy with its constants (and top images) on ``device``."""
        moved = super().to(device)
        moved.tops = None if self.tops is None else self.tops.to(device)
        moved.colours = None if self.colours is None else self.colours.to(device)
        return moved

    def __call__(self, batch: tuple[Tensor, Tensor], generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Normalise (and augment) the images, then draw each sample's cue; returns ``(x, labels)``."""
        x, code = batch
        y, cue = code % self.num_classes, code // self.num_classes - 1
        x, y = super().__call__((x, y), generator)
        if self.cue == "box":
            if self.colours is None or self.colours.device != x.device:
                self.colours = box_colours(self.num_classes, x.shape[1]).to(x.device)
            x = render_box(x, cue.to(x.device), self.num_classes, self.box_size, self.colours)
        elif self.cue == "dominoes":
            if self.tops.device != x.device:
                self.tops = self.tops.to(x.device)
            x = render_dominoes(x, cue.to(x.device), self.tops, side=x.shape[-1])
        return x, y


def _resolve(base: str | BaseDataModule, args: Mapping[str, Any] | None, what: str) -> BaseDataModule:
    if isinstance(base, BaseDataModule):
        if args:
            raise ValueError(f"{what}_args applies to a datamodule given by name; configure the instance instead.")
        return base
    cls = getattr(data_pkg, str(base), None)
    if not (isinstance(cls, type) and issubclass(cls, BaseDataModule)) or cls.__name__ == "CueDataModule":
        names = sorted(n for n in data_pkg.__all__ if n.endswith("DataModule") and n not in ("BaseDataModule",
                                                                                              "CueDataModule"))
        raise ValueError(f"{what}={base!r} is not an lmc_lightning datamodule; choose one of {names}.")
    return cls(**dict(args or {}))


class CueDataModule(BaseDataModule):
    """A base datamodule with MMC's cues (box or dominoes) and counterfactual evaluation sets.

    Training, validation and test loaders serve the cue data at ``cue_proportion`` (the cue model's data; at 0 the
    no-cue model's). :meth:`eval_sets` gives the named counterfactual sets of a split; :meth:`set_train_mixture`
    switches the training loader to named subsets drawn with replacement (MMC's fine-tuning data).

    Args:
        base: The base datamodule: a class name from :mod:`lmc_lightning.data` (``"FashionMNISTDataModule"``,
            ``"CIFAR10DataModule"``, ...) built with ``base_args``, or an instance.
        base_args: The base's own arguments (``root``, ``batch_size``, ``val_split``, ``augment``, ``seed``,
            ``device_resident``, ...); batch sizes, workers, seed and residency are taken from the base.
        cue: ``"box"``, ``"dominoes"`` or ``"none"``.
        cue_proportion: Share of each class carrying the cue in the training/validation/test loaders.
        eval_proportion: Share of each class carrying the cue in :meth:`eval_sets` (MMC's path evaluation: 1.0; its
            fine-tuning report: the training ``cue_proportion``).
        normalization: ``"mmc"`` (mean 0.5, std 0.5 per channel, as in the seed) or ``"base"`` (the base's).
        box_size: Side of the box cue in pixels.
        counterfactual_seed: Seed of the random cues and images of ``rand_cue`` / ``rand_image``.
        dominoes_top: Datamodule of the dominoes' top images (a name from :mod:`lmc_lightning.data`).
        dominoes_top_args: Its arguments (e.g. ``root``).
    """

    def __init__(
        self,
        base: str | BaseDataModule = "FashionMNISTDataModule",
        base_args: dict[str, Any] | None = None,
        cue: Literal["box", "dominoes", "none"] = "box",
        cue_proportion: float = 0.8,
        eval_proportion: float = 1.0,
        normalization: Literal["mmc", "base"] = "mmc",
        box_size: int = 3,
        counterfactual_seed: int = 0,
        dominoes_top: str = "FashionMNISTDataModule",
        dominoes_top_args: dict[str, Any] | None = None,
    ) -> None:
        base_dm = _resolve(base, base_args, "base")
        super().__init__(base_dm.root, base_dm.batch_size, base_dm.eval_batch_size, base_dm.num_workers,
                         base_dm.val_split, base_dm.train_subset, base_dm.subset_mode, base_dm.augment,
                         base_dm.normalize, False, base_dm.seed, base_dm.device_resident,
                         steps_per_batch=base_dm.steps_per_batch)
        if isinstance(base, BaseDataModule):  # checkpoints keep plain types only (weights_only loading)
            self.hparams.update(base=type(base).__name__, base_args=None)
        if cue not in CUES:
            raise ValueError(f"cue must be one of {CUES}, got {cue!r}.")
        for name, p in (("cue_proportion", cue_proportion), ("eval_proportion", eval_proportion)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {p}.")
        if normalization not in ("mmc", "base"):
            raise ValueError(f"normalization must be 'mmc' (0.5/0.5, as in the seed) or 'base', got {normalization!r}.")
        self.base = base_dm
        self.cue, self.cue_proportion, self.eval_proportion = cue, float(cue_proportion), float(eval_proportion)
        self.normalization, self.box_size, self.counterfactual_seed = normalization, box_size, counterfactual_seed
        self.num_classes = base_dm.num_classes
        c, h, w = base_dm.input_shape
        self.crop_padding = base_dm.crop_padding
        mmc = normalization == "mmc"
        self.mean = (0.5,) * c if mmc else tuple(base_dm.mean)
        self.std = (0.5,) * c if mmc else tuple(base_dm.std)
        self.input_shape = (c, h, w)
        box_corners(h, w, box_size)  # validates the size
        self.top: BaseDataModule | None = None
        if cue == "dominoes":
            if (c, h, w) != (3, 32, 32):
                raise ValueError(f"cue='dominoes' stacks two 32x32 images: the base must have 3x32x32 inputs "
                                 f"(CIFAR-10), got {base_dm.input_shape}.")
            self.top = _resolve(dominoes_top, dominoes_top_args, "dominoes_top")
            if self.top.num_classes < self.num_classes:
                raise ValueError(f"dominoes_top has {self.top.num_classes} classes, fewer than the base's "
                                 f"{self.num_classes}; each class needs top images of the same index.")
            self.input_shape = (3, 64, 32)
        self._labels: dict[str, Tensor] = {}
        self._tops: Tensor | None = None
        self._top_offset: dict[str, int] = {}
        self._pairs: dict[str, Tensor] = {}
        self._mixture: dict[str, tuple[Tensor, Tensor]] = {}

    # Lightning hooks ------------------------------------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Let the base (and the dominoes' top data) download."""
        self.base.prepare_data()
        if self.top is not None:
            self.top.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        """Set up the base, pair dominoes, and code every split at ``cue_proportion``."""
        if self._splits:
            return
        self.base.setup(stage)
        raw = {s: self.base._get(s) for s in SPLITS}
        if self.top is not None:
            self.top.setup(stage)
            top = {s: self.top._get(s) for s in ("train", "test")}
            self._tops = torch.cat([top["train"][0], top["test"][0]])
            self._top_offset = {"train": 0, "val": 0, "test": len(top["train"][0])}
            for split, (_, y) in raw.items():
                source = "test" if split == "test" else "train"
                self._pairs[split] = self._top_offset[split] + _pair(y, top[source][1], self.num_classes)
        self._labels = {s: y for s, (_, y) in raw.items()}
        self._splits = {s: (x, self._code(s, y, self._own_cue(s, y), cue_ids(y, self.cue_proportion,
                                                                                   self.num_classes)))
                        for s, (x, y) in raw.items()}

    def train_dataloader(self) -> Any:
        """The cue training data, or with :meth:`set_train_mixture`, ``{name: (x, y)}`` batches of its subsets
        (``CombinedLoader`` in ``min_size`` mode: an epoch ends with the shortest loader, as ``zip``)."""
        if not self._mixture:
            return super().train_dataloader()
        loaders = {name: self._loader(f"train_{name}", x, code, train=True) for name, (x, code) in
                   self._mixture.items()}
        return CombinedLoader(loaders, mode="min_size")

    # Public API -----------------------------------------------------------------------------------------------------

    def eval_sets(self, split: Split = "test", names: Sequence[str] = EVAL_SETS,
                  device: torch.device | str | None = None) -> dict[str, tuple[Tensor, Tensor]]:
        """Named counterfactual sets of a split, as model-ready ``(x, y)`` tensors (CPU unless ``device``).

        Args:
            split: ``"train"``, ``"val"`` or ``"test"``.
            names: A subset of ``("clean", "cue", "rand_cue", "rand_image")``.
            device: Where to render (and return) the sets; rendering runs in chunks of :data:`RENDER_CHUNK`.

        Raises:
            ValueError: With ``cue="none"``, an unknown set name, or an empty split.
        """
        unknown = [n for n in names if n not in EVAL_SETS]
        if unknown or not names:
            raise ValueError(f"eval set names must be a non-empty subset of {EVAL_SETS}, got {list(names)}.")
        if self.cue == "none":
            raise ValueError("cue='none' has no counterfactual sets; use cue='box' (or 'dominoes'), with "
                             "cue_proportion=0 for clean training data.")
        x, _ = self._get(split)
        y = self._labels[split]
        if len(y) == 0:
            raise ValueError(f"the {split!r} split is empty (set val_split for a validation split).")
        flags = cue_ids(y, self.eval_proportion, self.num_classes)
        own = self._own_cue(split, y)
        out = {}
        for name in names:
            g = torch.Generator().manual_seed(mix_seed(self.counterfactual_seed, SPLITS.index(split),
                                                       EVAL_SETS.index(name)))
            xs, cue = x, own
            if name == "clean":
                cue = torch.full_like(y, NO_CUE)
            elif name == "rand_cue":
                cue = self._random_cue(split, len(y), g)
            elif name == "rand_image":
                xs = x[torch.randint(0, len(x), (len(x),), generator=g)]
            out[name] = self._render(xs, self._code(split, y, cue, flags), device)
        return out

    def set_train_mixture(self, sizes: Mapping[str, int] | None, seed: int = 0) -> None:
        """Serve training batches from named subsets of the training split, each drawn with replacement.

        Args:
            sizes: ``{"clean": n_clean, "cue": n_cue}`` (any of the two): ``clean`` draws from the training images
                without cue, ``cue`` from the cue training data at ``cue_proportion``; ``None``: back to the cue
                training data.
            seed: Seed of the draws (the same on every rank).
        """
        if not self._splits:
            raise RuntimeError("CueDataModule.setup() must run before set_train_mixture().")
        self._mixture = {}
        for i, (name, n) in enumerate((sizes or {}).items()):
            if name not in TRAIN_SETS or int(n) < 1:
                raise ValueError(f"train mixture entries must be {TRAIN_SETS} with a size >= 1, got {name}={n}.")
            x, code = self._get("train")
            if name == "clean":
                code = self._code("train", self._labels["train"], torch.full_like(code, NO_CUE), None)
            index = torch.randint(0, len(x), (int(n),), generator=torch.Generator().manual_seed(mix_seed(seed, i)))
            self._mixture[name] = (x[index], code[index])
            self._resident.pop(f"train_{name}", None)

    def mixture_tensors(self, name: str) -> tuple[Tensor, Tensor]:
        """A training subset of :meth:`set_train_mixture` as model-ready ``(x, y)`` CPU tensors."""
        if name not in self._mixture:
            raise ValueError(f"no train mixture set {name!r}; have {sorted(self._mixture)} (set_train_mixture).")
        return self._render(*self._mixture[name], None)

    # Internals ------------------------------------------------------------------------------------------------------

    def _transform(self, augment: bool) -> CueTransform:
        return CueTransform(self.mean, self.std, self.normalize, augment, self.crop_padding, self.num_classes,
                            self.cue, self.box_size, self._tops)

    def _own_cue(self, split: str, y: Tensor) -> Tensor:
        """The label's cue: its class (box) or its paired top image (dominoes)."""
        return self._pairs[split] if self.cue == "dominoes" else y.clone()

    def _random_cue(self, split: str, n: int, g: torch.Generator) -> Tensor:
        if self.cue == "dominoes":
            source = "test" if split == "test" else "train"
            size = len(self.top._get(source)[1])
            return self._top_offset[split] + torch.randint(0, size, (n,), generator=g)
        return torch.randint(0, self.num_classes, (n,), generator=g)

    def _code(self, split: str, y: Tensor, cue: Tensor, flags: Tensor | None) -> Tensor:
        """``label + K * (1 + cue)``, with ``cue = -1`` where ``flags`` is False (or with ``cue="none"``)."""
        if self.cue == "none":
            cue = torch.full_like(y, NO_CUE)
        elif flags is not None:
            cue = torch.where(flags, cue, torch.full_like(cue, NO_CUE))
        return y + self.num_classes * (1 + cue)

    def _render(self, x: Tensor, code: Tensor, device: torch.device | str | None) -> tuple[Tensor, Tensor]:
        device = torch.device(device) if device is not None else torch.device("cpu")
        transform = self._transform(augment=False).to(device)
        parts = [transform((xc.to(device), cc.to(device))) for xc, cc in zip(x.split(RENDER_CHUNK),
                                                                              code.split(RENDER_CHUNK), strict=True)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _pair(y: Tensor, y_top: Tensor, num_classes: int) -> Tensor:
    """Index into the top data of each sample's partner: the i-th sample of class c gets the i-th top sample of
    class c (wrapping around a shorter top class)."""
    rank = class_rank(y, num_classes)
    order = torch.argsort(y_top, stable=True)
    counts = torch.bincount(y_top, minlength=num_classes)
    starts = torch.cumsum(counts, 0) - counts
    if bool((counts[:num_classes] == 0).any()):
        raise ValueError("dominoes: the top data has no sample of some class.")
    return order[starts[y] + rank % counts[y]]

