"""The GEMM rate of this machine, measured in the same run as the loss: the yardstick of the
floor fraction (a fused backend's FLOPs divided by this rate is the time it cannot beat)."""

from __future__ import annotations

import statistics

import torch

from .measure import clock_for

# (M, N, K): large enough for BLAS/cuBLAS to reach its sustained rate, and shaped like the
# fused kernels' work (long rows, short inner dimension).
GEMM_SHAPE = (8192, 8192, 256)
# One cache-resident tile product, as a tiled kernel issues them: on the CPU it runs faster than
# the large product, whose output streams through memory (PERF_NOTES: ~190 vs ~141 GFLOP/s).
TILE_SHAPE = (512, 512, 128)


def gemm_rate(device: torch.device, dtype: torch.dtype, min_repeats: int = 3,
              min_time_s: float = 0.5, shape: tuple[int, int, int] = GEMM_SHAPE) -> float:
    """Median FLOP/s (2 per multiply-add) of an (M×K)·(K×N) product in `dtype` on `device`."""
    m, n, k = shape
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, n, device=device).to(dtype)
    out = torch.empty(m, n, device=device, dtype=dtype)  # no allocation inside the timing
    clock = clock_for(device)

    def once() -> float:
        clock.sync()
        start = clock.mark()
        torch.matmul(a, b, out=out)
        return clock.seconds(start, clock.mark())

    estimate = once()  # warm-up: thread pools, cuBLAS handles and heuristics
    repeats = max(min_repeats, min(50, int(min_time_s / max(estimate, 1e-9)) + 1))
    seconds = statistics.median(once() for _ in range(repeats))
    return 2.0 * m * n * k / seconds


def best_gemm_rate(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """The faster of the large and the tile-sized product: the floor's yardstick, so that no
    kernel made of such products can be reported above 100% of it. Returns (FLOP/s, what)."""
    rates = {shape: gemm_rate(device, dtype, shape=shape) for shape in (GEMM_SHAPE, TILE_SHAPE)}
    text = ", ".join(f"{'×'.join(map(str, shape))} {rate / 1e9:.1f}" for shape, rate in rates.items())
    return max(rates.values()), f"{text} GFLOP/s"
