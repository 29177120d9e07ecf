"""Similarity metrics: invariances, self-similarity, direct computations, Metric = functional, DDP = one process."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lmc_lightning.metrics import GReLUCKA, GReLUProcrustes, LinearCKA, OrthogonalProcrustes, similarity_matrix
from lmc_lightning.metrics.functional import grelu_cka, grelu_procrustes, linear_cka, orthogonal_procrustes

pytestmark = pytest.mark.usefixtures("one_thread")


def _features(n: int = 64, c: int = 6, s: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, s, s, generator=g).relu() + 0.1 * torch.rand(n, c, s, s, generator=g)


def _grelu(h: torch.Tensor, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(h.shape[1], generator=g)
    scale = torch.rand(h.shape[1], generator=g) * 3 + 0.2
    return h[:, perm] * scale.view(1, -1, 1, 1)


def _rotate(h: torch.Tensor, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(h.shape[1], h.shape[1], generator=g, dtype=torch.float64))
    return torch.einsum("oc,nchw->nohw", q.float(), h)


@pytest.mark.parametrize("fn", [grelu_procrustes, grelu_cka])
def test_grelu_metrics_invariant_to_grelu_maps_not_rotations(fn) -> None:
    h1, h2 = _features(seed=0), _features(seed=5)
    base = fn(h1, h2)
    assert abs(float(fn(h1, _grelu(h2))) - float(base)) < 1e-5
    assert abs(float(fn(_grelu(h1, 7), h2)) - float(base)) < 1e-5
    assert abs(float(fn(h1, _rotate(h1))) - 1.0) > 1e-2  # a rotation is not in G_ReLU


@pytest.mark.parametrize("fn", [orthogonal_procrustes, linear_cka])
def test_orthogonal_metrics_invariant_to_rotations(fn) -> None:
    h1, h2 = _features(seed=0), _features(seed=5)
    assert abs(float(fn(h1, _rotate(h2))) - float(fn(h1, h2))) < 1e-5
    assert abs(float(fn(h1, _rotate(h1))) - 1.0) < 1e-5


@pytest.mark.parametrize("fn", [grelu_procrustes, orthogonal_procrustes, grelu_cka, linear_cka,
                                lambda a, b: linear_cka(a, b, debiased=False)])
def test_self_similarity_is_one_and_others_less(fn) -> None:
    h = _features()
    assert abs(float(fn(h, h)) - 1.0) < 1e-6
    assert float(fn(h, _features(seed=9))) < 0.99


def test_procrustes_equals_direct_computation() -> None:
    from scipy.optimize import linear_sum_assignment

    h1, h2 = _features(c=5).double(), _features(c=5, seed=3).double()
    a = h1 / h1.square().sum((0, 2, 3), keepdim=True).sqrt()
    b = h2 / h2.square().sum((0, 2, 3), keepdim=True).sqrt()
    cos = torch.einsum("nihw,njhw->ij", a, b)
    i, j = linear_sum_assignment(cos.numpy(), maximize=True)
    d2 = a.square().sum() + b.square().sum() - 2 * cos[i, j].sum()
    assert abs(float(grelu_procrustes(h1, h2)) - float(1 - (d2 / 20).sqrt())) < 1e-10
    a, b = h1 / h1.norm(), h2 / h2.norm()
    m = torch.einsum("nihw,njhw->ij", a, b)
    d = (2 - 2 * torch.linalg.svdvals(m).sum()).sqrt() / 2
    assert abs(float(orthogonal_procrustes(h1, h2)) - float(1 - d)) < 1e-10


def test_grelu_cka_equals_direct_computation() -> None:
    h1, h2 = _features(n=12, c=3, s=2), _features(n=12, c=4, s=2, seed=3)

    def kernel(h):
        h = h.double() - h.double().mean((0, 2, 3), keepdim=True)
        h = h / h.square().sum((0, 2, 3), keepdim=True).sqrt()
        n = len(h)
        k = torch.zeros(n, n, dtype=torch.float64)
        for i in range(n):
            for j in range(n):
                if i != j:
                    k[i, j] = max(float((h[i, c] * h[j, c]).sum()) for c in range(h.shape[1]))
        return k

    def hsic(k, m):
        n = len(k)
        one = torch.ones(n, 1, dtype=torch.float64)
        return (torch.trace(k @ m) + (one.T @ k @ one) * (one.T @ m @ one) / ((n - 1) * (n - 2))
                - 2 / (n - 2) * one.T @ k @ m @ one).item() / (n * (n - 3))

    k, m = kernel(h1), kernel(h2)
    want = hsic(k, m) / (hsic(k, k) * hsic(m, m)) ** 0.5
    assert abs(float(grelu_cka(h1, h2)) - want) < 1e-5


def test_biased_linear_cka_equals_kornblith_formula() -> None:
    x, y = _features(n=30).flatten(1).double(), _features(n=30, seed=4).flatten(1).double()
    x, y = x - x.mean(0), y - y.mean(0)
    want = (y.T @ x).norm() ** 2 / ((x.T @ x).norm() * (y.T @ y).norm())
    assert abs(float(linear_cka(x, y, debiased=False)) - float(want)) < 1e-5


def test_mismatched_shapes_upsample_and_pad() -> None:
    h1 = _features(c=4, s=4)
    h2 = h1[:, :3, ::2, ::2]  # fewer channels, half the side
    up = h2.repeat_interleave(2, 2).repeat_interleave(2, 3)
    padded = torch.cat([up, torch.zeros_like(up[:, :1])], 1)
    assert abs(float(grelu_procrustes(h1, h2)) - float(grelu_procrustes(h1, padded))) < 1e-10
    assert 0 < float(grelu_procrustes(h1, h2)) < 1


@pytest.mark.parametrize("cls", [GReLUProcrustes, OrthogonalProcrustes, GReLUCKA, LinearCKA])
def test_metric_over_batches_equals_functional(cls) -> None:
    h1, h2 = _features(n=40), _features(n=40, c=5, seed=3)
    metric = cls(num_samples=48) if "CKA" in cls.__name__ else cls()
    for a, b in zip(h1.split(16), h2.split(16), strict=True):
        metric.update(a, b)
    fn = {"GReLUProcrustes": grelu_procrustes, "OrthogonalProcrustes": orthogonal_procrustes,
          "GReLUCKA": grelu_cka, "LinearCKA": linear_cka}[cls.__name__]
    assert abs(float(metric.compute()) - float(fn(h1, h2))) < 1e-6


def test_similarity_matrix_equals_pairwise_calls() -> None:
    fa = [_features(n=20, c=3), _features(n=20, c=4, s=2, seed=1)]
    fb = [_features(n=20, c=5, seed=2), _features(n=20, c=2, s=1, seed=3)]
    for name, fn in (("grelu_cka", grelu_cka), ("linear_cka", linear_cka), ("grelu_procrustes", grelu_procrustes)):
        mat = similarity_matrix(fa, fb, name)
        for i, a in enumerate(fa):
            for j, b in enumerate(fb):
                assert abs(float(mat[i, j]) - float(fn(a, b))) < 1e-6, (name, i, j)


def _ddp_worker(rank: int, world: int, init_file: str, h1: torch.Tensor, h2: torch.Tensor, out_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        metrics = [GReLUProcrustes(), OrthogonalProcrustes(), GReLUCKA(num_samples=len(h1)),
                   LinearCKA(num_samples=len(h1))]
        mine = torch.arange(rank, len(h1), world)  # a DistributedSampler's share
        for metric in metrics:
            for idx in mine.split(5):
                metric.update(h1[idx], h2[idx])
        values = torch.stack([m.compute() for m in metrics])
        if rank == 0:
            torch.save(values, out_file)
    finally:
        dist.destroy_process_group()


def test_metrics_under_two_process_ddp_equal_one_process() -> None:
    h1, h2 = _features(n=24), _features(n=24, c=5, seed=3)
    with tempfile.TemporaryDirectory() as tmp:
        out_file = os.path.join(tmp, "values.pt")
        mp.start_processes(_ddp_worker, args=(2, os.path.join(tmp, "init"), h1, h2, out_file), nprocs=2, join=True,
                           start_method="fork")
        ddp = torch.load(out_file, weights_only=True)
    single = torch.stack([grelu_procrustes(h1, h2), orthogonal_procrustes(h1, h2), grelu_cka(h1, h2),
                          linear_cka(h1, h2)])
    torch.testing.assert_close(ddp, single, rtol=1e-6, atol=1e-6)
