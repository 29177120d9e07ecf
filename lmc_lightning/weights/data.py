"""Data in any form users hold, as tensors: the one place every data-taking function turns its data into ``(x, y)``.

:func:`materialize` accepts an ``(x, y)`` pair of tensors, a tensor of inputs, a datamodule (an lmc_lightning one
through ``split_tensors``, any other ``LightningDataModule`` through its ``*_dataloader``), a map-style Dataset, or any
iterable of batches (a DataLoader, a list, a generator; each batch a tensor, an ``(x, y, ...)`` tuple or a dict).
The data is read once and, when a device is given, moved there once, after a check that it fits.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

Data = Any
"""Anything :func:`materialize` accepts."""

FORMS = ("an (x, y) pair of tensors, a tensor of inputs, a datamodule, a Dataset, or an iterable of (x, y) batches "
         "such as a DataLoader")
DEVICE_MEMORY_FRACTION = 0.9
"""Data may take at most this fraction of a CUDA device's free memory."""

_STAGES = {"train": "fit", "val": "fit", "test": "test", "predict": "predict"}


def _batch_xy(batch: Any, what: str) -> tuple[Tensor, Tensor | None]:
    """``(x, y)`` of one batch: a tensor (no labels), a tuple/list ``(x, y, ...)`` or a dict with x/y keys."""
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, Mapping):
        x = next((batch[k] for k in ("x", "input", "image") if k in batch), None)
        if x is None:
            raise ValueError(f"{what}: cannot find the inputs in a dict batch with keys {list(batch)}; use key 'x'.")
        return x, next((batch[k] for k in ("y", "target", "label") if k in batch), None)
    if isinstance(batch, tuple | list) and batch and isinstance(batch[0], Tensor):
        y = batch[1] if len(batch) > 1 else None
        return batch[0], torch.as_tensor(y) if y is not None else None
    raise TypeError(f"{what}: a batch must be a tensor, a tuple (x, y, ...) or a dict, got {type(batch).__name__}.")


def _concat(batches: Iterable[Any], what: str) -> tuple[Tensor, Tensor | None]:
    xs, ys = [], []
    for batch in batches:
        x, y = _batch_xy(batch, what)
        xs.append(x)
        ys.append(y)
    if not xs:
        raise ValueError(f"{what} yielded no batches.")
    labelled = [y is not None for y in ys]
    if any(labelled) and not all(labelled):
        raise ValueError(f"{what}: some batches have labels and some do not.")
    return torch.cat(xs), (torch.cat(ys) if all(labelled) else None)


def _from_datamodule(data: Any, split: str, what: str) -> tuple[Tensor, Tensor | None]:
    if hasattr(data, "split_tensors"):
        try:
            return data.split_tensors(split)
        except RuntimeError:  # not set up yet: load the splits, then read
            data.setup(_STAGES.get(split, "fit"))
            return data.split_tensors(split)
    loader_fn = getattr(data, f"{split}_dataloader", None)
    if loader_fn is None:
        raise ValueError(f"{what}: {type(data).__name__} has no {split}_dataloader().")
    data.setup(_STAGES.get(split, "fit"))
    loader = loader_fn()
    loaders = loader if isinstance(loader, list | tuple) and loader and not isinstance(loader[0], Tensor) else [loader]
    parts = [_concat(ld, what) for ld in loaders]
    ys = [y for _, y in parts]
    return torch.cat([x for x, _ in parts]), (torch.cat(ys) if all(y is not None for y in ys) else None)


def _read(data: Any, split: str, what: str) -> tuple[Tensor, Tensor | None]:
    if data is None:
        raise ValueError(f"{what} is missing: pass {FORMS}.")
    if isinstance(data, Tensor):
        return data, None
    if isinstance(data, tuple | list) and len(data) == 2 and all(isinstance(d, Tensor) for d in data):
        x, y = data
        if y.dim() == 1 and len(y) == len(x):
            if y.is_floating_point():
                raise ValueError(f"{what}: labels must be an integer tensor (class indices), got {y.dtype}.")
            return x, y
        # otherwise: a list of two batches, read below
    if hasattr(data, "split_tensors") or any(hasattr(data, f"{s}_dataloader") for s in _STAGES):
        return _from_datamodule(data, split, what)
    if isinstance(data, Dataset) and hasattr(data, "__getitem__") and hasattr(data, "__len__"):
        return _concat(DataLoader(data, batch_size=1024, shuffle=False), what)
    if isinstance(data, Iterable) and not isinstance(data, str | bytes | Mapping):
        return _concat(data, what)
    raise TypeError(f"{what} must be {FORMS}; got {type(data).__name__}.")


def check_fits(tensors: Iterable[Tensor], device: str | torch.device, what: str = "data") -> None:
    """Raise a MemoryError, naming the sizes and the fix, when ``tensors`` do not fit in a CUDA device's free memory.

    Tensors already on ``device`` take no new memory; other devices are not checked (their allocator reports the
    failure itself).
    """
    device = torch.device(device)
    if device.type != "cuda":
        return
    need = sum(t.numel() * t.element_size() for t in tensors if t.device != device)
    if need == 0:
        return
    free, _ = torch.cuda.mem_get_info(device)
    if need > DEVICE_MEMORY_FRACTION * free:
        raise MemoryError(f"{what} takes {need / 2**30:.2f} GiB but {device} has {free / 2**30:.2f} GiB free: pass "
                          "a subset (e.g. seeded_subset(data, n)), a smaller split, or device='cpu'.")


def to_device(x: Tensor, device: str | torch.device, dtype: torch.dtype | None = None, what: str = "data") -> Tensor:
    """``x.to(device, dtype)`` after :func:`check_fits`; a failed allocation is reported with the same advice."""
    check_fits([x], device, what)
    try:
        return x.to(device, dtype=dtype, non_blocking=True)
    except torch.OutOfMemoryError as err:
        raise MemoryError(f"{what} ({x.numel() * x.element_size() / 2**30:.2f} GiB) does not fit on {device}: pass "
                          "a subset (e.g. seeded_subset(data, n)), a smaller split, or device='cpu'.") from err


def materialize(data: Data, split: str = "test", *, what: str = "data", labels: bool = True,
                device: str | torch.device | None = None) -> tuple[Tensor, Tensor | None]:
    """All of ``data`` as tensors ``(x, y)``, read once (and moved to ``device`` once, if given).

    Args:
        data: An ``(x, y)`` pair of tensors, a tensor of inputs (no labels), a datamodule (its ``split``: through
            ``split_tensors`` for lmc_lightning datamodules, else ``setup`` then ``{split}_dataloader()``), a
            map-style Dataset of ``(x, y)`` samples, or any iterable of batches (DataLoader, list, generator), each a
            tensor, a tuple ``(x, y, ...)`` or a dict with keys ``x``/``y`` (or ``input``/``target``, ``image``/
            ``label``).
        split: Which split of a datamodule (``"train"``, ``"val"``, ``"test"``); ignored for other forms.
        what: Name of the argument, used in error messages.
        labels: Require labels (a ``ValueError`` when the data has none); with ``False``, ``y`` may be None.
        device: Move both tensors there (after :func:`check_fits`); None leaves them where they are.

    Returns:
        ``(x, y)`` with ``len(x) == len(y)`` (``y`` None only when ``labels=False`` and the data has none).

    Raises:
        TypeError: ``data`` is none of the accepted forms.
        ValueError: No samples, missing or mismatching labels.
        MemoryError: The data does not fit on ``device``.
    """
    x, y = _read(data, split, what)
    if labels and y is None:
        raise ValueError(f"{what} has inputs but no labels: pass (x, y), a labelled Dataset/DataLoader, or a "
                         "datamodule.")
    if len(x) == 0:
        raise ValueError(f"{what} holds no samples.")
    if y is not None:
        y = torch.as_tensor(y)
        if y.dim() != 1 or len(y) != len(x):
            raise ValueError(f"{what}: got {len(x)} inputs and labels of shape {tuple(y.shape)}; need one integer "
                             "label per input.")
    if device is not None:
        check_fits([x] + ([y] if y is not None else []), device, what)
        x = to_device(x, device, what=what)
        y = to_device(y, device, what=what) if y is not None else None
    return x, y


def seeded_subset(data: tuple[Tensor, Tensor], n: int | None, seed: int = 0) -> tuple[Tensor, Tensor]:
    """At most ``n`` samples of ``(x, y)``, drawn by a seeded permutation (the same on every rank), in order."""
    x, y = data
    if n is None or n >= len(x):
        return x, y
    index = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return x[index], (y[index] if y is not None else None)


def check_input_shape(x: Tensor, expected: tuple[int, ...] | None, source: str, what: str = "data") -> None:
    """Raise a ValueError naming both shapes when samples of ``x`` are not shaped ``expected`` (None: no check)."""
    if expected is None:
        return
    got = tuple(x.shape[1:])
    if got != tuple(expected):
        raise ValueError(f"{source} expects inputs of shape {tuple(expected)} but {what} has samples of shape {got}; "
                         "evaluate on data shaped like its training data.")
