"""Benchmark: the fused batch-norm kernels (:mod:`lmc_lightning.weights.fused`) against torch's batch norm.

Times, on channels_last bf16 activations, (1) train-mode batch norm + ReLU: torch's ``batch_norm`` followed by
``relu`` against ``channel_stats`` + ``scale_shift(relu=True)``, and (2) the statistics read alone, reported as the
bandwidth at which the activation is read. Shapes: one statistics batch of 500 and twenty merged ones (what BN reset
forwards in ``evaluate_path``), at the channel counts of ResNet-20 x1/x4.

    python benchmarks/bn_kernels.py        # needs CUDA and Triton
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from lmc_lightning.weights import fused

SHAPES = [((500, 64, 32, 32), 1), ((10_000, 16, 32, 32), 20), ((10_000, 64, 32, 32), 20), ((10_000, 256, 8, 8), 20)]


def seconds(fn: Callable[[], object], repeats: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def row(shape: tuple[int, int, int, int], groups: int) -> str:
    """One table row: torch's BN + ReLU per batch against the fused kernels on the merged batches."""
    x = torch.randn(shape, device="cuda").bfloat16().contiguous(memory_format=torch.channels_last)
    w, b = torch.rand(shape[1], device="cuda"), torch.randn(shape[1], device="cuda")
    parts = x.chunk(groups)

    def torch_bn() -> list[torch.Tensor]:
        return [F.batch_norm(p, None, None, w, b, training=True).relu() for p in parts]

    def ours() -> torch.Tensor:
        _, _, scale, shift = fused.channel_stats(x, w, b, 1e-5, groups)
        return fused.scale_shift(x, scale, shift, relu=True)

    base, mine = seconds(torch_bn), seconds(ours)
    stats = seconds(lambda: fused.channel_stats(x, w, b, 1e-5, groups))
    return (f"{str(shape):<20} {groups:>6} {base * 1e3:>17.3f} {mine * 1e3:>9.3f} {base / mine:>7.2f}x "
            f"{x.numel() * x.element_size() / stats / 1e9:>10.0f}")


def main() -> None:
    if not torch.cuda.is_available() or fused.triton is None:
        raise SystemExit("bn_kernels.py needs a CUDA device and Triton.")
    print(f"{'shape':<20} {'groups':>6} {'torch BN+ReLU ms':>17} {'fused ms':>9} {'speed-up':>8} {'stats GB/s':>10}")
    for shape, groups in SHAPES:
        print(row(shape, groups))

if __name__ == "__main__":
    main()
