"""EnsembleModule: output ensembles and WA(n) ensembles of trained models, under ``lmc test``.

``lmc test --model EnsembleModule --model.members [a.ckpt,b.ckpt,c.ckpt] --data FashionMNISTDataModule`` reports each
member's test accuracy and the mean-softmax ensemble's as members are added; with ``--model.wa_layer hidden.2`` also
Anokhin & Yarotsky's WA ensemble (members share the first member's layers before ``hidden.2``, which is re-fitted by
weight adjustment on the training split). Writes ``ensemble.json`` and ``ensemble.csv``.

A member may also be a fitted path: ``--model.members [curve.ckpt] --model.grid 11`` ensembles the nets at the 11
points ``t = 0, 0.1, ..., 1`` of a ``CurveModule`` checkpoint (``lmc fit --model CurveModule``), and a
``SurfaceModule`` checkpoint gives its ``11 x 11`` grid of ``(u, v)`` (MCSurface's grid ensemble); path and network
checkpoints can be mixed. (``ConnectorModule`` and ``InterpolationModule`` are evaluated only and write no
checkpoint: ensemble their paths through :func:`~lmc_lightning.weights.ensemble.path_members`.)
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lmc_lightning.checkpoint import load_weights
from lmc_lightning.modules.base import OptimConfig
from lmc_lightning.modules.path import PathModule, WeightDict, point_label, restore_path_module
from lmc_lightning.weights.data import seeded_subset
from lmc_lightning.weights.ensemble import EnsembleResult, ensemble_outputs, wa_members, write_ensemble
from lmc_lightning.weights.paths import Path


@dataclass
class GridMembers:
    """The nets at ``coords`` (``[P, dim]``) of a fitted path, produced one at a time."""

    path: Path
    coords: Tensor
    source: str

    def __len__(self) -> int:
        return len(self.coords)

    def __iter__(self) -> Iterator[WeightDict]:
        for c in self.coords.tolist():
            yield {k: v.detach() for k, v in self.path(*c).items()}

    def labels(self) -> list[str]:
        """``source@t=0.25`` (``source@u=0.00_v=0.50`` on a surface), one per point."""
        return [f"{self.source}@{point_label(c)}" for c in self.coords.tolist()]


class EnsembleModule(PathModule):
    """Mean-softmax ensembles of checkpoints (and WA ensembles), evaluated on the test split.

    Args:
        members: Member checkpoints (Lightning ``.ckpt`` or plain state dicts; a fitted ``CurveModule`` or
            ``SurfaceModule`` checkpoint stands for the nets at its ``grid``); the first member is the WA base.
        grid: Points per coordinate of a path checkpoint's grid (``t`` or ``(u, v)`` in ``linspace(0, 1, grid)``);
            needed when a member is one.
        wa_layer: Module name of the first member-specific layer, re-fitted by WA onto the base's features (the
            seed's WA(n): for FC nets the first of the last ``n`` layers, e.g. ``classifier`` for WA(1)); None:
            plain ensemble only.
        wa_samples: Training samples for the WA features (a seeded subset); None: the whole training split.
        solver: WA solver (``lstsq`` or ``pinv``).
        bn: ``"reset"``: recompute each member's BatchNorm statistics on training data; None: the members' own.
        bn_batches: Statistics batches.
        bn_batch_size: Statistics batch size.
        evaluation_batch_size: Samples per forward pass.
        precision: ``"32"`` or ``"bf16"``.
        prefix: Network submodule inside the checkpoints.
        net: Architecture name, needed only for plain state dicts.
        net_kwargs: Architecture arguments overriding the checkpoints'.
        output_dir: Folder of the result files; ``None``: the trainer's log folder.
        num_classes: Number of classes (linked from the data).
        input_shape: ``(C, H, W)`` of the inputs (linked from the data).
        optim: Unused.
        label_smoothing: Unused.
    """

    min_endpoints = 1

    def __init__(
        self,
        members: list[str] | None = None,
        grid: int | None = None,
        wa_layer: str | None = None,
        wa_samples: int | None = None,
        solver: Literal["lstsq", "pinv"] = "lstsq",
        bn: Literal["reset"] | None = None,
        bn_batches: int = 20,
        bn_batch_size: int = 500,
        evaluation_batch_size: int = 1000,
        precision: Literal["32", "bf16"] = "32",
        prefix: str | list[str] = "net",
        net: str | None = None,
        net_kwargs: dict[str, Any] | None = None,
        output_dir: str | None = None,
        num_classes: int = 10,
        input_shape: tuple[int, int, int] = (1, 28, 28),
        optim: OptimConfig | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        if bn not in (None, "reset"):
            raise ValueError(f"bn must be None or 'reset', got {bn!r}.")
        if str(precision) not in ("32", "bf16"):
            raise ValueError(f"precision must be '32' or 'bf16', got {precision!r}.")
        if solver not in ("lstsq", "pinv"):
            raise ValueError(f"solver must be 'lstsq' or 'pinv', got {solver!r}.")
        if wa_samples is not None and wa_samples < 1:
            raise ValueError(f"wa_samples must be >= 1, got {wa_samples}.")
        if grid is not None and grid < 1:
            raise ValueError(f"grid must be >= 1 (points per path coordinate), got {grid}.")
        super().__init__(
            endpoints=members, num_points=2, bn=bn, bn_batches=bn_batches, bn_batch_size=bn_batch_size,
            evaluation_batch_size=evaluation_batch_size, precision="auto", strategy="auto", prefix=prefix, net=net,
            net_kwargs=net_kwargs, output_dir=output_dir, num_classes=num_classes, input_shape=input_shape,
            optim=optim, label_smoothing=label_smoothing,
        )
        self.wa_layer, self.wa_samples, self.solver, self.grid = wa_layer, wa_samples, solver, grid
        self.ensemble_precision = str(precision)
        self._members: list[WeightDict | GridMembers] | None = None
        self.results: dict[str, EnsembleResult] = {}

    def setup(self, stage: str) -> None:
        """Load the members."""
        if stage == "fit":
            raise ValueError("EnsembleModule has nothing to train; evaluate it with `lmc test`.")
        if self._members is None:
            if not self.endpoints:
                raise ValueError("EnsembleModule has no members: pass --model.members [a.ckpt,b.ckpt,...].")
            self._members = self.load_members()

    def load_members(self) -> list[WeightDict | GridMembers]:
        """Network checkpoints as weight dicts, path checkpoints as their :class:`GridMembers`, all checked against
        one template net (a path's first grid point stands for its grid)."""
        members: list[WeightDict | GridMembers] = []
        specs, names = [], []
        for i, (file, prefix) in enumerate(zip(self.endpoints, self.prefixes, strict=True)):
            module = restore_path_module(file)
            if module is None:
                state, spec = load_weights(file, prefix, key_map=self.key_map)
                members.append(state)
            else:
                if self.grid is None:
                    raise ValueError(f"Member {i} ({file}) is a {type(module).__name__} checkpoint: pass "
                                     "--model.grid N to ensemble the nets at N points per path coordinate.")
                module.num_points = self.grid
                members.append(GridMembers(module.path, module.eval_coords(), str(file)))
                spec = module.net_spec
            specs.append(spec)
            names.append(f"member {i} ({file})")
        firsts = [next(iter(m)) if isinstance(m, GridMembers) else m for m in members]
        checked = self.checked_states(firsts, specs, names)
        return [m if isinstance(m, GridMembers) else c for m, c in zip(members, checked, strict=True)]

    def iter_members(self) -> Iterator[WeightDict]:
        """Every member's weights in order, grid points expanded (generated one at a time)."""
        for m in self._members:
            yield from (m if isinstance(m, GridMembers) else [m])

    def member_labels(self) -> list[str]:
        """One label per member: its file, or ``file@t=...`` for a grid point."""
        return [label for i, m in enumerate(self._members)
                for label in (m.labels() if isinstance(m, GridMembers) else [self.endpoints[i]])]

    def evaluate_ensembles(self) -> dict[str, EnsembleResult]:
        """``{"plain": ...}`` and, with ``wa_layer``, ``{"wa": ...}`` on the test split."""
        dm = self._datamodule()
        device = self.device
        for m in self._members:
            if isinstance(m, GridMembers):
                m.path.to(device)
        test = dm.split_tensors("test")
        kw = {"batch_size": self.evaluation_batch_size, "device": device, "precision": self.ensemble_precision,
              "bn": self.bn, "train_data": dm.split_tensors("train") if self.bn else None,
              "bn_batches": self.bn_batches, "bn_batch_size": self.bn_batch_size}
        out = {"plain": ensemble_outputs(self.net, self.iter_members(), test, **kw)}
        out["plain"].meta["members"] = self.member_labels()
        if self.wa_layer is not None:
            x, _ = seeded_subset(dm.split_tensors("train"), self.wa_samples)
            members = [{k: v.to(device) for k, v in m.items()} for m in self.iter_members()]
            adjusted = wa_members(self.net, members, x.to(device), self.wa_layer, self.solver,
                                  self.evaluation_batch_size)
            out["wa"] = ensemble_outputs(self.net, adjusted, test, **kw)
            out["wa"].meta.update({"layer": self.wa_layer, "num_train": len(x), "members": self.member_labels()})
        return out

    def on_test_epoch_end(self) -> None:
        """Evaluate, log ``ensemble/{kind}_acc_{k}`` and ``member/{kind}_acc_{k}``, write the files (rank 0)."""
        self.results = self.evaluate_ensembles()
        for kind, result in self.results.items():
            for k in range(result.size):
                self.log(f"ensemble/{kind}_acc_{k + 1}", float(result.ensemble_accuracy[k]), sync_dist=False)
                self.log(f"member/{kind}_acc_{k + 1}", float(result.member_accuracy[k]), sync_dist=False)
        folder = self.output_dir or self.trainer.log_dir or self.trainer.default_root_dir
        if self.trainer.is_global_zero:
            self.result_files = write_ensemble(self.results, folder)
            summary = ", ".join(f"{kind} {r.ensemble_accuracy[-1]:.4f}" for kind, r in self.results.items())
            size = self.results["plain"].size
            rank_zero_info(f"EnsembleModule: {size} members, ensemble accuracy {summary}; wrote "
                           f"{', '.join(map(str, self.result_files.values()))}")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Nothing to store: the module is evaluated only."""
