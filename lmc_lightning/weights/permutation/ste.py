"""Straight-through estimator matching (Ainsworth et al., Git Re-Basin, Algorithm 2).

A float proxy of B's permutable weights, initialised at A, is trained so that the midpoint between A and the
permutation of B nearest to the proxy has low loss. Each step projects the proxy onto B's permutations by weight
matching, evaluates ``loss(0.5 * (A + P(B)))`` with the projection in the forward pass and the proxy's gradient in
the backward pass (straight-through), and updates the proxy. The best projection seen is returned.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmc_lightning.weights.permutation.apply import Permutation, apply_permutation
from lmc_lightning.weights.permutation.batches import Data, iter_batches, run_with
from lmc_lightning.weights.permutation.spec import PermutationSpec
from lmc_lightning.weights.permutation.weight_matching import weight_matching

_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def _midpoint(theta_a: Mapping[str, Tensor], theta_b: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: 0.5 * (a + theta_b[k]) if a.is_floating_point() else a.clone() for k, a in theta_a.items()}


def ste_matching(net: nn.Module, spec: PermutationSpec, theta_a: Mapping[str, Tensor], theta_b: Mapping[str, Tensor],
                 data: Data, epochs: int = 1, lr: float = 1e-3, batch_size: int = 256, seed: int = 0,
                 max_iter: int = 100, loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
                 eval_batches: int = 4, eval_every: int | None = None,
                 device: str | torch.device | None = None,
                 progress: Callable[[int], Any] | None = None) -> Permutation:
    """Learn a permutation of B through a projected proxy model with a straight-through estimator.

    Nets with BatchNorm run in train mode (batch statistics; the midpoint's running statistics would be
    meaningless), others in eval mode. Candidate projections (the initial weight matching, and the current one every
    ``eval_every`` steps and at the end) are scored by the midpoint loss on the first ``eval_batches`` batches.

    Args:
        net: Any instance of the architecture.
        spec: Permutation spec.
        theta_a: Reference weights.
        theta_b: Weights to permute.
        data: Labelled data: ``(x, y)`` tensors or an iterable of ``(x, y)`` batches.
        epochs: Passes over ``data``.
        lr: Adam learning rate of the proxy.
        batch_size: Batch size when ``data`` is given as tensors.
        seed: Seed of the weight-matching group order.
        max_iter: Round limit of each projection.
        loss_fn: ``loss_fn(logits, y)``.
        eval_batches: Batches used to score a projection.
        eval_every: Score the current projection every this many steps (default: once per epoch).
        device: Device to run on (default: that of A's weights).
        progress: Called with 1 after every training step (e.g. a progress bar's ``update``).

    Returns:
        Group name -> index tensor (CPU, int64) of the best projection.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}.")
    device = torch.device(device) if device is not None else next(iter(theta_a.values())).device
    theta_a = {k: v.detach().to(device) for k, v in theta_a.items()}
    theta_b = {k: v.detach().to(device) for k, v in theta_b.items()}
    params = {k for k, _ in net.named_parameters()}
    proxy = {k: theta_a[k].clone().requires_grad_(True) for k in spec.keys
             if k in params and k not in spec.buffers and theta_a[k].is_floating_point()}
    if not proxy:
        raise ValueError("The spec permutes no parameters of this net; nothing for STE matching to learn.")
    opt = torch.optim.Adam(proxy.values(), lr=lr)
    train_mode = any(isinstance(m, _BATCHNORM) for m in net.modules())
    modes = {m: m.training for m in net.modules()}
    net.train(train_mode)

    def project(perm: Permutation | None) -> Permutation:
        ref = dict(theta_a, **{k: v.detach() for k, v in proxy.items()})
        return weight_matching(spec, ref, theta_b, max_iter=max_iter, seed=seed, init=perm).perm

    def loss_at(perm: Permutation, x: Tensor, y: Tensor, ste: bool) -> Tensor:
        b = apply_permutation(theta_b, spec, perm)
        if ste:
            b.update({k: p + (b[k] - p).detach() for k, p in proxy.items()})
        return loss_fn(run_with(net, _midpoint(theta_a, b), x), y)

    def score(perm: Permutation) -> float:
        with torch.no_grad():
            losses = [loss_at(perm, x.to(device), y.to(device), False).item() for x, y in held_out]
        return sum(losses) / len(losses)

    try:
        held_out = []
        for x, y in iter_batches(data, batch_size):
            if y is None:
                raise ValueError("STE matching needs labels: pass data=(x, y) or batches of (x, y).")
            held_out.append((x, y))
            if len(held_out) >= eval_batches:
                break
        if not held_out:
            raise ValueError("data yielded no batches.")
        perm = project(None)
        best, best_loss = perm, score(perm)
        step = 0
        for _ in range(epochs):
            for x, y in iter_batches(data, batch_size):
                perm = project(perm)
                opt.zero_grad()
                loss_at(perm, x.to(device), y.to(device), True).backward()
                opt.step()
                step += 1
                if progress is not None:
                    progress(1)
                if eval_every and step % eval_every == 0:
                    best, best_loss = min((best, best_loss), (perm, score(perm)), key=lambda c: c[1])
            if not eval_every:
                perm = project(perm)
                best, best_loss = min((best, best_loss), (perm, score(perm)), key=lambda c: c[1])
    finally:
        for module, training in modes.items():
            module.train(training)
    return best
