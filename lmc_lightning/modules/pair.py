"""PairModule: two networks trained side by side in one run (twin training, instability analysis)."""

from __future__ import annotations

import copy
import os
from typing import Any

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler
from torchmetrics.classification import MulticlassAccuracy

from lmc_lightning.checkpoint import check_state_matches, load_weights
from lmc_lightning.data.loaders import DeviceLoader, ShardedSampler, mix_seed
from lmc_lightning.modules.base import LMCModule, OptimConfig
from lmc_lightning.modules.endpoint import build_net

SIDES = ("a", "b")


class PairModule(LMCModule):
    """Train two networks, ``net_a`` and ``net_b``, together.

    Both nets are trained by one optimiser over all parameters; SGD and Adam(W) update every parameter from its
    own gradient and state only, so this is the same as two optimisers with the same settings and schedule (except
    for gradient clipping by global norm, which would couple them: leave it off). The loss is ``loss_a + loss_b``.

    Data order: with ``same_data_order`` both nets see each batch of the datamodule's training loader. Otherwise
    ``net_b`` reads a second, independently shuffled view of the same training set: a loader over the same dataset
    (same batch size, transform and augmentation, this rank's share under DDP) whose sampler is seeded from
    ``data_seed`` and reshuffled every epoch. After resuming mid-epoch, that view restarts at the epoch's beginning.

    Spawning (Frankle et al., linear mode connectivity and the lottery ticket hypothesis): with ``spawn_step = k > 0``
    only ``net_a`` trains for the first ``k`` optimiser steps; then its weights, buffers and optimiser state are
    copied into ``net_b`` and both continue, with different data orders unless ``same_data_order``.

    Checkpoints hold both nets: ``load_net(ckpt, prefix="net_a")`` / ``prefix="net_b"``. ``self.net`` is ``net_a``
    (the network the ``InterpolationBarrier`` callback trains against its ``"twin"``).

    Starting points: ``init`` gives checkpoints for ``net_a`` and ``net_b`` (one file for both, or one each; loaded in
    ``setup("fit")``, as the rethink-re-basin seed's ``--init-model``). Distances, as the seed's ``run_ex.py`` logs
    them: at the end of every training epoch ``distance/a_b`` (``||theta_a - theta_b||``), ``distance/a_init`` and
    ``distance/b_init`` (each net's distance to its weights when fit started), over parameters (not buffers).

    Args:
        net: Registry name of both networks.
        net_kwargs: Extra architecture arguments.
        same_init: Start ``net_b`` from ``net_a``'s initialisation (``seed_a``); otherwise from ``seed_b``.
        same_data_order: Feed both nets the same batches; otherwise ``net_b`` gets its own order (``data_seed``).
        spawn_step: Optimiser steps ``net_a`` trains alone before being copied into ``net_b`` (0: no spawning;
            ``> 0`` overrides ``same_init``).
        seed_a: Initialisation seed of ``net_a``; None: the run's seed (``seed_everything``, ``PL_GLOBAL_SEED``; 0
            when none was set).
        seed_b: Initialisation seed of ``net_b`` (used when neither ``same_init`` nor ``spawn_step``); None:
            ``seed_a + 1``.
        data_seed: Seed of ``net_b``'s data order; None: ``seed_b`` (``seed_a + 1`` when that is None).
        init: Checkpoint(s) to start from: ``[both]`` or ``[for_a, for_b]``; ``None``: fresh initialisations.
        init_prefix: Network submodule inside the ``init`` Lightning checkpoints (one name, or one per file; e.g.
            ``[net_a, net_b]`` for a PairModule checkpoint given twice).
        num_classes: Number of classes (linked from the data).
        input_shape: ``(C, H, W)`` of the inputs (linked from the data).
        optim: Optimiser and schedule (shared by both nets).
        label_smoothing: Label smoothing of the loss.
    """

    def __init__(
        self,
        net: str = "mlp",
        net_kwargs: dict[str, Any] | None = None,
        same_init: bool = False,
        same_data_order: bool = False,
        spawn_step: int = 0,
        seed_a: int | None = None,
        seed_b: int | None = None,
        data_seed: int | None = None,
        init: list[str] | None = None,
        init_prefix: str | list[str] = "net",
        num_classes: int = 10,
        input_shape: tuple[int, int, int] = (1, 28, 28),
        optim: OptimConfig | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(num_classes=num_classes, input_shape=input_shape, optim=optim,
                         label_smoothing=label_smoothing)
        seed_a = seed_a if seed_a is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))
        seed_b = seed_b if seed_b is not None else seed_a + 1
        data_seed = data_seed if data_seed is not None else seed_b
        if spawn_step < 0:
            raise ValueError(f"spawn_step must be >= 0, got {spawn_step}.")
        if not same_init and spawn_step == 0 and seed_a == seed_b:
            raise ValueError(f"seed_a == seed_b == {seed_a} gives both nets the same initialisation; set "
                             "same_init=true to mean that, or pick different seeds.")
        self.init = [str(p) for p in init] if init is not None else []
        if init is not None and len(self.init) not in (1, 2):
            raise ValueError(f"init takes one checkpoint (for both nets) or two (net_a, net_b), got {len(self.init)}.")
        prefixes = [init_prefix] if isinstance(init_prefix, str) else list(init_prefix)
        if len(prefixes) not in (1, 2):
            raise ValueError(f"init_prefix takes one name or two, got {len(prefixes)}.")
        self.init_prefix = prefixes
        self.save_hparams()
        self.same_data_order = same_data_order
        self.spawn_step = spawn_step
        self.data_seed = data_seed
        shared = same_init or spawn_step > 0
        self.net_a = build_net(net, num_classes, self.input_shape, net_kwargs, seed_a)
        self.net_b = build_net(net, num_classes, self.input_shape, net_kwargs, seed_a if shared else seed_b)
        self.register_buffer("spawned", torch.tensor(spawn_step == 0))
        self.accuracy = nn.ModuleDict({
            f"{stage}_{side}": MulticlassAccuracy(num_classes, average="micro")
            for stage in ("train", "val", "test") for side in SIDES
        })
        self._loader_b: Any = None
        self._iter_b: Any = None
        self.start_weights: dict[str, dict[str, Tensor]] | None = None
        self._init_loaded = False

    @property
    def net(self) -> nn.Module:
        """``net_a``, the network callbacks treat as "the" trained one."""
        return self.net_a

    def forward(self, x: Tensor) -> Tensor:
        """Logits of ``net_a``."""
        return self.net_a(x)

    # Starting points and distances -------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        """Load the ``init`` checkpoints into the nets (fit only, once; a resumed run's checkpoint then overrides)."""
        if stage != "fit" or not self.init or self._init_loaded:
            return
        files = self.init * 2 if len(self.init) == 1 else self.init
        prefixes = self.init_prefix * 2 if len(self.init_prefix) == 1 else self.init_prefix
        for side, path, prefix in zip(SIDES, files, prefixes, strict=True):
            net = getattr(self, f"net_{side}")
            state, _ = load_weights(path, prefix)
            check_state_matches(net, state, source=f"init checkpoint {path} (prefix '{prefix}')")
            net.load_state_dict({k: state[k] for k in net.state_dict()})
        self._init_loaded = True
        rank_zero_info(f"PairModule: net_a and net_b start from {', '.join(files)}.")

    def on_fit_start(self) -> None:
        """Remember each net's starting parameters (unless restored from a checkpoint)."""
        if self.start_weights is None:
            self.start_weights = {side: {n: p.detach().clone() for n, p in getattr(self, f"net_{side}")
                                         .named_parameters()} for side in SIDES}

    @torch.no_grad()
    def distances(self) -> dict[str, float]:
        """``distance/a_b``, ``distance/a_init`` and ``distance/b_init`` (L2 over parameters)."""
        params = {side: dict(getattr(self, f"net_{side}").named_parameters()) for side in SIDES}

        def norm(x: dict[str, Tensor], y: dict[str, Tensor]) -> float:
            return float(torch.sqrt(sum(((x[k].double() - y[k].to(x[k].device).double()) ** 2).sum() for k in x)))

        out = {"distance/a_b": norm(params["a"], params["b"])}
        if self.start_weights is not None:
            out.update({f"distance/{side}_init": norm(params[side], self.start_weights[side]) for side in SIDES})
        return out

    def on_train_epoch_end(self) -> None:
        """Log the distances."""
        for name, value in self.distances().items():
            self.log(name, value, sync_dist=False)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the starting parameters, so that distances continue correctly on resume."""
        if self.start_weights is not None:
            checkpoint["pair_start_weights"] = {side: {k: v.cpu() for k, v in w.items()}
                                                for side, w in self.start_weights.items()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the starting parameters (and skip loading ``init`` again)."""
        self._init_loaded = True
        if "pair_start_weights" in checkpoint:
            self.start_weights = {side: dict(w) for side, w in checkpoint["pair_start_weights"].items()}

    # Spawning -------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def spawn(self) -> None:
        """Copy ``net_a``'s weights, buffers and optimiser state into ``net_b``."""
        for dst, src in zip(self.net_b.parameters(), self.net_a.parameters(), strict=True):
            dst.copy_(src)
        for dst, src in zip(self.net_b.buffers(), self.net_a.buffers(), strict=True):
            dst.copy_(src)
        if self._trainer is not None and self.trainer.optimizers:
            for opt in self.trainer.optimizers:
                for src, dst in zip(self.net_a.parameters(), self.net_b.parameters(), strict=True):
                    if src in opt.state:
                        opt.state[dst] = {k: v.clone() if torch.is_tensor(v) else copy.deepcopy(v)
                                          for k, v in opt.state[src].items()}
                    else:
                        opt.state.pop(dst, None)
        self.spawned.fill_(True)
        rank_zero_info(f"PairModule: spawned net_b from net_a at step {self.global_step}.")

    # Second data order ----------------------------------------------------------------------------------------------

    def _make_loader_b(self) -> Any:
        """A loader over the training set with its own seeded order (this rank's share under DDP)."""
        loader = self.trainer.train_dataloader
        rank, world = self.global_rank, self.trainer.world_size
        seed = mix_seed(self.data_seed, 0xB)
        if isinstance(loader, DeviceLoader):
            sampler = ShardedSampler(loader.sampler.n, shuffle=True, seed=seed, rank=rank, world_size=world,
                                     drop_uneven=loader.sampler.drop_uneven)
            return DeviceLoader(loader.x, loader.y, loader.batch_size, sampler, loader.transform, seed=seed)
        if isinstance(loader, DataLoader) and loader.batch_size is not None:
            sampler = DistributedSampler(loader.dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed)
            return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler,
                              num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                              pin_memory=loader.pin_memory, drop_last=loader.drop_last,
                              persistent_workers=loader.num_workers > 0)
        raise TypeError(f"PairModule cannot build a second data order from a {type(loader).__name__}; use one "
                        "training DataLoader with a batch_size (or a DeviceLoader), or set same_data_order=true.")

    def on_train_epoch_start(self) -> None:
        """Reshuffle ``net_b``'s view for this epoch."""
        if self.same_data_order:
            return
        if self._loader_b is None:
            self._loader_b = self._make_loader_b()
        self._loader_b.sampler.set_epoch(self.current_epoch)
        self._iter_b = iter(self._loader_b)

    def _next_batch_b(self) -> tuple[Tensor, Tensor]:
        if self._iter_b is None:
            self.on_train_epoch_start()
        try:
            batch = next(self._iter_b)
        except StopIteration:  # the main loader is longer (should not happen with equal sizes): wrap around
            self._iter_b = iter(self._loader_b)
            batch = next(self._iter_b)
        return move_data_to_device(batch, self.device)

    # Steps ----------------------------------------------------------------------------------------------------------

    def _step(self, side: str, x: Tensor, y: Tensor, stage: str) -> Tensor:
        net = self.net_a if side == "a" else self.net_b
        return self.classification_step(net, x, y, self.accuracy[f"{stage}_{side}"], stage, f"_{side}")

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """``loss_a + loss_b`` (before spawning: ``loss_a`` plus a zero term that keeps DDP's reducer happy)."""
        if not bool(self.spawned) and self.global_step >= self.spawn_step:
            self.spawn()
        x, y = batch
        loss_a = self._step("a", x, y, "train")
        if not bool(self.spawned):
            # net_b is overwritten at spawn time; the zero term only gives its parameters a (zero) gradient.
            return loss_a + 0.0 * sum(p.sum() for p in self.net_b.parameters())
        xb, yb = (x, y) if self.same_data_order else self._next_batch_b()
        return loss_a + self._step("b", xb, yb, "train")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Validation loss and accuracy of both nets."""
        x, y = batch
        for side in SIDES:
            self._step(side, x, y, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Test loss and accuracy of both nets."""
        x, y = batch
        for side in SIDES:
            self._step(side, x, y, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Predicted class indices of ``net_a``."""
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x).argmax(dim=1)
