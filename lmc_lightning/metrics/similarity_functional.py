"""Representation similarity of two feature tensors (the modelsym seed, Godfrey et al., 2022; Kornblith et al., 2019).

Features are ``[N, C, h, w]`` (conv) or ``[N, C]``. Procrustes metrics reduce to per-channel sums of squares and the
C1 x C2 cross matrix over (N, h, w); CKA metrics need N x N kernels, computed in row blocks on the features' device
(:func:`grelu_kernel`, :func:`linear_kernel`) and reduced in float64. Re-exported by
``lmc_lightning.metrics.functional``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lmc_lightning.weights.permutation.weight_matching import solve_assignment

#: Elements of the largest intermediate a blocked kernel may form (about 1 GB in float32).
BLOCK_ELEMENTS = 2**28


def _as_4d(h: Tensor) -> Tensor:
    if h.dim() == 2:
        return h[:, :, None, None]
    if h.dim() != 4:
        raise ValueError(f"Features must be [N, C] or [N, C, h, w], got shape {tuple(h.shape)}.")
    return h


def match_spatial(h1: Tensor, h2: Tensor) -> tuple[Tensor, Tensor]:
    """Upsample the smaller spatial map by index repetition (``i // factor``), as in the seed.

    Sides that are not multiples of each other (7 and 4 on 28x28 inputs) take index ``i * have // want``, which is
    ``i // factor`` whenever ``want = factor * have``.

    Raises:
        ValueError: Different batch sizes.
    """
    h1, h2 = _as_4d(h1), _as_4d(h2)
    if h1.shape[0] != h2.shape[0]:
        raise ValueError(f"Features of different sample counts: {h1.shape[0]} and {h2.shape[0]}; pass the same inputs.")

    def up(h: Tensor, size: tuple[int, int]) -> Tensor:
        for axis, (have, want) in enumerate(zip(h.shape[2:], size, strict=True)):
            if have != want:
                h = h.index_select(2 + axis, torch.arange(want, device=h.device) * have // want)
        return h

    size = (max(h1.shape[2], h2.shape[2]), max(h1.shape[3], h2.shape[3]))
    return up(h1, size), up(h2, size)


def procrustes_sums(h1: Tensor, h2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel sums of squares ``[C1]``, ``[C2]`` and the cross matrix ``[C1, C2]`` over (N, h, w), float64."""
    h1, h2 = match_spatial(h1, h2)
    a = h1.transpose(0, 1).reshape(h1.shape[1], -1).double()
    b = h2.transpose(0, 1).reshape(h2.shape[1], -1).double()
    return a.square().sum(1), b.square().sum(1), a @ b.t()


def _pad(sq1: Tensor, sq2: Tensor, cross: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Zero-pad the narrower channel axis."""
    c = max(len(sq1), len(sq2))
    out = cross.new_zeros(c, c)
    out[: len(sq1), : len(sq2)] = cross
    return torch.cat([sq1, sq1.new_zeros(c - len(sq1))]), torch.cat([sq2, sq2.new_zeros(c - len(sq2))]), out


def grelu_procrustes_from_sums(sq1: Tensor, sq2: Tensor, cross: Tensor) -> Tensor:
    """G_ReLU-Procrustes similarity from :func:`procrustes_sums` (zero channels stay zero after normalisation)."""
    sq1, sq2, cross = _pad(sq1, sq2, cross)
    n1, n2 = sq1.sqrt(), sq2.sqrt()
    cos = cross / torch.outer(torch.where(n1 > 0, n1, 1.0), torch.where(n2 > 0, n2, 1.0))
    matched = cos[torch.arange(len(cos)), solve_assignment(cos)].sum()
    d2 = (n1 > 0).sum() + (n2 > 0).sum() - 2 * matched
    return 1 - (d2.clamp_min(0) / (4 * len(sq1))).sqrt()


def orthogonal_procrustes_from_sums(sq1: Tensor, sq2: Tensor, cross: Tensor) -> Tensor:
    """Orthogonal-Procrustes similarity from :func:`procrustes_sums`."""
    nuclear = torch.linalg.matrix_norm(cross, ord="nuc") / (sq1.sum().sqrt() * sq2.sum().sqrt())
    return 1 - (2 - 2 * nuclear).clamp_min(0).sqrt() / 2


def grelu_procrustes(h1: Tensor, h2: Tensor) -> Tensor:
    """G_ReLU-Procrustes similarity, as in the seed's ``wreath_procrustes``.

    Channels are normalised to unit L2 norm over (N, h, w) without centring; ``cos`` is the C x C matrix of channel
    cosines; the Hungarian matching ``(I, J)`` maximises it; ``d^2 = ||H1||^2 + ||H2||^2 - 2 sum cos[I, J]`` and the
    similarity is ``1 - sqrt(d^2 / (4 C))``. Invariant to channel permutations and positive per-channel scalings.
    Mismatched shapes are matched first (:func:`match_spatial`, zero-padded channels).

    Returns:
        0-dim float64 tensor in [0, 1].
    """
    return grelu_procrustes_from_sums(*procrustes_sums(h1, h2))


def orthogonal_procrustes(h1: Tensor, h2: Tensor) -> Tensor:
    """Orthogonal-Procrustes similarity, as in the seed's ``ortho_procrustes``.

    Each tensor is normalised to unit Frobenius norm; ``d = sqrt(2 - 2 ||H1^T H2||_*) / 2`` with ``H`` the
    ``[N h w, C]`` matrix; similarity ``1 - d``. Invariant to orthogonal maps of the channels.

    Returns:
        0-dim float64 tensor in [0, 1].
    """
    return orthogonal_procrustes_from_sums(*procrustes_sums(h1, h2))


def center_normalize_channels(h: Tensor) -> Tensor:
    """Centre each channel (mean over N, h, w), then scale it to unit L2 norm (zero channels stay zero)."""
    h = _as_4d(h).float()
    h = h - h.mean(dim=(0, 2, 3), keepdim=True)
    norm = h.square().sum(dim=(0, 2, 3), keepdim=True).sqrt()
    return h / torch.where(norm > 0, norm, 1.0)


def _row_blocks(n: int, per_row: int) -> list[slice]:
    size = max(1, min(n, BLOCK_ELEMENTS // max(per_row, 1)))
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def grelu_kernel(h: Tensor, estimator: str = "max") -> Tensor:
    """G_ReLU kernel ``K_ij = max_c sum_{h,w} H[i,c] H[j,c]`` (``i != j``; ``K_ii = 0``) of prepared features.

    Computed in row blocks on ``h``'s device: a block of rows forms a ``[C, B, N]`` tensor of per-channel inner
    products (at most ``BLOCK_ELEMENTS``), reduced over channels at once, so the N x N kernel of 10k samples never
    needs more than the kernel itself plus one block.

    Args:
        h: ``[N, C, h, w]`` features, already centred and normalised (:func:`center_normalize_channels`).
        estimator: ``"max"`` (the seed's default) or ``"median"`` over channels.
    """
    if estimator not in ("max", "median"):
        raise ValueError(f"estimator must be 'max' or 'median', got {estimator!r}.")
    h = _as_4d(h)
    n, c = h.shape[:2]
    per_c = h.transpose(0, 1).reshape(c, n, -1)  # [C, N, hw]
    kernel = h.new_empty(n, n)
    for rows in _row_blocks(n, c * n):
        inner = torch.bmm(per_c[:, rows], per_c.transpose(1, 2))  # [C, B, N]
        kernel[rows] = inner.amax(0) if estimator == "max" else inner.median(0).values
    kernel.fill_diagonal_(0)
    return kernel


def linear_kernel(x: Tensor) -> Tensor:
    """Linear kernel ``X X^T`` of ``[N, ...]`` features (flattened), in row blocks."""
    x = x.reshape(len(x), -1).float()
    kernel = x.new_empty(len(x), len(x))
    for rows in _row_blocks(len(x), len(x)):
        kernel[rows] = x[rows] @ x.t()
    return kernel


def hsic_unbiased(k: Tensor, l: Tensor) -> Tensor:  # noqa: E741
    """Unbiased HSIC of Song et al. (2012) of two symmetric N x N kernels with zero diagonal (N > 3), float64."""
    n = k.shape[0]
    if n < 4:
        raise ValueError(f"The unbiased HSIC needs at least 4 samples, got {n}.")
    trace = (k * l).sum(dtype=torch.float64)
    k1, l1 = k.sum(1, dtype=torch.float64), l.sum(1, dtype=torch.float64)
    return (trace + k1.sum() * l1.sum() / ((n - 1) * (n - 2)) - 2 / (n - 2) * (k1 @ l1)) / (n * (n - 3))


def hsic_biased(k: Tensor, l: Tensor) -> Tensor:  # noqa: E741
    """Biased HSIC ``tr(K H L H) / (N - 1)^2`` (H the centring matrix), float64."""
    n = k.shape[0]
    k1, l1 = k.sum(1, dtype=torch.float64), l.sum(1, dtype=torch.float64)
    trace = (k * l).sum(dtype=torch.float64) - 2 / n * (k1 @ l1) + k1.sum() * l1.sum() / n**2
    return trace / (n - 1) ** 2


def cka_from_kernels(k: Tensor, l: Tensor, debiased: bool = True,  # noqa: E741
                     self_k: Tensor | None = None, self_l: Tensor | None = None) -> Tensor:
    """``HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))``; pass ``self_k``/``self_l`` to reuse ``HSIC(K, K)``/``HSIC(L, L)``.

    ``debiased`` uses the unbiased estimator on kernels with zeroed diagonals, otherwise the biased one.
    """
    hsic = hsic_unbiased if debiased else hsic_biased
    if debiased:
        k, l = k.clone().fill_diagonal_(0), l.clone().fill_diagonal_(0)  # noqa: E741
    kk = hsic(k, k) if self_k is None else self_k
    ll = hsic(l, l) if self_l is None else self_l
    return hsic(k, l) / math.sqrt(max(float(kk * ll), 1e-300))


def grelu_cka(h1: Tensor, h2: Tensor, estimator: str = "max") -> Tensor:
    """G_ReLU-CKA, as in the seed's ``wreath_cka``: centred, unit-normalised channels, the max-over-channels kernel
    (:func:`grelu_kernel`) and the unbiased HSIC. Invariant to channel permutations and positive scalings.

    Returns:
        0-dim float64 tensor.
    """
    k1 = grelu_kernel(center_normalize_channels(h1), estimator)
    k2 = grelu_kernel(center_normalize_channels(h2), estimator)
    return cka_from_kernels(k1, k2, debiased=True)


def linear_cka(h1: Tensor, h2: Tensor, debiased: bool = True, normalize_channels: bool = False) -> Tensor:
    """Linear CKA (Kornblith et al., 2019) of features flattened to ``[N, C h w]``.

    Args:
        h1: First features.
        h2: Second features.
        debiased: Unbiased HSIC (Song et al.) as in the debiased CKA; False: biased HSIC of centred kernels
            (Kornblith's original).
        normalize_channels: Centre and unit-normalise each channel first: the seed's ``ortho_cka`` (with
            ``debiased=True``), which is not textbook linear CKA.

    Returns:
        0-dim float64 tensor.
    """
    prep = center_normalize_channels if normalize_channels else (lambda h: h.reshape(len(h), -1).float())
    return cka_from_kernels(linear_kernel(prep(h1)), linear_kernel(prep(h2)), debiased=debiased)


#: Metric names accepted by :func:`similarity_matrix`.
METRICS = ("grelu_procrustes", "orthogonal_procrustes", "grelu_cka", "linear_cka", "linear_cka_biased")


def _kernel(h: Tensor, metric: str) -> Tensor:
    if metric == "grelu_cka":
        return grelu_kernel(center_normalize_channels(h))
    k = linear_kernel(h)
    return k.fill_diagonal_(0) if metric == "linear_cka" else k


def similarity_matrix(feats_a: list[Tensor], feats_b: list[Tensor], metric: str = "grelu_cka") -> Tensor:
    """Layer x layer similarity ``S[i, j] = metric(feats_a[i], feats_b[j])``.

    For CKA every layer's kernel and its self-HSIC are computed once (L_a + L_b kernels instead of 2 L_a L_b), then
    each pair costs one O(N^2) reduction; Procrustes pairs are computed pair by pair.

    Args:
        feats_a: Features of net A at its points, each ``[N, C, h, w]`` or ``[N, C]``, same N throughout.
        feats_b: Features of net B at its points.
        metric: One of ``METRICS``.

    Returns:
        ``[L_a, L_b]`` float64 tensor.
    """
    if metric not in METRICS:
        raise ValueError(f"Unknown similarity metric {metric!r}; choose one of {METRICS}.")
    out = torch.empty(len(feats_a), len(feats_b), dtype=torch.float64)
    if metric.endswith("procrustes"):
        fn = grelu_procrustes if metric == "grelu_procrustes" else orthogonal_procrustes
        for i, h1 in enumerate(feats_a):
            for j, h2 in enumerate(feats_b):
                out[i, j] = fn(h1, h2)
        return out
    hsic = hsic_biased if metric == "linear_cka_biased" else hsic_unbiased
    kernels_b = [_kernel(h, metric) for h in feats_b]
    self_b = [hsic(k, k) for k in kernels_b]
    for i, h1 in enumerate(feats_a):
        k1 = _kernel(h1, metric)
        self_1 = hsic(k1, k1)
        for j, k2 in enumerate(kernels_b):
            out[i, j] = hsic(k1, k2) / math.sqrt(max(float(self_1 * self_b[j]), 1e-300))
    return out
