"""Representation similarity as torchmetrics ``Metric``s whose states are sums (exact under DDP).

* Procrustes (:class:`GReLUProcrustes`, :class:`OrthogonalProcrustes`): per-channel sums of squares and the C1 x C2
  cross matrix over (N, h, w), summed in float64 across batches and ranks.
* CKA (:class:`GReLUCKA`, :class:`LinearCKA`): the N x N kernels couple every pair of samples, so no fixed-size sum of
  per-sample statistics gives them (and the G_ReLU kernel's max over channels has no feature-space form at all). The
  metric therefore holds a ``[num_samples, C, h, w]`` feature buffer per input, zero-initialised; each update writes
  its rows into slots owned by its rank (slot ``local_index * world_size + rank``), and the DDP reduction is a sum, so
  every slot holds exactly one sample afterwards (a ``filled`` count, also summed, checks it). ``compute`` forms the
  kernels in row blocks on the buffer's device (:func:`~lmc_lightning.metrics.similarity_functional.grelu_kernel`):
  10k samples take one 10k x 10k kernel (400 MB in float32) per input plus one block at a time. CKA is invariant to
  the order of the samples, so the slot layout does not change the value.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torchmetrics import Metric

from lmc_lightning.metrics import similarity_functional as F


class _ProcrustesBase(Metric):
    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for name in ("sq1", "sq2", "cross"):
            self.add_state(name, default=torch.zeros(0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, h1: Tensor, h2: Tensor) -> None:
        """Add a batch of features ``[B, C1, h, w]`` / ``[B, C2, h', w']`` (or ``[B, C]``) of the same inputs."""
        sq1, sq2, cross = F.procrustes_sums(h1.detach(), h2.detach())
        if self.sq1.numel() == 0:
            self.sq1, self.sq2, self.cross = sq1, sq2, cross
        else:
            if cross.shape != self.cross.shape:
                raise ValueError(f"Channel counts changed between updates: {tuple(self.cross.shape)} then "
                                 f"{tuple(cross.shape)}; use one metric per layer pair.")
            self.sq1, self.sq2, self.cross = self.sq1 + sq1, self.sq2 + sq2, self.cross + cross

    def _check(self) -> None:
        if self.cross.numel() == 0:
            raise RuntimeError(f"{type(self).__name__}.compute() called before any update().")


class GReLUProcrustes(_ProcrustesBase):
    """G_ReLU-Procrustes similarity (see :func:`~lmc_lightning.metrics.functional.grelu_procrustes`)."""

    def compute(self) -> Tensor:
        """Similarity in [0, 1]."""
        self._check()
        return F.grelu_procrustes_from_sums(self.sq1, self.sq2, self.cross)


class OrthogonalProcrustes(_ProcrustesBase):
    """Orthogonal-Procrustes similarity (see :func:`~lmc_lightning.metrics.functional.orthogonal_procrustes`)."""

    def compute(self) -> Tensor:
        """Similarity in [0, 1]."""
        self._check()
        return F.orthogonal_procrustes_from_sums(self.sq1, self.sq2, self.cross)


class _CKABase(Metric):
    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, num_samples: int, **kwargs) -> None:
        super().__init__(**kwargs)
        if num_samples < 4:
            raise ValueError(f"num_samples must be >= 4 (the unbiased HSIC needs 4 samples), got {num_samples}.")
        self.num_samples = num_samples
        self.add_state("h1", default=torch.zeros(0), dist_reduce_fx="sum")
        self.add_state("h2", default=torch.zeros(0), dist_reduce_fx="sum")
        self.add_state("filled", default=torch.zeros(num_samples), dist_reduce_fx="sum")
        self._seen = 0

    def reset(self) -> None:
        """Clear the buffers and the local sample counter."""
        super().reset()
        self._seen = 0

    def update(self, h1: Tensor, h2: Tensor) -> None:
        """Store a batch of features of the same inputs in this rank's slots."""
        h1, h2 = F._as_4d(h1.detach()).float(), F._as_4d(h2.detach()).float()
        if len(h1) != len(h2):
            raise ValueError(f"Features of different sample counts: {len(h1)} and {len(h2)}.")
        world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_available() and dist.is_initialized() \
            else (1, 0)
        slots = (torch.arange(self._seen, self._seen + len(h1)) * world + rank).to(self.filled.device)
        if len(slots) and int(slots[-1]) >= self.num_samples:
            raise ValueError(f"More samples than num_samples={self.num_samples} (per rank: at most "
                             f"{self.num_samples // world}); raise num_samples to the evaluation set's size.")
        if self.h1.numel() == 0:
            self.h1 = h1.new_zeros(self.num_samples, *h1.shape[1:])
            self.h2 = h2.new_zeros(self.num_samples, *h2.shape[1:])
        self.h1[slots], self.h2[slots] = h1, h2
        self.filled[slots] += 1
        self._seen += len(h1)

    def _features(self) -> tuple[Tensor, Tensor]:
        if self.h1.numel() == 0:
            raise RuntimeError(f"{type(self).__name__}.compute() called before any update().")
        if bool((self.filled > 1).any()):
            raise RuntimeError("Two samples were written to one slot: ranks must call update() through the "
                               "distributed sampler (each rank its own share).")
        keep = self.filled > 0
        return self.h1[keep], self.h2[keep]


class GReLUCKA(_CKABase):
    """G_ReLU-CKA (see :func:`~lmc_lightning.metrics.functional.grelu_cka`).

    Args:
        num_samples: Size of the evaluation set (the buffers' length; at most this many samples in total).
        estimator: ``"max"`` or ``"median"`` over channels.
    """

    def __init__(self, num_samples: int, estimator: str = "max", **kwargs) -> None:
        super().__init__(num_samples, **kwargs)
        self.estimator = estimator

    def compute(self) -> Tensor:
        """CKA of the stored samples."""
        return F.grelu_cka(*self._features(), estimator=self.estimator)


class LinearCKA(_CKABase):
    """Linear CKA (see :func:`~lmc_lightning.metrics.functional.linear_cka`).

    Args:
        num_samples: Size of the evaluation set.
        debiased: Unbiased HSIC (True) or biased, centred HSIC.
        normalize_channels: The seed's ``ortho_cka`` preprocessing.
    """

    def __init__(self, num_samples: int, debiased: bool = True, normalize_channels: bool = False, **kwargs) -> None:
        super().__init__(num_samples, **kwargs)
        self.debiased, self.normalize_channels = debiased, normalize_channels

    def compute(self) -> Tensor:
        """CKA of the stored samples."""
        return F.linear_cka(*self._features(), debiased=self.debiased, normalize_channels=self.normalize_channels)
