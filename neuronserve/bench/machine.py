"""This machine's limits, measured: memory read bandwidth and fp32 GEMM peak (what benchmarks
report their kernels' fractions of)."""

from __future__ import annotations

import time


def memory_bandwidth_gbs(mib: int = 512, repeats: int = 5) -> float:
    """Read bandwidth, GB/s: the best of a few full passes (a sum) over a buffer far larger than cache."""
    import torch

    x = torch.ones(mib * 2**20 // 4)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best / 1e9


def gemm_peak_gflops(size: int = 1536, repeats: int = 5) -> float:
    """fp32 GEMM rate, GFLOP/s: the best of a few large square matmuls (torch's BLAS)."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best / 1e9
