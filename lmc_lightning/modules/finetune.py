"""FineTuneModule: MMC's fine-tuning of a cue model on a few clean samples: FT, LP, LP-FT and CBFT (seed 000).

As in the seed (upstream ``mech_fine_tuning.py``; constants are arguments with the seed's defaults):

- the start is a copy of the cue model (``init``); ``n_clean`` clean training samples (and for CBFT ``n_cue`` samples
  of the cue training data at its ``cue_proportion``) are drawn **with replacement**
  (:meth:`~lmc_lightning.data.cue.CueDataModule.set_train_mixture`);
- SGD (``lr`` 0.01, momentum 0.9, weight decay 1e-4), batch size from the data (256 in the seed), a per-iteration
  cosine from ``lr`` to 0 over all iterations (an epoch = the clean loader's length);
- ``ft``: cross-entropy on the clean subset, all parameters, net in train mode;
- ``lp`` (the seed's LLRT): features of the frozen net in eval mode (the input of the last ``Linear``, i.e. the GAP
  output), a **fresh** linear head trained with SGD ``lp_lr`` 30, momentum 0.9, no weight decay, cosine to 0 over
  ``lp_epochs`` 200 (per iteration, batches of the data's batch size), then copied into the net;
- ``lpft``: LP (before the first epoch), then FT;
- ``cbft``: each step over a clean and a cue batch takes two optimiser steps: (1) barrier:
  ``t = 0.5 + 0.5 * clip(N(0, 1), -0.5, 0.5)``, ``θ(t) = t θ_cue + (1 - t) θ`` over all parameters (weights and BN
  affine; the interpolated net has its own BN running statistics and runs in train mode), loss
  ``|margin - CE(f_θ(t)(x_cue), y_cue)|``: its gradient reaches θ with the factor ``1 - t``; (2) invariance:
  ``CE(clean) + λ Σ_c ‖normalize(mean_c z_clean) - normalize(mean_c z_cue)‖² / num_classes`` (``z`` the GAP features of
  θ, classes present in both batches), plain CE during the first ``warmup_epochs``. As in the seed, the schedule
  steps only in epochs ``> warmup_epochs`` (so CBFT's cosine does not reach 0).

Validation and test log ``{val,test}/<set>/acc`` and ``.../loss`` on the datamodule's counterfactual sets
(:meth:`~lmc_lightning.data.cue.CueDataModule.eval_sets`; MMC reports them at the training ``cue_proportion``: set the
data's ``eval_proportion`` to match). Under DDP each rank evaluates its slice of every set and the sums are reduced;
the clean/cue batches are sharded, and ``t`` is drawn from ``(seed, step)`` so it is the same on every rank.

The checkpoint holds the fine-tuned net under ``net`` (with its architecture in the hyper-parameters), so
:func:`lmc_lightning.load_net` reads it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.func import functional_call

from lmc_lightning.checkpoint import check_state_matches, load_weights
from lmc_lightning.data.cue import EVAL_SETS
from lmc_lightning.data.loaders import mix_seed
from lmc_lightning.modules.base import LMCModule
from lmc_lightning.nets import get_net

METHODS = ("ft", "lp", "lpft", "cbft")
CKPT_KEY = "lmc_finetune"


def head_of(net: nn.Module) -> tuple[str, nn.Linear]:
    """The classifier: the last ``nn.Linear`` of the net, whose input is the (GAP) feature vector."""
    linears = [(name, m) for name, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(net).__name__} has no nn.Linear classifier; LP and CBFT need one.")
    return linears[-1]


class FeatureTap:
    """Records the input of a module (the features before the head) on every forward, also under functional_call."""

    def __init__(self, module: nn.Module) -> None:
        self.value: Tensor | None = None
        self.handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple[Tensor, ...]) -> None:
        self.value = args[0]


def cbft_t(generator: torch.Generator) -> float:
    """MMC's barrier-step point ``0.5 + 0.5 * clip(N(0, 1), -0.5, 0.5)`` (in [0.25, 0.75])."""
    return 0.5 + 0.5 * float(torch.randn((), generator=generator).clamp(-0.5, 0.5))


def interpolate(theta: Mapping[str, Tensor], theta_cue: Mapping[str, Tensor], t: float) -> dict[str, Tensor]:
    """``t θ_cue + (1 - t) θ`` for every entry of ``theta`` (differentiable in ``theta``)."""
    return {k: t * theta_cue[k] + (1 - t) * v for k, v in theta.items()}


def invariance_loss(z_clean: Tensor, y_clean: Tensor, z_cue: Tensor, y_cue: Tensor, num_classes: int) -> Tensor:
    """``Σ_c ‖normalize(mean_c z_clean) - normalize(mean_c z_cue)‖² / num_classes`` over classes in both batches."""
    def class_means(z: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        sums = z.new_zeros(num_classes, z.shape[1]).index_add_(0, y, z)
        counts = torch.bincount(y, minlength=num_classes)
        return sums / counts.clamp(min=1)[:, None].to(z.dtype), counts > 0

    m_clean, has_clean = class_means(z_clean.flatten(1), y_clean)
    m_cue, has_cue = class_means(z_cue.flatten(1), y_cue)
    both = has_clean & has_cue
    diff = F.normalize(m_clean[both], dim=1) - F.normalize(m_cue[both], dim=1)
    return diff.pow(2).sum() / num_classes


def cosine(step: int, total: int) -> float:
    """``0.5 (1 + cos(π step / total))``: the per-iteration cosine factor from 1 to 0."""
    return 0.5 * (1 + math.cos(math.pi * min(step, total) / max(total, 1)))


class FineTuneModule(LMCModule):
    """Fine-tune a cue model on clean data: ``ft``, ``lp``, ``lpft`` or ``cbft`` (see the module docstring).

    Needs a :class:`~lmc_lightning.data.cue.CueDataModule` (clean/cue training subsets and counterfactual sets).

    Args:
        method: ``"ft"``, ``"lp"``, ``"lpft"`` or ``"cbft"``.
        init: Checkpoint of the model to fine-tune (the cue model): an ``EndpointModule`` ``.ckpt`` or a plain state
            dict (then give ``net``); loaded in ``setup``.
        prefix: Submodule holding the net inside ``init`` (``"net"``).
        net: Architecture name; needed for a plain state dict, overrides the checkpoint's otherwise.
        net_kwargs: Architecture arguments overriding the checkpoint's.
        n_clean: Clean training samples, drawn with replacement (seed: 2500).
        n_cue: Cue training samples for CBFT, drawn with replacement (seed: 47500).
        lr: Learning rate of FT / CBFT (seed: 0.01).
        momentum: SGD momentum (0.9).
        weight_decay: SGD weight decay (1e-4).
        lp_lr: LP head learning rate (30).
        lp_momentum: LP head momentum (0.9).
        lp_weight_decay: LP head weight decay (0).
        lp_epochs: LP head epochs (200).
        margin: CBFT barrier margin (1.0).
        invariance_weight: CBFT λ (1.0).
        warmup_epochs: CBFT epochs of plain CE before the invariance term (1).
        seed: Seed of the subset draws, the LP head's initialisation and CBFT's ``t``.
        eval_sets: Counterfactual sets logged at validation and test.
        evaluation_batch_size: Batch size of those evaluations.
        num_classes: Number of classes (linked from the data).
        input_shape: ``(C, H, W)`` (linked from the data).
    """

    def __init__(
        self,
        method: Literal["ft", "lp", "lpft", "cbft"] = "ft",
        init: str | None = None,
        prefix: str = "net",
        net: str | None = None,
        net_kwargs: dict[str, Any] | None = None,
        n_clean: int = 2500,
        n_cue: int = 47500,
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        lp_lr: float = 30.0,
        lp_momentum: float = 0.9,
        lp_weight_decay: float = 0.0,
        lp_epochs: int = 200,
        margin: float = 1.0,
        invariance_weight: float = 1.0,
        warmup_epochs: int = 1,
        seed: int = 0,
        eval_sets: list[str] | None = None,
        evaluation_batch_size: int = 1000,
        num_classes: int = 10,
        input_shape: tuple[int, int, int] = (1, 28, 28),
    ) -> None:
        super().__init__(num_classes=num_classes, input_shape=input_shape)
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
        if n_clean < 1 or n_cue < 1 or lp_epochs < 0 or warmup_epochs < 0 or evaluation_batch_size < 1:
            raise ValueError("n_clean, n_cue and evaluation_batch_size must be >= 1, lp_epochs and warmup_epochs "
                             f">= 0; got {n_clean}, {n_cue}, {evaluation_batch_size}, {lp_epochs}, {warmup_epochs}.")
        if lr <= 0 or lp_lr <= 0:
            raise ValueError(f"lr and lp_lr must be positive, got {lr} and {lp_lr}.")
        sets = list(eval_sets) if eval_sets is not None else list(EVAL_SETS)
        if not sets or any(s not in EVAL_SETS for s in sets):
            raise ValueError(f"eval_sets must be a non-empty subset of {EVAL_SETS}, got {sets}.")
        self.save_hparams()
        self.automatic_optimization = False
        self.method, self.init, self.prefix = method, init, prefix
        self.net_name, self.net_kwargs = net, dict(net_kwargs or {})
        self.n_clean, self.n_cue, self.seed = n_clean, n_cue, seed
        self.eval_set_names, self.evaluation_batch_size = sets, evaluation_batch_size
        self.net: nn.Module | None = None
        self.theta_cue: dict[str, Tensor] | None = None
        self._interp_buffers: dict[str, Tensor] = {}
        self._sets: dict[str, dict[str, tuple[Tensor, Tensor]]] = {}
        self._lp_done = False

    # Setup ----------------------------------------------------------------------------------------------------------

    def _build(self, spec: Mapping[str, Any]) -> nn.Module:
        spec = dict(spec)
        self.hparams.update(net=spec["name"], net_kwargs={k: v for k, v in spec.items() if k not in
                                                           ("name", "num_classes", "in_channels", "input_size")},
                            input_shape=list(self.input_shape))
        name = spec.pop("name")
        return get_net(name, **spec)

    def _spec(self, stored: Mapping[str, Any] | None) -> dict[str, Any]:
        if self.net_name is not None:
            spec = {"name": self.net_name, "num_classes": self.num_classes, "in_channels": self.input_shape[0],
                    "input_size": self.input_shape[1]}
        elif stored is not None:
            spec = dict(stored)
        else:
            raise ValueError(f"{self.init} is a plain state dict: pass --model.net NAME (and --model.net_kwargs).")
        spec.update(self.net_kwargs)
        if int(spec.get("num_classes", self.num_classes)) != self.num_classes:
            raise ValueError(f"init has {spec['num_classes']} classes but the data has {self.num_classes}.")
        return spec

    def setup(self, stage: str) -> None:
        """Load ``init`` (the start and, for CBFT, the fixed θ_cue) and, for ``fit``, ask the data for the subsets."""
        trainer = self._trainer
        if self.net is None:
            if self.init is None:
                if trainer is not None and trainer.ckpt_path and stage != "fit":
                    return  # on_load_checkpoint builds the net
                raise ValueError("FineTuneModule needs the model to fine-tune: pass --model.init cue.ckpt.")
            state, stored = load_weights(self.init, self.prefix)
            net = self._build(self._spec(stored))
            check_state_matches(net, state, source=f"init ({self.init})")
            net.load_state_dict(state)
            self.net = net
            self.theta_cue = {k: v.detach().clone() for k, v in net.named_parameters()}
            self._interp_buffers = {k: v.detach().clone() for k, v in net.named_buffers()}
        if stage == "fit":
            dm = self._cue_data()
            sizes = {"clean": self.n_clean, **({"cue": self.n_cue} if self.method == "cbft" else {})}
            dm.set_train_mixture(sizes, seed=self.seed)
            rank_zero_info(f"FineTuneModule: {self.method} from {self.init} on {self.n_clean} clean"
                           f"{f' + {self.n_cue} cue' if self.method == 'cbft' else ''} samples (with replacement).")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record the module (see :class:`LMCModule`) and whether LP already ran (a resumed LP-FT must not redo it)."""
        super().on_save_checkpoint(checkpoint)
        checkpoint[CKPT_KEY] = {"lp_done": self._lp_done}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Check the writer, restore the LP flag, and build the net from the checkpoint's architecture when no
        ``init`` built it."""
        super().on_load_checkpoint(checkpoint)
        self._lp_done = bool(checkpoint.get(CKPT_KEY, {}).get("lp_done", False))
        if self.net is None:
            hp = checkpoint.get("hyper_parameters", {})
            shape = hp.get("input_shape", self.input_shape)
            self.net = self._build({"name": hp["net"], "num_classes": hp.get("num_classes", self.num_classes),
                                    "in_channels": shape[0], "input_size": shape[1], **(hp.get("net_kwargs") or {})})

    def on_fit_start(self) -> None:
        """Move θ_cue and the interpolated net's BN statistics to the training device."""
        self.theta_cue = {k: v.to(self.device) for k, v in (self.theta_cue or {}).items()}
        self._interp_buffers = {k: v.to(self.device) for k, v in self._interp_buffers.items()}

    def _cue_data(self) -> Any:
        dm = self.trainer.datamodule if self._trainer is not None else None
        if dm is None or not hasattr(dm, "set_train_mixture") or not hasattr(dm, "eval_sets"):
            raise ValueError("FineTuneModule needs a CueDataModule (--data CueDataModule): it draws the clean/cue "
                             "training subsets and the counterfactual evaluation sets from it.")
        return dm

    # Optimisation ---------------------------------------------------------------------------------------------------

    def configure_optimizers(self) -> dict[str, Any]:
        """SGD and a per-iteration cosine to 0 over all iterations (stepped by hand, see ``training_step``)."""
        hp = self.hparams
        opt = torch.optim.SGD(self.net.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine(s, total))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_train_start(self) -> None:
        """LP and LP-FT: train a fresh head on the frozen net's features, then copy it in (once, not on resume)."""
        if self.method in ("lp", "lpft") and not self._lp_done:
            head = self.train_linear_probe(*self._cue_data().mixture_tensors("clean"))
            _, target = head_of(self.net)
            with torch.no_grad():
                target.weight.copy_(head.weight)
                if target.bias is not None:
                    target.bias.copy_(head.bias)
            self._lp_done = True

    def train_linear_probe(self, x: Tensor, y: Tensor) -> nn.Linear:
        """LP (LLRT): a fresh ``nn.Linear`` trained on features of the frozen net (eval mode); returns it."""
        hp = self.hparams
        _, head = head_of(self.net)
        tap = FeatureTap(head)
        was_training = self.net.training
        self.net.eval()
        try:
            with torch.no_grad():
                feats = []
                for xb in x.split(self.evaluation_batch_size):
                    self.net(xb.to(self.device))
                    feats.append(tap.value.flatten(1))
                z = torch.cat(feats)
        finally:
            tap.handle.remove()
            self.net.train(was_training)
        y = y.to(self.device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(mix_seed(self.seed, 1))
            probe = nn.Linear(z.shape[1], self.num_classes, bias=head.bias is not None).to(self.device)
        opt = torch.optim.SGD(probe.parameters(), lr=hp.lp_lr, momentum=hp.lp_momentum,
                              weight_decay=hp.lp_weight_decay)
        batch = self._cue_data().batch_size
        per_epoch = math.ceil(len(z) / batch)
        total = hp.lp_epochs * per_epoch
        g = torch.Generator().manual_seed(mix_seed(self.seed, 2))
        step = 0
        for _ in range(hp.lp_epochs):
            for idx in torch.randperm(len(z), generator=g).split(batch):
                for group in opt.param_groups:
                    group["lr"] = hp.lp_lr * cosine(step, total)
                idx = idx.to(self.device)
                loss = F.cross_entropy(probe(z[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
        return probe.eval()

    def _step(self, opt: Any, loss: Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        opt.step()

    def barrier_loss(self, x_cue: Tensor, y_cue: Tensor, t: float) -> Tensor:
        """``|margin - CE(f_θ(t)(x_cue), y_cue)|`` at ``θ(t) = t θ_cue + (1 - t) θ`` (train-mode BN, own stats)."""
        theta = dict(self.net.named_parameters())
        weights = {**interpolate(theta, self.theta_cue, t), **self._interp_buffers}
        logits = functional_call(self.net, weights, (x_cue,))
        return (self.hparams.margin - F.cross_entropy(logits, y_cue)).abs()

    def clean_loss(self, x: Tensor, y: Tensor, x_cue: Tensor | None = None, y_cue: Tensor | None = None,
                   invariance: bool = False) -> Tensor:
        """CE on the clean batch, plus ``λ`` times :func:`invariance_loss` of the GAP features when asked."""
        if not invariance:
            return F.cross_entropy(self.net(x), y)
        tap = FeatureTap(head_of(self.net)[1])
        try:
            logits = self.net(x)
            z_clean = tap.value
            self.net(x_cue)
            z_cue = tap.value
        finally:
            tap.handle.remove()
        inv = invariance_loss(z_clean, y, z_cue, y_cue, self.num_classes)
        self.log("train/invariance", inv.detach(), batch_size=len(y), on_step=True, on_epoch=True)
        return F.cross_entropy(logits, y) + self.hparams.invariance_weight * inv

    def training_step(self, batch: Mapping[str, tuple[Tensor, Tensor]], batch_idx: int) -> None:
        """One FT step, or CBFT's barrier step and invariance step; LP alone trains nothing here."""
        opt = self.optimizers()
        sched = self.lr_schedulers()
        x, y = batch["clean"]
        self.net.train()
        if self.method == "lp":
            return
        if self.method in ("ft", "lpft"):
            loss = F.cross_entropy(self.net(x), y)
            self._step(opt, loss)
            sched.step()
            self.log("train/loss", loss.detach(), batch_size=len(y), on_step=True, on_epoch=True, prog_bar=True)
            return
        x_cue, y_cue = batch["cue"]
        t = cbft_t(torch.Generator().manual_seed(mix_seed(self.seed, 3, self.global_step)))
        barrier = self.barrier_loss(x_cue, y_cue, t)
        self._step(opt, barrier)
        loss = self.clean_loss(x, y, x_cue, y_cue, invariance=self.current_epoch >= self.hparams.warmup_epochs)
        self._step(opt, loss)
        if self.current_epoch > self.hparams.warmup_epochs:
            sched.step()
        self.log_dict({"train/barrier": barrier.detach(), "train/loss": loss.detach()}, batch_size=len(y),
                      on_step=True, on_epoch=True, prog_bar=True)

    # Evaluation -----------------------------------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        """Logits of the (fine-tuned) net."""
        return self.net(x)

    def _sets_of(self, split: str) -> dict[str, tuple[Tensor, Tensor]]:
        """This rank's slice of every evaluation set of ``split``, on the device (rendered once, then cached)."""
        if split not in self._sets:
            rank, world = (self.trainer.global_rank, self.trainer.world_size) if self._trainer else (0, 1)
            sets = self._cue_data().eval_sets(split, self.eval_set_names)
            self._sets[split] = {k: (x[rank::world].to(self.device), y[rank::world].to(self.device))
                                 for k, (x, y) in sets.items()}
        return self._sets[split]

    def evaluate_sets(self, split: str, stage: str) -> dict[str, float]:
        """Loss and accuracy of the net (eval mode) on every evaluation set of ``split``, reduced over ranks."""
        self.net.eval()
        sums = []
        with torch.no_grad():
            for x, y in self._sets_of(split).values():
                loss = correct = 0.0
                for xb, yb in zip(x.split(self.evaluation_batch_size), y.split(self.evaluation_batch_size),
                                  strict=True):
                    logits = self.net(xb).float()
                    loss += F.cross_entropy(logits, yb, reduction="sum").item()
                    correct += (logits.argmax(1) == yb).sum().item()
                sums.append([loss, correct, float(len(y))])
        total = torch.tensor(sums, dtype=torch.float64, device=self.device)
        if self._trainer is not None and self.trainer.world_size > 1:
            total = self.trainer.strategy.reduce(total, reduce_op="sum")
        metrics = {}
        for name, (loss, correct, n) in zip(self._sets_of(split), total.tolist(), strict=True):
            metrics[f"{stage}/{name}/loss"] = loss / n
            metrics[f"{stage}/{name}/acc"] = correct / n
        return metrics

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Nothing per batch: the counterfactual sets are evaluated whole at the end of the epoch."""

    def test_step(self, batch: Any, batch_idx: int) -> None:
        """Nothing per batch: the counterfactual sets are evaluated whole at the end of the epoch."""

    def on_validation_epoch_end(self) -> None:
        """Log ``val/<set>/acc`` and ``val/<set>/loss`` on the validation split's counterfactual sets."""
        self.log_dict(self.evaluate_sets("val", "val"), sync_dist=False, prog_bar=False)

    def on_test_epoch_end(self) -> None:
        """Log ``test/<set>/acc`` and ``test/<set>/loss`` on the test split's counterfactual sets."""
        self.log_dict(self.evaluate_sets("test", "test"), sync_dist=False)

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Predicted class indices."""
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x).argmax(dim=1)

