"""Output ensembles of weight dicts, and Anokhin & Yarotsky's WA(n) ensembles.

:func:`ensemble_outputs` runs one architecture with any set of weight dicts (endpoints, points of a path, the grid of
a surface: :func:`path_members`) and averages their softmax outputs, reporting each member's accuracy and loss and the
ensemble's as members are added. :func:`wa_ensemble` builds WA members first (:func:`wa_members`): every member shares
the base model's layers before ``layer``; ``layer`` itself is the member's weight re-expressed on the base's features
by weight adjustment (:func:`~lmc_lightning.weights.connect.weight_adjust`), and later tensors are the member's.

Example (MCSurface's grid ensemble):
    >>> grid = torch.cartesian_prod(torch.linspace(0, 1, 11), torch.linspace(0, 1, 11))
    >>> result = ensemble_outputs(net, path_members(surface, grid), (x_test, y_test))
    >>> result.ensemble_accuracy[-1], result.member_accuracy.max()
"""

from __future__ import annotations

import contextlib
import copy
import csv
import io
import json
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path as FilePath
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmc_lightning.io import atomic_write_text
from lmc_lightning.weights import renorm
from lmc_lightning.weights.connect import Solver, layer_features, single_layer, weight_adjust
from lmc_lightning.weights.data import materialize
from lmc_lightning.weights.paths import check_compatible

WeightDict = dict[str, Tensor]


@dataclass
class EnsembleResult:
    """Accuracy and loss of ``M`` members and of their running ensembles.

    Attributes:
        member_accuracy: ``[M]`` accuracy of each member alone.
        member_loss: ``[M]`` mean cross-entropy of each member.
        ensemble_accuracy: ``[M]`` accuracy of the mean softmax of members ``0..k``.
        ensemble_loss: ``[M]`` mean negative log-likelihood of that mean softmax.
        meta: Settings of the run.
    """

    member_accuracy: np.ndarray
    member_loss: np.ndarray
    ensemble_accuracy: np.ndarray
    ensemble_loss: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("member_accuracy", "member_loss", "ensemble_accuracy", "ensemble_loss"):
            setattr(self, name, np.asarray(getattr(self, name), dtype=np.float64).reshape(-1))

    @property
    def size(self) -> int:
        """Number of members."""
        return len(self.member_accuracy)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {
            "members": self.size,
            "member_accuracy": self.member_accuracy.tolist(), "member_loss": self.member_loss.tolist(),
            "ensemble_accuracy": self.ensemble_accuracy.tolist(), "ensemble_loss": self.ensemble_loss.tolist(),
            "meta": {k: v if isinstance(v, (int, float, str, bool, type(None), list)) else str(v)
                     for k, v in self.meta.items()},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EnsembleResult:
        """Inverse of :meth:`to_dict`."""
        return cls(d["member_accuracy"], d["member_loss"], d["ensemble_accuracy"], d["ensemble_loss"],
                   dict(d.get("meta", {})))

    def rows(self, prefix: str = "") -> list[list[Any]]:
        """One row per member count: ``k, member acc, member loss, ensemble acc, ensemble loss``."""
        return [[k + 1, *(float(v[k]) for v in (self.member_accuracy, self.member_loss, self.ensemble_accuracy,
                                                  self.ensemble_loss))] for k in range(self.size)]


def write_ensemble(results: Mapping[str, EnsembleResult], folder: str | os.PathLike, stem: str = "ensemble"
                   ) -> dict[str, FilePath]:
    """Write ``{stem}.json`` (every result by name) and ``{stem}.csv`` (one row per name and member count)."""
    folder = FilePath(folder)
    text = json.dumps({name: r.to_dict() for name, r in results.items()}, indent=2) + "\n"
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["kind", "members", "member_accuracy", "member_loss", "ensemble_accuracy", "ensemble_loss"])
    for name, r in results.items():
        for row in r.rows():
            writer.writerow([name, *row])
    return {"json": atomic_write_text(folder / f"{stem}.json", text),
            "csv": atomic_write_text(folder / f"{stem}.csv", buf.getvalue())}


def path_members(path: Any, coords: Sequence[Any] | Tensor) -> Iterator[WeightDict]:
    """The weights of a path (or surface) at ``coords``, one dict at a time (``path(t)`` / ``path(u, v)``)."""
    c = torch.as_tensor(coords, dtype=torch.float64)
    c = c.reshape(len(c), -1)
    for row in c.tolist():
        yield path(*row)


def ensemble_outputs(
    net: nn.Module,
    members: Iterable[Mapping[str, Tensor]],
    data: Any,
    *,
    batch_size: int = 1000,
    device: str | torch.device | None = None,
    precision: str = "32",
    bn: str | None = None,
    train_data: Any = None,
    bn_batches: int = 20,
    bn_batch_size: int = 500,
) -> EnsembleResult:
    """Mean-softmax ensemble of ``net`` run with each weight dict of ``members``.

    Args:
        net: The architecture (a private copy is used; ``net`` is not modified).
        members: Full state dicts of ``net`` (any iterable: a list, :func:`path_members`, a generator).
        data: Test data in any form :func:`~lmc_lightning.weights.data.materialize` takes (a datamodule: its
            ``"test"`` split).
        batch_size: Samples per forward pass.
        device: Default: CUDA when available, else CPU.
        precision: ``"32"`` (fp32) or ``"bf16"`` (bf16 autocast; probabilities are averaged in float64 either way).
        bn: ``"reset"``: recompute each member's BatchNorm statistics on ``train_data`` first (same seeded samples
            as :func:`~lmc_lightning.weights.evaluate.evaluate_path`); ``None``: use the members' own statistics.
        train_data: Statistics data for ``bn="reset"`` (same forms as ``data``; a datamodule's ``"train"`` split).
        bn_batches: Statistics batches.
        bn_batch_size: Statistics batch size.

    Returns:
        An :class:`EnsembleResult`; ``ensemble_accuracy[k]`` is the ensemble of the first ``k + 1`` members.
    """
    from lmc_lightning.weights.evaluate import _stats_batches

    start = time.perf_counter()
    if precision not in ("32", "bf16"):
        raise ValueError(f"precision must be '32' or 'bf16', got {precision!r}.")
    if bn not in (None, "reset"):
        raise ValueError(f"bn must be None or 'reset', got {bn!r}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    x, y = materialize(data, "test", what="data", device=device)
    work = copy.deepcopy(net).to(device).eval()
    work.requires_grad_(False)
    stats = None
    if bn == "reset":
        if train_data is None and not hasattr(data, "split_tensors"):
            raise ValueError("bn='reset' needs training data: pass train_data=(x, y) or a datamodule as data.")
        sx = materialize(train_data if train_data is not None else data, "train", what="train_data", labels=False)[0]
        stats = [b.to(device) for b in _stats_batches(sx, bn_batches, bn_batch_size)]
    state = dict(work.state_dict())
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    probs = torch.zeros(len(y), _num_outputs(work, x[:1]), dtype=torch.float64, device=device)
    m_acc, m_loss, e_acc, e_loss = [], [], [], []
    with torch.no_grad(), autocast:
        for k, member in enumerate(members):
            if k == 0:
                check_compatible(state, dict(member), names=["net", "member 0"])
            for key, value in member.items():
                state[key].copy_(value)
            if stats is not None:
                renorm.reset_bn(work, stats, sync=False)
            loss, correct = torch.zeros((), dtype=torch.float64, device=device), torch.zeros((), device=device)
            for xb, yb, idx in zip(x.split(batch_size), y.split(batch_size),
                                   torch.arange(len(y), device=device).split(batch_size), strict=True):
                logits = work(xb).float()
                loss += F.cross_entropy(logits, yb, reduction="sum")
                correct += (logits.argmax(-1) == yb).sum()
                probs[idx] += logits.double().softmax(-1)
            m_loss.append(loss / len(y))
            m_acc.append(correct.double() / len(y))
            mean = probs / (k + 1)
            e_acc.append((mean.argmax(-1) == y).double().mean())
            e_loss.append(-mean.gather(1, y[:, None]).clamp_min(1e-40).log().mean())
    if not m_acc:
        raise ValueError("ensemble_outputs got no members.")
    vals = [torch.stack(v).cpu().numpy() for v in (m_acc, m_loss, e_acc, e_loss)]
    meta = {"device": str(device), "precision": precision, "bn": bn, "num_test": len(y),
            "seconds": time.perf_counter() - start}
    return EnsembleResult(*vals, meta=meta)


def _num_outputs(net: nn.Module, x: Tensor) -> int:
    with torch.no_grad():
        return int(net(x).shape[-1])


def wa_members(net: nn.Module, members: Sequence[Mapping[str, Tensor]], x: Tensor, layer: str,
               solver: Solver = "lstsq", batch_size: int = 1000) -> list[WeightDict]:
    """WA versions of ``members`` on the base ``members[0]`` (Anokhin & Yarotsky's ``eval_ensemble.py``).

    Member ``k`` becomes: the base's tensors before ``layer`` (in state-dict order), ``layer``'s weight
    ``W_k F_k^T pinv(F_base^T)`` (``F`` the inputs of ``layer`` on ``x``, conv layers as patch samples), and member
    ``k``'s tensors from ``layer``'s bias on. WA(n) of the seed's FC nets: ``layer`` is the first of the last ``n``
    member-specific layers.

    Args:
        net: The architecture.
        members: Full state dicts; the first is the base.
        x: Training inputs (the seed: the whole training set, test transform), on the members' device.
        layer: Module name of a Linear or Conv2d layer of ``net`` (e.g. ``"classifier"``, ``"hidden.2"``).
        solver: WA solver (:func:`~lmc_lightning.weights.connect.solve_wa`).
        batch_size: Samples per forward pass for the features.
    """
    if len(members) < 1:
        raise ValueError("wa_members needs at least one member (the base).")
    target = single_layer(net, layer)
    keys = list(net.state_dict())
    split = keys.index(target.weight)
    base = dict(members[0])
    f_base = layer_features(net, base, x, target, batch_size)
    out = []
    for member in members:
        member = dict(member)
        f_k = layer_features(net, member, x, target, batch_size)
        w = weight_adjust(member[target.weight], f_k, f_base, solver)
        out.append({**{k: base[k] for k in keys[:split]}, target.weight: w,
                    **{k: member[k] for k in keys[split + 1:]}})
    return out


def wa_ensemble(net: nn.Module, members: Sequence[Mapping[str, Tensor]], data: Any, train_x: Tensor, layer: str,
                *, solver: Solver = "lstsq", batch_size: int = 1000, device: str | torch.device | None = None,
                precision: str = "32") -> dict[str, EnsembleResult]:
    """Plain and WA ensembles of ``members`` as members are added (the first member is the WA base).

    Returns:
        ``{"plain": ensemble of the members, "wa": ensemble of :func:`wa_members`}``; each holds the per-member
        accuracies too (the WA base equals the first member).
    """
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    members = [{k: v.to(device) for k, v in m.items()} for m in members]
    net = copy.deepcopy(net).to(device).eval()
    adjusted = wa_members(net, members, train_x.to(device), layer, solver, batch_size)
    kw = {"batch_size": batch_size, "device": device, "precision": precision}
    plain = ensemble_outputs(net, members, data, **kw)
    wa = ensemble_outputs(net, adjusted, data, **kw)
    wa.meta.update({"layer": layer, "solver": solver, "num_train": len(train_x)})
    return {"plain": plain, "wa": wa}
